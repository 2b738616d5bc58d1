#!/usr/bin/env bash
# Make VENV (default .venv) a working virtual environment that can install packages, recreating
# it when an interrupted install left it broken: Ctrl-C while `python3 -m venv` runs leaves a venv
# without pip, and every make target then failed with "No module named pip" until the user
# deleted the folder by hand. Healthy = its python runs and either pip or uv works.
set -euo pipefail
venv=${1:-.venv}
py="$venv/bin/python"
healthy() {
  "$py" -c "import sys" >/dev/null 2>&1 &&
    { "$py" -c "import pip" >/dev/null 2>&1 || "$venv/bin/uv" --version >/dev/null 2>&1; }
}
if [ -e "$venv" ] && ! healthy; then
  echo "$venv is incomplete (an interrupted install?): recreating it" >&2
  rm -rf "$venv"
fi
if [ ! -e "$venv" ]; then
  python3 -m venv "$venv"
fi

#!/usr/bin/env bash
# The GPU check (issue 33; scripts/gpu_check.py says what it does): on a lent GPU machine,
#     bash scripts/gpu_check.sh                 (the device tool: run(command="bash scripts/gpu_check.sh",
#                                                carry=["wheels/gpu"], timeout_s=600))
# and here, the CPU dry run at toy sizes:
#     bash scripts/gpu_check.sh --cpu-smoke
# Writes gpu_check.json, the ledgers and gpu_check.log into $OUT (default outputs/gpu_check).
# The packages the machine lacks come from wheels/gpu/ (make gpu-wheels), installed without deps or
# network into a folder of their own when an import fails; the project runs from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/outputs/gpu_check}
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
modules="lightly hydra omegaconf pycocotools faiss tensorboardX"
if ! "$py" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $modules 2>/dev/null; then
  site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  shopt -s nullglob
  wheels=(wheels/gpu/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check: $py cannot import one of [$modules] and wheels/gpu/ is empty: run make gpu-wheels here and carry wheels/gpu" >&2
    exit 3
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" || exit 3
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $modules || exit 3
fi
# The project from this checkout (not installed on the device); scripts/ for the benchmarks' modules.
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$py" scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

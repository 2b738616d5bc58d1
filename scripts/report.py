"""Collect every run's metrics.json under a folder into report.md / report.csv and AP plots.

    python scripts/report.py multirun/pretrain/2026-11-21/12-00-00 [--out DIR]
"""

from __future__ import annotations

import argparse

from finetune.report import write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder searched recursively for metrics.json")
    p.add_argument("--out", default=None, help="where to write the report (default: root)")
    a = p.parse_args()
    files = write_report(a.root, a.out)
    print(files["md"].read_text())
    for kind, path in files.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()

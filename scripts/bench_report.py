"""``make bench``: run the speed benchmarks and write their figures into BENCHMARKS.md.

Each benchmark runs as its own process with ``--json`` (scripts/bench_pretrain.py with ``--e2e``,
scripts/bench_finetune.py); this script reads the JSON files and rewrites the speed section of
BENCHMARKS.md for this machine (other sections, and other machines' sections, are kept), naming the
machine, the date and the exact commands. ``--from-json A.json B.json`` only formats existing files.

    python scripts/bench_report.py [--out BENCHMARKS.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
BEGIN, END = "<!-- speed: {key} -->", "<!-- /speed: {key} -->"


def run_bench(script: str, args: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(SCRIPTS / script), *args, "--json", str(out)]
    print("[bench]", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out.read_text())


def _fmt(v: Any, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{suffix}"


def pretrain_table(d: dict[str, Any]) -> list[str]:
    rows = d["rows"]
    lines = ["| mode | images/s (median) | vs plain | vs ceiling | precision |", "|---|---:|---:|---:|---|"]
    for mode, r in rows.items():
        lines.append(f"| {mode} | {_fmt(r['images_per_s'])} | {_fmt(r['vs_plain'], 'x')} | "
                     f"{_fmt(r['vs_ceiling'])} | {r['precision']} |")
    return lines


def finetune_table(d: dict[str, Any]) -> list[str]:
    rows = d["rows"]
    lines = ["| mode | result (median) | vs plain | precision |", "|---|---:|---:|---|"]
    for mode, r in rows.items():
        value = f"{r['images_per_s']:.2f} img/s" if "images_per_s" in r else f"{r['seconds']:.3f} s"
        lines.append(f"| {mode} | {value} | {_fmt(r['vs_plain'], 'x')} | {r.get('precision', '-')} |")
    return lines


def section(results: list[dict[str, Any]]) -> tuple[str, str]:
    """The markdown section for one machine, and its key (the CPU or GPU model)."""
    m = results[0]["machine"]
    where = m.get("gpu") or m["cpu"]
    auto = m["auto"]
    title = f"{where}, precision auto = {auto['precision']}"
    if m.get("cpu_bf16_override") is not None:
        title += f" (FEWLABEL_CPU_BF16={m['cpu_bf16_override']})"
    key = title.replace(" ", "_")
    out = [BEGIN.format(key=key), f"### {title}", "",
           (f"- machine: {m.get('gpu') or m['cpu']}, CPU flags [{' '.join(m['cpu_flags']) or 'none of avx512/bf16'}], "
            f"{m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}"),
           f"- `auto` chose precision {auto['precision']}, channels_last {auto['channels_last']}: {auto['reason']}",
           f"- date: {results[0]['date']}", ""]
    for d in results:
        command = d["command"].replace(f"{REPO}/", "")  # repository-relative, as a user types it
        out += [f"**{d['bench']}** (`{command}`)", ""]
        out += pretrain_table(d) if d["bench"] == "pretrain" else finetune_table(d)
        out.append("")
    out.append(END.format(key=key))
    return "\n".join(out), key


def update(md: Path, text: str, key: str) -> None:
    """Replace this machine's section in ``md`` (or add it under the speed heading)."""
    from bench_common import put_section  # (imports torch: not at the launcher's start-up)

    head = "# Benchmarks\n\n## Speed\n\nWritten by `make bench` (scripts/bench_report.py); one section per machine.\n"
    put_section(md, text, BEGIN.format(key=key), END.format(key=key), "## Speed", "## Speed\n", empty=head)

def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds (a smoke check, not figures)")
    p.add_argument("--from-json", nargs="+", type=Path, default=None, help="format these JSON files only")
    p.add_argument("--json-dir", type=Path, default=REPO / "outputs" / "bench", help="where the JSON files go")
    p.add_argument("--pretrain-only", action="store_true", help="skip the (slow) fine-tuning benchmark")
    args = p.parse_args(argv)
    if args.from_json:
        results = [json.loads(f.read_text()) for f in args.from_json]
    else:
        quick_p = ["--steps", "2", "--warmup", "1", "--rounds", "1"] if args.quick else []
        quick_f = (["--steps", "3", "--warmup", "1", "--repeats", "1", "--eval-images", "20"] if args.quick
                   else ["--steps", "12", "--warmup", "3"])
        # Kept (outputs/ is not tracked) so that a section can be re-rendered with --from-json.
        args.json_dir.mkdir(parents=True, exist_ok=True)
        results = [run_bench("bench_pretrain.py", ["--e2e", *quick_p], args.json_dir / "pretrain.json")]
        if not args.pretrain_only:
            results.append(run_bench("bench_finetune.py", quick_f, args.json_dir / "finetune.json"))
    text, key = section(results)
    update(args.out, text, key)
    print(f"wrote {args.out} ({key})")
    return args.out


if __name__ == "__main__":
    main()

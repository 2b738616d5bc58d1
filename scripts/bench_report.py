"""``make bench``: run the speed benchmarks and write their figures into BENCHMARKS.md.

Each benchmark runs as its own process with ``--json`` (scripts/bench_pretrain.py with ``--e2e``,
scripts/bench_finetune.py, scripts/bench_steps.py, scripts/bench_infer.py); this script reads the
JSON files and rewrites the speed section of BENCHMARKS.md for this machine (other sections, and
other machines' sections, are kept), naming the machine, the date and the exact commands.
``--from-json A.json B.json`` only formats existing files.

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


def steps_table(d: dict[str, Any]) -> list[str]:
    lines = ["| mode | s/step (mean) | labeled img/s | step vs plain | peak memory MB | precision |",
             "|---|---:|---:|---:|---:|---|"]
    for mode, r in d["rows"].items():
        mem = r.get("peak_mem_mb", r.get("peak_rss_mb"))
        lines.append(f"| {mode} | {r['s_per_step']:.3f} | {r['labeled_images_per_s']:.2f} | "
                     f"{_fmt(r.get('step_vs_plain'), 'x')} | {mem:.0f} | {r['precision']} |")
    semi = d["rows"].get("semi", {}).get("step_vs_finetune")
    if semi is not None:
        lines += ["", (f"A semi step (Unbiased Teacher, batch labeled + as many unlabeled) costs {semi:.2f}x a "
                      "fine-tuning step.")]
    return lines


def infer_table(d: dict[str, Any]) -> list[str]:
    lines = [("| mode | images/s (median) | vs plain | proposals | precision | peak memory MB | AP | AP50 | "
             "where the time goes |"), "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for mode, r in d["rows"].items():
        mem = r.get("peak_mem_mb", r.get("peak_rss_mb"))
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["time_shares"].items() if v >= 0.01)
        ap = "-" if "AP" not in r else f"{100 * r['AP']:.1f}"
        ap50 = "-" if "AP50" not in r else f"{100 * r['AP50']:.1f}"
        proposals = r.get("rpn_post_nms_top_n_test", r.get("topk_candidates"))
        lines.append(f"| {mode} | {r['images_per_s']:.2f} | {_fmt(r['vs_plain'], 'x')} | {proposals} | "
                     f"{r['precision']} | {mem:.0f} | {ap} | {ap50} | {shares} |")
    return lines


TABLES = {"pretrain": pretrain_table, "finetune": finetune_table, "steps": steps_table, "infer": infer_table}


def section(results: list[dict[str, Any]]) -> tuple[str, str]:
    """The markdown section for one machine, and its key (the CPU or GPU model)."""
    m = results[0]["machine"]
    where = m.get("gpu") or m["cpu"]
    auto = m["auto"]
    title = f"{where}, precision auto = {auto['precision']}"
    if m.get("cpu_bf16_override") is not None:
        title += f" (FEWLABEL_CPU_BF16={m['cpu_bf16_override']})"
    key = title.replace(" ", "_")
    out = [f"### {title}", "",
           (f"- machine: {m.get('gpu') or m['cpu']}, CPU flags [{' '.join(m['cpu_flags']) or 'none of avx512/bf16'}], "
            f"{m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}"),
           f"- `auto` chose precision {auto['precision']}, channels_last {auto['channels_last']}: {auto['reason']}",
           f"- date: {results[0]['date']}", ""]
    for d in results:
        command = d["command"].replace(f"{REPO}/", "")  # repository-relative, as a user types it
        out += [f"**{d['bench']}** (`{command}`)", ""]
        out += TABLES[d["bench"]](d)
        out.append("")
    return "\n".join(out) + "\n", key


def update(md: Path, text: str, key: str) -> None:
    """Replace this machine's section in ``md`` (or add it under the speed heading)."""
    from bench_common import put_section  # (imports torch: not at the launcher's start-up)

    head = "# Benchmarks\n\n## Speed\n\nWritten by `make bench` (scripts/bench_report.py); one section per machine.\n"
    put_section(md, text, "speed", key, "## Speed", "## Speed\n", empty=head)

def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds (a smoke check, not figures)")
    p.add_argument("--from-json", nargs="+", type=Path, default=None, help="format these JSON files only")
    p.add_argument("--json-dir", type=Path, default=REPO / "outputs" / "bench", help="where the JSON files go")
    p.add_argument("--pretrain-only", action="store_true", help="skip the (slow) detector benchmarks")
    p.add_argument("--infer-ckpt", type=Path, default=None,
                   help="a fine-tuning checkpoint for the inference benchmark (with --infer-ann: AP beside speed)")
    p.add_argument("--infer-ann", type=Path, default=None)
    args = p.parse_args(argv)
    # The benchmarks run from the repository root: paths given relative to where this was started.
    args.json_dir = args.json_dir.resolve()
    args.infer_ckpt = args.infer_ckpt.resolve() if args.infer_ckpt else None
    args.infer_ann = args.infer_ann.resolve() if args.infer_ann else None
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
            quick_s = ["--steps", "2", "--warmup", "1"] if args.quick else []
            results.append(run_bench("bench_steps.py", quick_s, args.json_dir / "steps.json"))
            infer = ["--ckpt", str(args.infer_ckpt)] if args.infer_ckpt else []
            infer += ["--ann", str(args.infer_ann)] if args.infer_ann else []
            infer += ["--images", "4", "--repeats", "1"] if args.quick else []
            results.append(run_bench("bench_infer.py", infer, args.json_dir / "infer.json"))
    text, key = section(results)
    update(args.out, text, key)
    print(f"wrote {args.out} ({key})")
    return args.out


if __name__ == "__main__":
    main()

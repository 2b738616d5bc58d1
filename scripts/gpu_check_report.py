"""The GPU check's report: BENCHMARKS.md's GPU section and the README's summary, from the JSON files a
check wrote (``gpu_check.json`` and its two ledgers), one section per GPU model.

    python scripts/gpu_check.py --report DIR --benchmarks BENCHMARKS.md --readme README.md --save-to benchmarks/gpu
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench_common import put_section
from gpu_check_jobs import headline

GPU_HEAD = ("## GPU\n\nWritten by `python scripts/gpu_check.py --report DIR --benchmarks BENCHMARKS.md` from the "
            "files `bash scripts/gpu_check.sh` writes on a lent GPU (README, \"Speed\", \"The GPU check\"): whether "
            "every stage runs on CUDA, its speed against plain references in the same run, and the accuracy "
            "benchmark at a GPU's budget. One section per GPU model.\n")
COMMAND = 'run(command="bash scripts/gpu_check.sh", carry=["wheels/gpu"], timeout_s=600)'


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _key(data: Mapping[str, Any]) -> str:
    m = data["machine"]
    where = m.get("gpu") or f"CPU dry run ({m['cpu']})"
    return where.replace(" ", "_")


def title(data: Mapping[str, Any]) -> str:
    m = data["machine"]
    if data["mode"] == "gpu":
        return f"{m.get('gpu')}, {data['started'][:10]}"
    return f"CPU dry run (--cpu-smoke, toy sizes: not figures), {m['cpu']}, {data['started'][:10]}"


def machine_lines(data: Mapping[str, Any]) -> list[str]:
    m = data["machine"]
    gpu = (f"{m.get('gpu')} ({_f(m.get('gpu_memory_gib'))} GiB, compute capability {m.get('gpu_capability')}, "
           f"{m.get('gpu_multiprocessors')} SMs), driver {m.get('driver', '-')}, CUDA {m.get('cuda')}, cuDNN "
           f"{m.get('cudnn')}; " if m.get("gpu") else "")
    pk = m.get("packages") or {}
    return [f"- machine: {gpu}{m['cpu']}, {m['cores']} cores; torch {m['torch']}, "
            + ", ".join(f"{k} {v}" for k, v in pk.items()) + f"; Python {m.get('python')}",
            (f"- `auto` chose precision {m['auto']['precision']}, channels_last {m['auto']['channels_last']}: "
             f"{m['auto']['reason']}"),
            f"- run: {data['started']} to {data.get('finished', '(cut off)')}, {data.get('wall_s', '-')} s of a "
            f"{data['deadline_s']} s deadline; `{data['command']}`"
            + (f" (on the device: `{COMMAND}`)" if data["mode"] == "gpu" else "")]


def correctness_lines(ph: Mapping[str, Any]) -> list[str]:
    exp = ph.get("expected") or {}
    c = ph.get("counts") or {}
    lines = [f"**Correctness** ({ph.get('status')}, {ph.get('wall_s')} s): "
             + ", ".join(f"{v} {k}" for k, v in c.items() if v)
             + f"; expected on this device: precision {exp.get('precision')}, "
             f"channels_last {exp.get('channels_last')}.",
             "", "| item | status | s | device | precision | what it showed |", "|---|---|---:|---|---|---|"]
    for name, r in ph.get("items", {}).items():
        shown = headline(r["error"])[:160] if r.get("error") else ", ".join(
            f"{k} {v}" for k, v in r.items() if k in ("steps", "AP", "final_loss", "killed_at_step", "final_step",
                                                       "nms_kept", "roi_align_rel_err", "batch_pinned",
                                                       "pseudo_boxes_per_image", "images", "detections"))
        lines.append(f"| {name} | {r['status']} | {_f(r.get('wall_s'), '{:.0f}')} | {r.get('device', '-')} | "
                     f"{r.get('precision', '-')} | {shown.replace('|', '/')} |")
    return lines


def speed_lines(ph: Mapping[str, Any]) -> list[str]:
    items, figs = ph.get("items", {}), ph.get("figures") or {}
    sw, fr = items.get("swav_ours", {}), items.get("frcnn_ours", {})
    swf, frf, inf = (figs.get("swav_e2e_images_per_s") or {}, figs.get("frcnn_train_images_per_s") or {},
                     figs.get("inference_images_per_s") or {})
    rows = (items.get("inference") or {}).get("rows") or {}

    def mem(d: Mapping[str, Any] | None) -> str:
        d = d or {}
        return " / ".join(_f(d.get(k), "{:.0f}") for k in ("ours", "plain"))

    lines = [(f"**Speed** ({ph.get('status')}, {ph.get('wall_s')} s), images/s, each against its plain "
              "reference in the same run:"), "",
             "| what | ours | plain | vs plain | peak GPU memory MB, ours / plain | settings |",
             "|---|---:|---:|---:|---:|---|",
             (f"| SwAV {sw.get('arch', '-')} {sw.get('crops', '-')}, files on disk to optimiser step | "
              f"{_f(swf.get('ours'))} | {_f(swf.get('plain'))} | {_f(swf.get('vs_plain'), '{:.2f}x')} | "
              f"{mem(swf.get('peak_mem_mb'))} | batch {sw.get('batch_size', '-')}, {sw.get('workers', '-')} "
              f"workers, ours {sw.get('precision', '-')} with views made on the GPU, plain lightly's example (PIL "
              f"views, fp32); goal {swf.get('goal')}: {_f(swf.get('vs_goal'), '{:.2f}')} of it |"),
             (f"| Faster R-CNN {fr.get('arch', '-')}-FPN training at {fr.get('min_size', '-')} px | "
              f"{_f(frf.get('ours'))} | {_f(frf.get('plain'))} | {_f(frf.get('vs_plain'), '{:.2f}x')} | "
              f"{mem(frf.get('peak_mem_mb'))} | batch {fr.get('batch_size', '-')}, ours the fine-tuning module "
              f"({fr.get('precision', '-')}), plain torchvision's reference loop (fp32) |"),
             (f"| inference, Faster R-CNN, `{inf.get('ours_mode')}` | {_f(inf.get('ours'))} | {_f(inf.get('plain'))} | "
              f"{_f(inf.get('vs_plain'), '{:.2f}x')} | "
              f"{_f((rows.get(inf.get('ours_mode') or '') or {}).get('peak_mem_mb'), '{:.0f}')} / "
              f"{_f((rows.get('plain') or {}).get('peak_mem_mb'), '{:.0f}')} | scripts/bench_infer.py, random init; "
              + ", ".join(f"{m} {_f(r.get('images_per_s'))}" for m, r in rows.items()) + " |")]
    failed = [f"{n}: {headline(r['error'])[:160]}" for n, r in items.items()
              if r.get("status") != "pass" and r.get("error")]
    return lines + ([""] + [f"- {f}" for f in failed] if failed else [])


def accuracy_lines(data: Mapping[str, Any]) -> list[str]:
    ph = data["phases"].get("accuracy") or {}
    c = ph.get("counts") or {}
    lines = [f"**Accuracy** ({ph.get('status')}, {ph.get('wall_s')} s): "
             + ", ".join(f"{v} runs {k}" for k, v in c.items() if v) + "."]
    pre = ph.get("pretrain")
    if pre:
        first, later = pre["probe_epoch_s"]
        lines += ["", (f"SSL pretraining: {pre['epochs']} epochs (a 2-epoch run measured {first:.1f} s for the first, "
                       f"which decodes the images, and {later:.1f} s for the next; budget {pre['budget_s']:.0f} s), "
                       f"{pre.get('steps')} steps, {pre.get('view_pairs')} view pairs in "
                       f"{_f(pre.get('pretrain_s'), '{:.0f}')} s ({pre.get('precision')}); kNN top-1 "
                       f"{_f(pre.get('knn'), '{:.3f}')} against {_f(pre.get('knn_random'), '{:.3f}')} "
                       "for its random init.")]
    tables = ph.get("tables") or {}
    if "ssl" in tables:
        lines += ["", tables["ssl"].replace("### ", "#### ", 1).rstrip()]
    if "semi" in tables:
        lines += ["", tables["semi"].replace("### ", "#### Labeled only against semi: ", 1).rstrip()]
    if ph.get("tables_error"):
        lines += ["", f"(The tables could not be drawn: {ph['tables_error']}; the ledgers hold the runs.)"]
    return lines


def section(data: Mapping[str, Any]) -> str:
    """BENCHMARKS.md's section for this check."""
    out = [f"### {title(data)}", "", *machine_lines(data), ""]
    phases = data["phases"]
    if "correctness" in phases:
        out += [*correctness_lines(phases["correctness"]), ""]
    if "speed" in phases:
        out += [*speed_lines(phases["speed"]), ""]
    if "accuracy" in phases:
        out += [*accuracy_lines(data), ""]
    return "\n".join(out)


def readme_paragraph(data: Mapping[str, Any]) -> str:
    """The README's few lines: the three speed figures and the correctness count."""
    ph = data["phases"]
    c = (ph.get("correctness") or {}).get("counts") or {}
    failed = [n for n, r in (ph.get("correctness") or {}).get("items", {}).items() if r["status"] != "pass"]
    f = (ph.get("speed") or {}).get("figures") or {}
    sw, fr, inf = (f.get("swav_e2e_images_per_s") or {}, f.get("frcnn_train_images_per_s") or {},
                   f.get("inference_images_per_s") or {})
    return (f"Measured by the GPU check on {title(data)} (BENCHMARKS.md's GPU section): "
            f"{c.get('pass', 0)} of {sum(c.values())} correctness items passed on CUDA"
            + (f" (not: {', '.join(failed)})" if failed else "") + "; "
            f"SwAV R50 2x224+6x96 from files {_f(sw.get('ours'), '{:.0f}')} images/s "
            f"({_f(sw.get('vs_plain'), '{:.2f}x')} lightly's plain loop, {_f(sw.get('vs_goal'), '{:.2f}')} of the "
            f"2,500 goal); Faster R-CNN R50-FPN training at 800 px {_f(fr.get('ours'))} images/s "
            f"({_f(fr.get('vs_plain'), '{:.2f}x')} torchvision's reference loop); inference "
            f"`{inf.get('ours_mode')}` {_f(inf.get('ours'))} images/s ({_f(inf.get('vs_plain'), '{:.2f}x')} plain).\n")


def main(folder: Path, benchmarks: Path | None, readme: Path | None, save_to: Path | None) -> str:
    data = json.loads((folder / "gpu_check.json").read_text())
    text = section(data)
    print(text)
    key = _key(data)
    if benchmarks is not None:
        put_section(benchmarks, text, "gpu", key, "## GPU", GPU_HEAD)
        print(f"updated {benchmarks}")
    if readme is not None:
        put_section(readme, readme_paragraph(data), "gpu", key, "## Speed", "## Speed\n")
        print(f"updated {readme}")
    if save_to is not None:
        dest = save_to / f"{key}_{data['started'][:10]}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("gpu_check.json", "ssl_synthetic.json", "semi_synthetic.json"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dest / name)
        print(f"kept the JSON files in {dest}")
    return text

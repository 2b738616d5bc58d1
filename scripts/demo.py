"""The whole pipeline on the built-in synthetic data, on a CPU, in minutes.

SimCLR pretraining on the unlabeled scenes (``--method`` for another), Faster R-CNN fine-tuning
from that backbone, the same fine-tuning from random init, then Unbiased Teacher
(semi-supervised) starting from the SSL fine-tune with the unlabeled scenes; COCO evaluation of
all three arms on the same validation images, a side-by-side table, a PNG of predictions against ground truth, and a
plain verdict with the pseudo-label health.

    python scripts/demo.py                 # what `make demo` runs (experiment=demo)
    python scripts/demo.py --smoke         # seconds, for CI (experiment=smoke)

Re-running resumes: finished stages are skipped, an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

import torch

from finetune.pipeline import run_pipeline
from finetune.plots import plot_predictions
from finetune.report import compare

METHOD_NAMES = {"swav": "SwAV", "simclr": "SimCLR", "moco": "MoCo v2", "vicreg": "VICReg", "densecl": "DenseCL",
                "detcon": "DetCon"}
# The pretraining preset of each method the demo offers (conf/pretrain/experiment/): one file each.
DEMO_PRESETS = {"simclr": "experiment=demo", "swav": "experiment=demo_swav", "densecl": "experiment=demo_densecl",
                "detcon": "experiment=demo_detcon"}


def pretraining_health(pretrain: dict) -> str:
    """One clause on how pretraining went, from its metrics.json (empty when unknown)."""
    loss, k = pretrain.get("final_loss"), pretrain.get("num_prototypes")
    if loss is None:
        return ""
    if not k:  # not SwAV: its loss and the kNN probe
        knn = pretrain.get("knn_top1")
        knn_part = f", kNN top-1 on the validation boxes {knn:.3f}" if knn is not None else ""
        return (f"{METHOD_NAMES.get(pretrain.get('method'), pretrain.get('method'))}'s loss ended at "
                f"{loss:.3f}{knn_part} after {pretrain.get('global_step')} steps")
    diag = pretrain.get("diagnostics") or {}
    cos, entropy, knn = diag.get("swav_embedding_cos"), diag.get("swav_code_entropy"), pretrain.get("knn_top1")
    parts = [f"SwAV's loss ended at {loss:.3f} against ln(num_prototypes) = {math.log(k):.3f}"]
    if cos is not None and entropy is not None:
        parts.append(f"different images' embeddings at mean cosine {cos:.2f}, the codes at "
                     f"{entropy:.0%} of the maximum entropy")
    if knn is not None:
        parts.append(f"kNN top-1 on the validation boxes {knn:.3f}")
    return ", ".join(parts) + f" after {pretrain.get('global_step')} steps"


# The SSL benchmark's ledger (scripts/bench_ssl.py, committed): its 100-label random-init arm is this
# demo's fine-tuning recipe on the same 100 labeled scenes, so its spread over seeds is the demo's;
# its SSL arms show what longer pretraining on more unlabeled scenes buys.
LEDGER = Path(__file__).resolve().parents[1] / "benchmarks" / "ssl" / "synthetic.json"
BENCH_COMMAND = "python scripts/bench_ssl.py --seeds 0 1 2 3 4"


def benchmark_figures(ledger: Path = LEDGER) -> dict:
    """From the SSL benchmark's ledger: random init's AP std over seeds at 100 labels (the demo's spread,
    points) and, per label count, the best SSL arm's paired AP gain over random init (mean, std, seeds)."""
    import statistics

    if not ledger.is_file():
        return {}
    data = json.loads(ledger.read_text())
    runs = data.get("runs", {})

    def aps(arm: str, n: int) -> dict[int, float]:
        return {int(k.rsplit("seed", 1)[1]): 100 * e["AP"] for k, e in runs.items() if k.startswith(f"{arm}/n{n}/")}

    out: dict = {"pretrain": data.get("pretrain") or {}, "gains": {}}
    random100 = list(aps("random", 100).values())
    if len(random100) > 1:
        out["spread"] = statistics.stdev(random100)
        out["spread_seeds"] = len(random100)
    for n in sorted({int(k.split("/n")[1].split("/")[0]) for k in runs}):
        base = aps("random", n)
        best = None
        for arm in ("ssl", "ssl_lpft", "ssl_frozen"):
            diffs = [ap - base[s] for s, ap in aps(arm, n).items() if s in base]
            if len(diffs) > 1 and (best is None or statistics.mean(diffs) > best[1]):
                best = (arm, statistics.mean(diffs), statistics.stdev(diffs), len(diffs))
        if best is not None:
            out["gains"][n] = best
    return out


def longer_budget_note(figures: dict) -> str:
    """What the SSL benchmark measured with more pretraining, or that it has not yet."""
    arms = {"ssl": "fine-tuned", "ssl_lpft": "LP-FT", "ssl_frozen": "frozen"}
    gains = figures.get("gains") or {}
    if not gains:
        return f"The SSL benchmark ({BENCH_COMMAND}) has no paired SSL results yet"
    pre = figures.get("pretrain") or {}
    parts = [f"{n} labels: {arms[a]} backbone {m:+.1f} +- {sd:.1f} AP over {k} seeds"
             for n, (a, m, sd, k) in sorted(gains.items())]
    return (f"With {pre.get('steps', '?')} pretraining steps on 10k unlabeled scenes the SSL benchmark measured "
            f"(paired against random init): {'; '.join(parts)} ({BENCH_COMMAND}; BENCHMARKS.md)")


def verdict(pre: dict, base: dict, pretrain: dict, figures: dict | None = None) -> str:
    """The plain-words comparison of the pretrained and the random-init fine-tune (AP points), read
    against random init's seed-to-seed spread from the SSL benchmark (``figures``, see
    :func:`benchmark_figures`): a single-seed difference inside it is not called a gain."""
    figures = benchmark_figures() if figures is None else figures
    spread = figures.get("spread")
    ap_p, ap_b = pre["coco"]["AP"], base["coco"]["AP"]
    delta = (ap_p - ap_b) * 100
    health = pretraining_health(pretrain)
    health_note = f" Pretraining: {health}." if health else ""
    rel = f" ({ap_p / ap_b:.2f}x)" if ap_b > 0 else ""
    longer = longer_budget_note(figures)
    if delta > 0 and spread is not None and delta > spread:
        return (f"The pretrained backbone helped: AP {ap_p * 100:.1f} against {ap_b * 100:.1f} "
                f"from random init, {delta:+.1f} points{rel}, with identical fine-tuning, more than "
                f"random init's seed-to-seed spread at this recipe ({spread:.1f} AP, std over "
                f"{figures.get('spread_seeds')} seeds).{health_note}")
    if delta > 0:
        within = (f"random init alone varies by {spread:.1f} AP (std over {figures.get('spread_seeds')} seeds) at "
                  "this recipe" if spread is not None else "random init's seed-to-seed spread is not measured yet")
        return (f"The pretrained backbone is ahead but within the seed-to-seed spread: AP {ap_p * 100:.1f} "
                f"against {ap_b * 100:.1f} from random init, {delta:+.1f} points{rel}, where {within}; one seed "
                f"does not show a gain. {longer}.{health_note}")
    why = ("With this little pretraining the features are not yet better than what fine-tuning "
           f"learns from scratch. {longer}.{health_note}")
    loss, k = pretrain.get("final_loss"), pretrain.get("num_prototypes")
    if loss is not None and k and abs(loss - math.log(k)) < 0.05:
        why = (f"SwAV collapsed: {health}, so the backbone learned little that transfers. The loss at "
               "ln(num_prototypes) means uniform assignments: SwAV did not get past its first phase. "
               "The README's demo section lists what gets it out on this data (grayscale views, "
               "prediction temperature 0.3, SGD instead of LARS); otherwise pretrain longer.")
    return (f"The pretrained backbone did NOT help here: AP {ap_p * 100:.1f} against {ap_b * 100:.1f} "
            f"from random init ({delta:+.1f} points). " + why)


# The semi arm: the semi benchmark's recipe (scripts/bench_semi.py: conf/finetune/semi/bench.yaml, a
# converged detector continued at a constant LR of 0.1x the fine-tuning peak, burn-in 0) with the
# variant that beat labeled-only continued there by the most (`semi:scale_t07_flip`: Soft Teacher's
# strong view zoomed 0.5-1.5x, threshold 0.7, the teacher averaged over each view and its mirror image;
# +1.6 +- 0.4 AP over labeled-only continued, benchmarks/semi/synthetic_ssl.json; without the mirror,
# +1.4 +- 0.3, and +0.9 +- 0.4 at equal wall time) from the SSL fine-tune's best checkpoint, for 6
# epochs of the 100 labeled images (78 steps) with as many unlabeled images per step: AdamW at 1e-4
# (1e-3 took the demo's AP from 16.3 to 9.6, 1e-4 to 16.9).
SEMI_ARM = ["semi=bench", "semi.strong_view=soft_teacher", "semi.threshold=0.7", "semi.strong_scale=[0.5,1.5]",
            "semi.teacher_flip=true",
            "scheduler=constant", "scheduler.warmup_steps=0", "optimizer.lr=0.0001", "trainer.max_epochs=6"]
SEMI_ARM_SMOKE = ["semi=bench", "semi.ema_time_constant=null", "semi.ema_decay=0.9", "semi.threshold=0.0",
                  "trainer.max_epochs=1"]


SEMI_LEDGERS = {"from random init": "synthetic", "from the SSL backbone": "synthetic_ssl"}
SEMI_BENCH = "python scripts/bench_semi.py --dataset synthetic"
# The same protocol on real photographs (BENCHMARKS.md's "bccd", "chess" and "chess_long": 10% splits,
# 20 labeled photographs each, from random init), where semi paid and where it did not.
SEMI_PHOTO_LEDGERS = {"on BCCD's blood-cell photographs (20 labeled)": "bccd",
                      "on chess-board photographs (20 labeled)": "chess",
                      "on the same chess splits continued for 900 steps": "chess_long"}


def semi_benchmark_figures(root: Path = LEDGER.parents[1] / "semi",
                           ledgers: dict[str, str] | None = None) -> list[str]:
    """The semi benchmark's paired results (converge, then continue; ledgers
    ``benchmarks/semi/<name>.json``; default :data:`SEMI_LEDGERS`, the demo's scenes): per ledger and
    semi arm with at least 2 seeds paired with labeled-only continued, the mean +- std of the paired AP
    difference, in AP points."""
    import statistics

    out = []
    for start, name in (SEMI_LEDGERS if ledgers is None else ledgers).items():
        path = root / f"{name}.json"
        if not path.is_file():
            continue
        runs = json.loads(path.read_text()).get("runs", {})
        labeled = {k.split("/seed")[1]: v["AP"] for k, v in runs.items() if k.startswith("labeled/") and v.get("AP")}
        arms = sorted({k.split("/")[0] for k in runs if k.startswith("semi")})
        for arm in arms:
            d = [(v["AP"] - labeled[k.split("/seed")[1]]) * 100 for k, v in runs.items()
                 if k.split("/")[0] == arm and v.get("AP") is not None and k.split("/seed")[1] in labeled]
            if len(d) >= 2:
                out.append(f"{start}, `{arm}` {statistics.mean(d):+.1f} +- {statistics.stdev(d):.1f} AP "
                           f"against labeled-only continued ({len(d)} seeds)")
    return out


def semi_note(semi: dict, ssl: dict, bench: list[str] | None = None, photos: list[str] | None = None) -> str:
    """The semi arm in words: AP against the SSL fine-tune it started from, its pseudo-labels, why it
    did not pay when it did not, and the semi benchmark's paired figures on the demo's scenes
    (``bench``) and on real photographs (``photos``; see :func:`semi_benchmark_figures`)."""
    s = semi.get("semi") or {}
    ap, base = semi["coco"]["AP"] * 100, ssl["coco"]["AP"] * 100
    health = s.get("pseudo_labels") or {}
    pr = ""
    if health.get("precision") is not None:
        pr = (f"; its pseudo-labels: {health['pseudo_boxes_per_image']:.2f} boxes per unlabeled image "
              f"(the labeled images have {health.get('labeled_boxes_per_image') or 0:.2f}), precision "
              f"{health['precision']:.2f} and recall {health['recall']:.2f} against the hidden ground truth")
    # Below half a point the two runs are within the demo's run-to-run spread: no verdict either way.
    word = ("improved it" if ap > base + 0.5 else "did not improve it" if ap < base - 0.5
            else "left it about where it was")
    why = ""
    if ap <= base + 0.5 and health.get("precision") is not None and health["precision"] < 0.5:
        why = (f" Fewer than half of the pseudo-boxes are right (a teacher of AP {base:.0f} on these scenes), so the "
               "unlabeled images teach more wrong boxes than right ones.")
    bench = semi_benchmark_figures() if bench is None else bench
    measured = (f" The semi benchmark on these scenes ({SEMI_BENCH}; BENCHMARKS.md): {'; '.join(bench)}."
                if bench else "")
    photos = semi_benchmark_figures(ledgers=SEMI_PHOTO_LEDGERS) if photos is None else photos
    if photos:
        measured += f" The same protocol on real photographs (BENCHMARKS.md): {'; '.join(photos)}."
    return (f"Unbiased Teacher from the SSL fine-tune ({s.get('deployed', '?')} weights deployed) {word}: AP "
            f"{ap:.1f} against {base:.1f} ({ap - base:+.1f} points, {semi.get('global_step')} more steps with "
            f"the unlabeled images){pr}.{why}{measured}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="folder of the demo's run directories")
    p.add_argument("--smoke", action="store_true", help="tiny settings (experiment=smoke), seconds")
    p.add_argument("--method", default="simclr", choices=sorted(DEMO_PRESETS),
                   help="pretraining method (default simclr: what learns in the demo's budget, README)")
    p.add_argument("--pretrain", default="", help="extra Hydra overrides for pretraining")
    p.add_argument("--finetune", default="", help="extra Hydra overrides for both fine-tunings")
    p.add_argument("--semi", default=None, help="Hydra overrides of the semi arm (default: SEMI_ARM)")
    p.add_argument("--no-semi", action="store_true", help="leave out the semi-supervised arm")
    p.add_argument("--sequential", action="store_true",
                   help="one stage at a time (default on a CPU: the random-init fine-tune runs beside "
                        "pretraining, each on half of torch's threads, OMP_NUM_THREADS or the cores)")
    a = p.parse_args()
    threads = None if a.sequential or torch.cuda.is_available() else torch.get_num_threads()
    exp = "experiment=smoke" if a.smoke else "experiment=demo"
    start = time.time()
    dirs = run_pipeline(
        a.out,
        pretrain=[*([f"method={a.method}", exp] if a.smoke else [DEMO_PRESETS[a.method]]), *shlex.split(a.pretrain)],
        finetune=[exp, *shlex.split(a.finetune)],
        baseline=True,
        semi=None if a.no_semi else (shlex.split(a.semi) if a.semi is not None
                                     else SEMI_ARM_SMOKE if a.smoke else SEMI_ARM),
        parallel_threads=threads,
    )
    pre = json.loads((dirs["finetune"] / "metrics.json").read_text())
    base = json.loads((dirs["baseline"] / "metrics.json").read_text())
    pretrain_metrics = json.loads((dirs["pretrain"] / "metrics.json").read_text())
    name = METHOD_NAMES[a.method]
    runs = {f"{name}-pretrained": pre, "random init": base}
    arms = [(f"{name}-pretrained", dirs["finetune"]), ("random init", dirs["baseline"])]
    semi = None
    if "semi" in dirs:
        semi = json.loads((dirs["semi"] / "metrics.json").read_text())
        runs = {f"{name} + Unbiased Teacher": semi, **runs}
        arms.insert(0, (f"{name} + Unbiased Teacher", dirs["semi"]))
    table = compare(runs)
    png = plot_predictions(
        pre["ann_file"],
        {name: d / "predictions.json" for name, d in arms},
        Path(a.out) / "predictions_vs_ground_truth.png",
        image_root=pre.get("image_root"),
    )
    text = "\n".join([
        "COCO box AP (%) on the synthetic validation set, Faster R-CNN R18-FPN:",
        "",
        table,
        "",
        verdict(pre, base, pretrain_metrics),
        *([semi_note(semi, pre)] if semi is not None else []),
        "",
        f"predictions against ground truth: {png}",
        f"run directories: {', '.join(str(d) for d in dirs.values())}",
        f"time for this invocation: {(time.time() - start) / 60:.1f} min (finished stages are skipped on re-runs)",
    ])
    (Path(a.out) / "summary.txt").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()

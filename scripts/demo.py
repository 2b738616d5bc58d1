"""The whole pipeline on the built-in synthetic data, on a CPU, in minutes.

SwAV pretraining on the unlabeled scenes, Faster R-CNN fine-tuning from that backbone,
the same fine-tuning from random init, COCO evaluation of both, a side-by-side table,
a PNG of predictions against ground truth, and a plain verdict.

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

from finetune.pipeline import run_pipeline
from finetune.plots import plot_predictions
from finetune.report import compare


def pretraining_health(pretrain: dict) -> str:
    """One clause on how SwAV's pretraining went, from its metrics.json (empty when unknown)."""
    loss, k = pretrain.get("final_loss"), pretrain.get("num_prototypes")
    if loss is None or not k:
        return ""
    diag = pretrain.get("diagnostics") or {}
    cos, entropy, knn = diag.get("swav_embedding_cos"), diag.get("swav_code_entropy"), pretrain.get("knn_top1")
    parts = [f"SwAV's loss ended at {loss:.3f} against ln(num_prototypes) = {math.log(k):.3f}"]
    if cos is not None and entropy is not None:
        parts.append(f"different images' embeddings at mean cosine {cos:.2f}, the codes at "
                     f"{entropy:.0%} of the maximum entropy")
    if knn is not None:
        parts.append(f"kNN top-1 on the validation boxes {knn:.3f}")
    return ", ".join(parts) + f" after {pretrain.get('global_step')} steps"


def verdict(pre: dict, base: dict, pretrain: dict) -> str:
    ap_p, ap_b = pre["coco"]["AP"], base["coco"]["AP"]
    delta = (ap_p - ap_b) * 100
    health = pretraining_health(pretrain)
    health_note = f" Pretraining: {health}." if health else ""
    if delta > 0:
        rel = f" ({ap_p / ap_b:.2f}x)" if ap_b > 0 else ""
        return (f"The pretrained backbone helped: AP {ap_p * 100:.1f} against {ap_b * 100:.1f} "
                f"from random init, {delta:+.1f} points{rel}, with identical fine-tuning.{health_note}")
    why = ("With this little pretraining the features are not yet better than what fine-tuning "
           f"learns from scratch; pretrain longer (trainer.max_epochs) or on more unlabeled images.{health_note}")
    loss, k = pretrain.get("final_loss"), pretrain.get("num_prototypes")
    if loss is not None and k and abs(loss - math.log(k)) < 0.05:
        why = (f"SwAV collapsed: {health}, so the backbone learned little that transfers. The loss at "
               "ln(num_prototypes) means uniform assignments: SwAV did not get past its first phase. "
               "The README's demo section lists what gets it out on this data (grayscale views, "
               "prediction temperature 0.3, SGD instead of LARS); otherwise pretrain longer.")
    return (f"The pretrained backbone did NOT help here: AP {ap_p * 100:.1f} against {ap_b * 100:.1f} "
            f"from random init ({delta:+.1f} points). " + why)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="folder of the demo's run directories")
    p.add_argument("--smoke", action="store_true", help="tiny settings (experiment=smoke), seconds")
    p.add_argument("--pretrain", default="", help="extra Hydra overrides for pretraining")
    p.add_argument("--finetune", default="", help="extra Hydra overrides for both fine-tunings")
    a = p.parse_args()
    exp = "experiment=smoke" if a.smoke else "experiment=demo"
    start = time.time()
    dirs = run_pipeline(
        a.out,
        pretrain=["method=swav", exp, *shlex.split(a.pretrain)],
        finetune=["detector=fasterrcnn", exp, *shlex.split(a.finetune)],
        baseline=True,
    )
    pre = json.loads((dirs["finetune"] / "metrics.json").read_text())
    base = json.loads((dirs["baseline"] / "metrics.json").read_text())
    pretrain_metrics = json.loads((dirs["pretrain"] / "metrics.json").read_text())
    runs = {"SwAV-pretrained": pre, "random init": base}
    table = compare(runs)
    png = plot_predictions(
        pre["ann_file"],
        {name: d / "predictions.json" for name, d in (("SwAV-pretrained", dirs["finetune"]),
                                                         ("random init", dirs["baseline"]))},
        Path(a.out) / "predictions_vs_ground_truth.png",
        image_root=pre.get("image_root"),
    )
    text = "\n".join([
        "COCO box AP (%) on the synthetic validation set, Faster R-CNN R18-FPN:",
        "",
        table,
        "",
        verdict(pre, base, pretrain_metrics),
        "",
        f"predictions against ground truth: {png}",
        f"run directories: {', '.join(str(d) for d in dirs.values())}",
        f"time for this invocation: {(time.time() - start) / 60:.1f} min (finished stages are skipped on re-runs)",
    ])
    (Path(a.out) / "summary.txt").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()

"""Run the stages one after another, passing the exported backbone explicitly.

    python scripts/pipeline.py --out outputs/pipeline/run1 \
        --pretrain "method=swav data.root=/data/unlabeled" \
        --finetune "data=coco data.root=/data/labeled" --baseline \
        --semi "semi=unbiased_teacher semi.unlabeled=/data/unlabeled"

Re-running the same command skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import shlex

from finetune.pipeline import run_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder holding one run directory per stage")
    p.add_argument("--pretrain", default="", help="Hydra overrides for `python -m pretrain` (one string)")
    p.add_argument("--finetune", default="", help="Hydra overrides for `python -m finetune` (one string)")
    p.add_argument("--baseline", action="store_true", help="also fine-tune from random init, same overrides")
    p.add_argument("--no-pretrain", action="store_true", help="only the random-init fine-tune")
    p.add_argument("--semi", default=None,
                   help="Hydra overrides of a semi stage that starts from the fine-tuned detector (one string)")
    p.add_argument("--semi-baseline", action="store_true", help="also run the semi stage after the baseline")
    a = p.parse_args()
    dirs = run_pipeline(
        a.out, shlex.split(a.pretrain), shlex.split(a.finetune), baseline=a.baseline, skip_pretrain=a.no_pretrain,
        semi=shlex.split(a.semi) if a.semi is not None else None,
        semi_from=("finetune", "baseline") if a.semi_baseline else ("finetune",),
    )
    for stage, d in dirs.items():
        print(f"{stage:>9}: {d}")


if __name__ == "__main__":
    main()

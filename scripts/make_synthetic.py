"""Generate the built-in synthetic detection set (textured shapes) used by the demo and the tests.

Example:
    python scripts/make_synthetic.py --out data/synthetic --seed 0
"""

from __future__ import annotations

import argparse
import logging

from finetune.data.report import format_report, summarize
from pretrain.core.data.synthetic import ensure_synthetic, make_synthetic


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (train.json, val.json, unlabeled/ ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=300)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-unlabeled", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--force", action="store_true", help="regenerate even if the folder is up to date")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kwargs = {"seed": args.seed, "num_train": args.num_train, "num_val": args.num_val,
              "num_unlabeled": args.num_unlabeled, "image_size": args.image_size}
    out = make_synthetic(args.out, **kwargs) if args.force else ensure_synthetic(args.out, **kwargs)
    for key in ("train_json", "val_json"):
        print(format_report(summarize(out[key])))
    print(f"unlabeled images: {out['unlabeled']} ({out['params']['num_unlabeled']})")


if __name__ == "__main__":
    main()

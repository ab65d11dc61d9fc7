#!/usr/bin/env python
"""Build the tiny offline tokenizer, model and synthetic preference data.

    python scripts/make_tiny_assets.py --out .tiny

Same as ``ray-dpo make-assets``; idempotent (a complete build is reused).
"""

import argparse

from ray_dpo.testing.assets import make_tiny_assets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".tiny", help="output directory (default: .tiny)")
    parser.add_argument("--n-train", type=int, default=512, help="training pairs")
    parser.add_argument("--n-eval", type=int, default=128, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and model init")
    parser.add_argument("--format", default="standard", choices=("standard", "conversational"),
                        help="row format of the written data")
    parser.add_argument("--shards", type=int, default=2, help="number of training shards")
    args = parser.parse_args(argv)
    paths = make_tiny_assets(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                             fmt=args.format, shards=args.shards)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

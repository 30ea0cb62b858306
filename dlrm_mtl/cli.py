"""``dlrm-mtl`` command line: generate, train."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _generate(args: argparse.Namespace) -> int:
    from dlrm_mtl.synthetic import describe, generate

    generate(args.out, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} rows to {args.out}/train, {args.out}/eval and {args.out}/schema.yaml")
    for r in describe(f"{args.out}/train"):
        print(f"  leaf {r['leaf']}: {r['rows']:>9} train rows  ctr {r['ctr']:.3f}  cvr {r['cvr']:.3f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dlrm_mtl.config import Config
    from dlrm_mtl.train import train

    cfg = Config.load(args.config, args.set)
    train(cfg)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-mtl", description="Multi-scenario multi-task ranking on TorchRec.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="write the synthetic data set with ground truth")
    g.add_argument("--out", required=True, help="output directory (train/, eval/, schema.yaml)")
    g.add_argument("--rows", type=int, default=1_000_000)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=_generate)

    t = sub.add_parser("train", help="train (one process, or one rank under torchrun/TorchX)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=2")
    t.set_defaults(fn=_train)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

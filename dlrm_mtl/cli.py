"""``dlrm-mtl`` command line: generate, convert, train, evaluate, export-checkpoint, export, compare, report, plan, inspect-data, dense-stats."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dlrm_mtl.synthetic import SyntheticSpec, describe, generate

    spec = replace(SyntheticSpec(), esm2=args.esm2, regression=args.regression, position_bias=args.position_bias,
                   cvr_loss_space=args.cvr_loss_space, child_on_parent=args.child_on_parent,
                   request_size=args.request_size, sequence_len=args.sequence_len)
    generate(args.out, rows=args.rows, seed=args.seed, spec=spec)
    print(f"wrote {args.rows} rows to {args.out}/train, {args.out}/eval and {args.out}/schema.yaml")
    for r in describe(f"{args.out}/train"):
        print(f"  leaf {r['leaf']}: {r['rows']:>9} train rows  ctr {r['ctr']:.3f}  cvr {r['cvr']:.3f}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dlrm_mtl.datasets import ConvertOptions, convert

    extra = {}
    for kv in args.opt:
        if "=" not in kv:
            print(f"dlrm-mtl convert: --opt {kv!r}: expected key=value", file=sys.stderr)
            return 2
        k, v = kv.split("=", 1)
        extra[k.strip()] = v.strip()
    opts = ConvertOptions(row_group_rows=args.row_group_rows, file_rows=max(args.file_rows, args.row_group_rows),
                          seed=args.seed, limit=args.limit, extra=extra, split=args.split)
    try:
        convert(args.name, args.raw, args.out, opts)
    except FileNotFoundError as e:
        print(f"dlrm-mtl convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def quiet_third_party_logs() -> None:
    """Hide the stack's deprecation chatter (TorchRec planner notices, torch FutureWarnings,
    fbgemm import notes) so the run's own log is readable; DLRM_MTL_VERBOSE=1 keeps it."""
    import logging
    import os
    import warnings

    if os.environ.get("DLRM_MTL_VERBOSE"):
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|torchrec|fbgemm_gpu)\b.*")
    for name in ("torchrec", "torch.fx", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _timed_stack_import() -> float:
    """Imports torch, torchrec and fbgemm_gpu; returns the seconds it took (0 when already
    imported), reported as ``import_s`` next to the run's start-up time."""
    import time

    t0 = time.perf_counter()
    import fbgemm_gpu  # noqa: F401
    import torch  # noqa: F401
    import torchrec  # noqa: F401

    return time.perf_counter() - t0


def _train(args: argparse.Namespace) -> int:
    from dlrm_mtl import start_up_gc

    start_up_gc.pause()  # until the first step (dlrm_mtl/start_up_gc.py)
    quiet_third_party_logs()
    from dlrm_mtl.config import Config, check, check_values
    from dlrm_mtl.schema import Schema

    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume is not None else [])
    # config and schema mistakes end here, before any process group starts (under torchrun
    # every rank fails alike, before the rendezvous); most even before the stack is imported
    cfg = Config.load(args.config, overrides)
    schema = Schema.load(cfg.data.schema_path())
    check_values(cfg, schema)
    import_s = _timed_stack_import()
    check(cfg, schema)
    from dlrm_mtl.train import train

    train(cfg, import_s=import_s)
    return 0


def _export_checkpoint(args: argparse.Namespace) -> int:
    from dlrm_mtl.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out, with_optimizer=args.with_optimizer)
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB (step {info['step']})")
    return 0


def _export(args: argparse.Namespace) -> int:
    quiet_third_party_logs()
    from dlrm_mtl.export import export_model

    sig = export_model(args.checkpoint, args.out, config=args.config)
    outputs = ", ".join(o["name"] for o in sig["outputs"])
    print(f"wrote {args.out}/model.pt2 and {args.out}/signature.json (step {sig['step']}): "
          f"{len(sig['inputs'])} inputs, outputs {outputs}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from dlrm_mtl.metrics import format_table

    path = Path(args.run_dir) / "metrics.json"
    if not path.exists():
        print(f"{path}: not found (did the training run finish?)", file=sys.stderr)
        return 1
    result = json.loads(path.read_text())
    tp = result["throughput"]
    print(f"\n{args.run_dir}: {tp['rows_trained']:,} rows trained in {tp['train_seconds']:.1f}s on "
          f"{tp['world_size']} rank(s): {tp['samples_per_s']:,.0f} samples/s")
    print(format_table(result["metrics"]))
    print(f"\nTensorBoard: {sys.executable} -m tensorboard.main --logdir {args.run_dir}/tb  (then open http://localhost:6006)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from dlrm_mtl.inspect_data import format_report, inspect_data
    from dlrm_mtl.schema import Schema

    report = inspect_data(Schema.load(args.schema), args.data, world_size=args.world_size, batch_size=args.batch_size)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _dense_stats(args: argparse.Namespace) -> int:
    from dlrm_mtl.inspect_data import dense_stats
    from dlrm_mtl.schema import Schema

    schema = dense_stats(Schema.load(args.schema), args.data)
    schema.save(args.out)
    for d in schema.dense:
        print(f"{d.name:<20} mean {d.mean:.6g}  std {d.std:.6g}")
    print(f"wrote {args.out} (standardize: true on every dense feature)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    quiet_third_party_logs()
    from dlrm_mtl.config import Config, check
    from dlrm_mtl.schema import Schema

    cfg = Config.load(args.config, args.set)
    check(cfg, Schema.load(cfg.data.schema_path()))  # before the process group starts
    from dlrm_mtl.evaluate import evaluate_checkpoint

    evaluate_checkpoint(cfg, args.checkpoint, args.data or cfg.data.eval, args.out)
    return 0


def _predict(args: argparse.Namespace) -> int:
    quiet_third_party_logs()
    from dlrm_mtl.config import Config, check
    from dlrm_mtl.schema import Schema

    cfg = Config.load(args.config, args.set)
    check(cfg, Schema.load(cfg.data.schema_path()))  # before the process group starts
    from dlrm_mtl.predict import predict

    out = predict(cfg, args.checkpoint, args.data, args.out, keep=args.keep)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[dlrm_mtl] predict: {out['rows']:,} rows scored into {args.out} ({out['parts']} part(s), "
              f"{out['seconds']:.1f}s)", flush=True)
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from dlrm_mtl.compare import compare_runs, format_comparison

    try:
        rows = compare_runs(args.run_a, args.run_b)
    except (FileNotFoundError, ValueError) as e:
        print(f"dlrm-mtl compare: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_comparison(rows, args.run_a, args.run_b))
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from dlrm_mtl.config import Config, ConfigError, check
    from dlrm_mtl.schema import Schema

    quiet_third_party_logs()
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    cfg = Config.load(args.config, args.set)
    if args.memory_per_rank is not None:
        cfg.sharding.memory_per_rank_gb = args.memory_per_rank
    check(cfg, Schema.load(cfg.data.schema_path()))
    from dlrm_mtl.plan import format_plan, sharding_plan

    summary = sharding_plan(cfg, args.world_size, device=args.device)
    print(json.dumps(summary, indent=2) if args.json else format_plan(summary))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-mtl", description="Multi-scenario multi-task ranking on TorchRec.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="write the synthetic data set with ground truth")
    g.add_argument("--out", required=True, help="output directory (train/, eval/, schema.yaml)")
    g.add_argument("--rows", type=int, default=1_000_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--esm2", action="store_true", help="ESM² split: deterministic action d_action between click and buy")
    g.add_argument("--regression", action="store_true", help="add a completion-ratio regression task on clicked rows")
    g.add_argument("--position-bias", action="store_true", help="schema: position feeds a bias tower on ctr, not the model")
    g.add_argument("--cvr-loss-space", choices=["entire", "parent_positive"], default="entire",
                   help="schema: train cvr on the entire space (ESMM) or on clicked rows (PLE mask)")
    g.add_argument("--child-on-parent", type=float, default=0.0, metavar="W",
                   help="the conversion logit gains W x the click's latent (task-relation heads; 0: off)")
    g.add_argument("--request-size", type=int, default=0, metavar="N",
                   help="request groups of N rows (column request_id, schema group_id) with a request-level "
                        "click effect, for loss.ranking (0: off)")
    g.add_argument("--sequence-len", type=int, default=0, metavar="L",
                   help="behaviour sequences of up to L events (hist_items with aligned hist_item_categories and "
                        "hist_ages; schema sequence features) whose recent same-category events raise the click (0: off)")
    g.set_defaults(fn=_generate)

    from dlrm_mtl.datasets import CONVERTERS
    from dlrm_mtl.datasets.common import DEFAULT_FILE_ROWS, DEFAULT_ROW_GROUP_ROWS

    c = sub.add_parser("convert", help="convert a public data set download (datasets/<name>/README.md) to Parquet + schema")
    c.add_argument("name", choices=sorted(CONVERTERS))
    c.add_argument("--raw", required=True, help="directory of the unpacked raw download")
    c.add_argument("--out", required=True, help="output directory (train/, eval/ or test/, schema.yaml, conversion.json)")
    c.add_argument("--row-group-rows", type=int, default=DEFAULT_ROW_GROUP_ROWS)
    c.add_argument("--file-rows", type=int, default=DEFAULT_FILE_ROWS, help="rows per Parquet part file")
    c.add_argument("--seed", type=int, default=0, help="seed of the hashed split where there is no official one")
    c.add_argument("--split", default=None, metavar="F[,G]",
                   help="for a download shipped as one file: fraction F of the rows to train, G to eval, the rest to "
                        "eval (or test with G), by a seeded hash of each row's line number (same as --opt split=F)")
    c.add_argument("--limit", type=int, default=0, help="read at most this many lines per raw file (smoke runs)")
    c.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="converter option, e.g. countries=NL,US (aliexpress)")
    c.set_defaults(fn=_convert)

    t = sub.add_parser("train", help="train (one process, or one rank under torchrun/TorchX)")
    t.add_argument("--config", action="append", default=[], help="YAML config file; repeat to compose (later files override earlier)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=2")
    t.add_argument("--resume", default=None, metavar="auto|none|DIR",
                   help="checkpoint.resume: auto = the latest complete checkpoint of the run, or a checkpoint directory")
    t.set_defaults(fn=_train)

    x = sub.add_parser("export-checkpoint", help="write a sharded checkpoint as one unsharded torch.save file")
    x.add_argument("--checkpoint", required=True, help="a checkpoint directory, e.g. RUN_DIR/checkpoints/final")
    x.add_argument("--out", required=True, help="output file (.pt)")
    x.add_argument("--with-optimizer", action="store_true", help="also export the optimizer states")
    x.set_defaults(fn=_export_checkpoint)

    xm = sub.add_parser("export", help="write the serving model (torch.export, runs without dlrm_mtl and TorchRec) and its signature")
    xm.add_argument("--checkpoint", required=True, help="a checkpoint directory, e.g. RUN_DIR/checkpoints/final")
    xm.add_argument("--out", required=True, help="output directory (model.pt2, signature.json)")
    xm.add_argument("--config", default=None, help="the run's config (default: RUN_DIR/config.yaml of RUN_DIR/checkpoints/NAME)")
    xm.set_defaults(fn=_export)

    i = sub.add_parser("inspect-data", help="validate a data set against its schema and summarise it")
    i.add_argument("--schema", required=True)
    i.add_argument("--data", required=True, nargs="+", help="files, directories, globs or URIs")
    i.add_argument("--world-size", type=int, default=1, help="show the row groups each rank would read")
    i.add_argument("--batch-size", type=int, default=2048, help="per-rank batch size for the steps per epoch")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(fn=_inspect)

    d = sub.add_parser("dense-stats", help="compute dense feature mean/std and write a standardizing schema")
    d.add_argument("--schema", required=True)
    d.add_argument("--data", required=True, nargs="+")
    d.add_argument("--out", required=True, help="schema file to write")
    d.set_defaults(fn=_dense_stats)

    e = sub.add_parser("evaluate", help="metrics of a checkpoint on a data set (one or several ranks)")
    e.add_argument("--config", required=True, help="the run's config (RUN_DIR/config.yaml)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--checkpoint", required=True, help="e.g. RUN_DIR/checkpoints/final")
    e.add_argument("--data", default=None, help="default: data.eval of the config")
    e.add_argument("--out", required=True, help="directory for metrics.json")
    e.set_defaults(fn=_evaluate)

    pr = sub.add_parser("predict", help="per-row probabilities and fused score of a checkpoint, to Parquet (one or several ranks)")
    pr.add_argument("--config", required=True, help="the run's config (RUN_DIR/config.yaml)")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. predict.fusion={ctr: 1, ctcvr: 2}")
    pr.add_argument("--checkpoint", required=True, help="e.g. RUN_DIR/checkpoints/final")
    pr.add_argument("--data", required=True, help="Parquet file, directory, glob or URI to score (labels may be absent)")
    pr.add_argument("--out", required=True, help="new directory: part-<rank>.parquet, then _SUCCESS")
    pr.add_argument("--keep", nargs="*", default=[], help="input columns copied to the output (user id, request id, ...)")
    pr.set_defaults(fn=_predict)

    pl = sub.add_parser("plan", help="print the TorchRec sharding plan for a world size, without training")
    pl.add_argument("--config", action="append", default=[], help="YAML config file; repeat to compose (later files override earlier)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--world-size", type=int, required=True)
    pl.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pl.add_argument("--memory-per-rank", type=float, default=None, help="GB per rank (default: sharding.memory_per_rank_gb)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=_plan)

    c = sub.add_parser("compare", help="per scenario x task differences and MTL gain (PLE eq. 11) of two runs")
    c.add_argument("run_a", help="the run to judge (e.g. the multi-task model): RUN_DIR or its metrics.json")
    c.add_argument("run_b", help="the baseline (e.g. the single-task model): RUN_DIR or its metrics.json")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_compare)

    r = sub.add_parser("report", help="print the scenario x task metrics table of a finished run")
    r.add_argument("run_dir")
    r.set_defaults(fn=_report)

    args = p.parse_args(argv)
    from dlrm_mtl.config import ConfigError
    from dlrm_mtl.data.errors import DataError
    from dlrm_mtl.schema import SchemaError

    try:
        return args.fn(args)
    except Exception as e:
        if not isinstance(e, (DataError, SchemaError, ConfigError)):
            from dlrm_mtl.checkpoint import CheckpointError  # here, not above: it imports torch

            if not isinstance(e, CheckpointError):
                raise
        text = " ".join(str(e).split("\n")) if isinstance(e, (ConfigError, SchemaError)) else str(e)
        print(f"dlrm-mtl {args.cmd}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``dlrm-mtl plan``: the sharding plan for a world size, without training.

Runs the very planner that training uses (:func:`dlrm_mtl.distributed.make_planner`, same
constraints and sharder) in this one process, for any world size, and reports per table
the sharding type, compute kernel and ranks, and per rank the estimated storage of the
embedding shards (weights plus optimizer state, TorchRec's estimate) and its imbalance.

Example::

    summary = sharding_plan(cfg, world_size=8)
    print(format_plan(summary))
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from dlrm_mtl.config import Config, ConfigError
from dlrm_mtl.distributed import (
    DistEnv,
    apply_table_optimizers,
    make_planner,
    memory_per_rank_bytes,
    plan_summary,
    table_sharders,
)
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
from dlrm_mtl.schema import Schema


def sharding_plan(cfg: Config, world_size: int, device: str = "cpu", local_world_size: int = 0) -> Dict[str, Any]:
    """Plans ``cfg``'s tables over ``world_size`` ranks; returns tables, per-rank storage, imbalance."""
    if world_size < 1:
        raise ConfigError(f"the world size (--world-size) must be >= 1, got {world_size}")
    schema = Schema.load(cfg.data.schema_path())
    module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("meta")), EntireSpaceLoss(schema, cfg.loss))
    optimizers = apply_table_optimizers(module.model, cfg, ddp=False)  # planning only: no DDP
    env = DistEnv(0, world_size, 0, local_world_size or world_size, torch.device(device), "gloo" if device == "cpu" else "nccl")
    planner = make_planner(cfg, env, schema, world_size=world_size)
    plan = planner.plan(module, table_sharders(cfg.sharding.bounds_check))
    per_rank = [0] * world_size
    for option in planner._best_plan or []:  # TorchRec keeps the chosen options' estimates here
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                per_rank[shard.rank] += shard.storage.hbm if device == "cuda" else shard.storage.ddr
    mean = sum(per_rank) / max(1, world_size)
    return {
        "world_size": world_size,
        "device": device,
        "memory_per_rank_gb": memory_per_rank_bytes(cfg, device, env.local_world_size) / 1024**3,
        "tables": {t: dict(p, optimizer=optimizers[t]) for t, p in plan_summary(plan).items()},
        "bytes_per_rank": per_rank,
        "imbalance": (max(per_rank) / mean) if mean else 1.0,
    }


def format_plan(summary: Dict[str, Any]) -> str:
    lines = [f"sharding plan for {summary['world_size']} rank(s) on {summary['device']} "
             f"(capacity {summary['memory_per_rank_gb']:.1f} GB per rank)",
             f"{'table':<14} {'sharding':<16} {'kernel':<10} {'optimizer':<28} ranks"]
    for table, p in summary["tables"].items():
        ranks: List[int] = p["ranks"]  # type: ignore[assignment]
        shown = ",".join(map(str, ranks)) if len(ranks) <= 16 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"
        lines.append(f"{table:<14} {p['sharding_type']:<16} {p['compute_kernel']:<10} {p.get('optimizer', ''):<28} {shown}")
    lines.append("estimated embedding storage per rank (weights + optimizer state):")
    for r, b in enumerate(summary["bytes_per_rank"]):
        lines.append(f"  rank {r:<3} {b / 2**20:10.2f} MiB")
    lines.append(f"imbalance (max / mean): {summary['imbalance']:.3f}")
    return "\n".join(lines)

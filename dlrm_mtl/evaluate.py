"""Evaluation: the loop over a stream (:func:`evaluate`, used by training too) and
``dlrm-mtl evaluate``, the metrics of a checkpoint on a data set, on one or several ranks.

Builds the model exactly as training does (same planner, so any world size works: DCP
reshards the tables on load), loads the ``model`` entry of a checkpoint written by
``dlrm-mtl train`` (``RUN_DIR/checkpoints/final``), streams ``--data`` split by row group
across ranks and writes ``metrics.json`` (same format as training) plus the table.

Example::

    torchrun --nproc_per_node 2 -m dlrm_mtl evaluate --config runs/demo/config.yaml \\
        --checkpoint runs/demo/checkpoints/final --data data/synthetic/eval --out runs/demo/eval
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from dlrm_mtl.checkpoint import is_complete, safe_dcp_load
from dlrm_mtl.config import Config
from dlrm_mtl.data import ParquetStream
from dlrm_mtl.distributed import init_distributed, reader_threads, shard_model, shutdown_distributed
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.metrics import MetricAccumulator, format_table
from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
from dlrm_mtl.schema import Schema
from dlrm_mtl.watchdog import report, stop_point
from dlrm_mtl.utilisation import ExpertUtilisation


def evaluate(
    dmp: torch.nn.Module, stream: ParquetStream, schema: Schema, device: torch.device,
    utilisation: Optional[ExpertUtilisation] = None, max_batches: int = 0,
) -> List[Dict[str, object]]:
    """Runs the model over ``stream`` and returns exact, rank-merged metric rows, identical on
    every rank (and fills ``utilisation`` with the gate weights, when given). ``max_batches``
    > 0: the stream's first batches only; every rank must pass the same number (its stream
    is padded to the longest rank's length, so each rank then runs the same forwards)."""
    acc = MetricAccumulator(schema)
    dmp.eval()
    batches = iter(stream)
    try:
        with torch.no_grad():
            for i, batch in enumerate(itertools.islice(batches, max_batches or None)):
                report(i, "eval batch")
                stop_point("eval", i, stream.rank)
                batch = batch.to(device, non_blocking=True)
                _, (logits, _, gates, _) = dmp(batch)
                acc.update(batch, logits)
                if utilisation is not None:
                    utilisation.update(gates, batch.scenario, batch.real)
    finally:
        batches.close()  # a stream stopped early: its reader thread ends now, not at garbage collection
    dmp.train()
    return acc.compute()


def evaluate_checkpoint(cfg: Config, checkpoint: str, data: str, out_dir: str) -> Dict[str, Any]:
    if not is_complete(Path(checkpoint)):
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no .metadata or no COMPLETE marker)")
    env = init_distributed(cfg.train.backend, cfg.train.timeout_s, cfg.train.threads_per_rank)
    try:
        schema = Schema.load(cfg.data.schema_path())
        module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("meta")), EntireSpaceLoss(schema, cfg.loss))
        dmp, _, _ = shard_model(module, cfg, env, schema)
        state = {"model": dmp.state_dict()}
        safe_dcp_load(state, Path(checkpoint))  # runs no code from the checkpoint
        dmp.load_state_dict(state["model"])
        prefetch, workers = reader_threads(cfg.data, env)
        stream = ParquetStream(schema, data, cfg.data.eval_rows_per_batch(), env.rank, env.world_size, prefetch_batches=prefetch,
                               num_workers=workers, background_priority=cfg.data.background_priority)
        metrics = evaluate(dmp, stream, schema, env.device)
        result = {"metrics": metrics, "checkpoint": str(checkpoint), "data": str(data), "world_size": env.world_size}
        if env.is_main:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(result, indent=2))
            print(format_table(metrics))
            print(f"[dlrm_mtl] wrote {out}/metrics.json")
        return result
    finally:
        shutdown_distributed()

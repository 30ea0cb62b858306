"""``dlrm-mtl export-checkpoint``: a sharded checkpoint as one unsharded ``torch.save`` file.

The DCP shards of every table are assembled into full tensors in this one process (no
process group, no TorchRec), so the output loads into an unsharded model anywhere::

    dlrm-mtl export-checkpoint --checkpoint runs/demo/checkpoints/final --out model.pt

    sd = torch.load("model.pt")
    sd["model"]      # {"model.ebc.embedding_bags.t_user.weight": [500000, 16], "model.dense...": ...}
    sd["trainer"]    # step, epoch, plan, config of the checkpoint (trainer/state.json)
    module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model), EntireSpaceLoss(schema, cfg.loss))
    module.load_state_dict(sd["model"])

Memory: the whole state (every table) is held once in host memory.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict

import torch

from dlrm_mtl.checkpoint import CheckpointError, SafeFileSystemReader, is_complete


def load_unsharded(checkpoint: str | Path, with_optimizer: bool = False) -> Dict[str, Any]:
    """``{"model": {name: full tensor}, ["optim": ...,] "trainer": {...}}`` of a checkpoint."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    path = Path(checkpoint)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker or no .metadata)")
    keys = {"model", "optim"} if with_optimizer else {"model"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading into this process" is the intent
        # the .metadata file through the allow-listed reader (it is a pickle)
        sd = _load_state_dict_from_keys(keys, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(str(path)))
    state_file = path / "trainer" / "state.json"
    sd["trainer"] = json.loads(state_file.read_text()) if state_file.exists() else {}
    return sd


def export_checkpoint(checkpoint: str | Path, out: str | Path, with_optimizer: bool = False) -> Dict[str, Any]:
    """Writes :func:`load_unsharded` to ``out``; returns counts for the command's message."""
    sd = load_unsharded(checkpoint, with_optimizer)
    tensors = [t for t in _tensors(sd)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out)
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "step": sd["trainer"].get("step")}


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)

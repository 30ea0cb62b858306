"""Process group, sharding plan and DistributedModelParallel (docs/scaling.md).

torchrun semantics: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT. A
plain ``python -m dlrm_mtl train`` (no torchrun) runs as a world of one over a loopback
store, through the very same DMP code path.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dlrm_mtl.config import Config, DataConfig
from dlrm_mtl.models import MultiScenarioMultiTaskModel
from dlrm_mtl.models.local_lookup import LocalPooledLookup
from dlrm_mtl.schema import Schema
from dlrm_mtl.training_optimizer import TrainingOptimizer


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# rendezvous variables init_distributed set itself (a process not launched by torchrun);
# shutdown_distributed removes them, so a later in-process run or a child process does not
# inherit a stale MASTER_PORT / RANK
_STANDALONE_ENV: List[str] = []


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, ``taskset``),
    else the machine's count. A rank's default intra-op threads share these between the
    host's ranks: ``os.cpu_count()`` counts the machine's, and a team of 64 threads on a cpuset
    of 8 cores time-slices every parallel region."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def init_distributed(backend: str = "auto", timeout_s: int = 120, threads_per_rank: int = 0) -> DistEnv:
    """Initialises the default process group (gloo on CPU, NCCL on GPU) from torchrun's env
    (a world of one on a free local port when not launched by torchrun)."""
    if "RANK" not in os.environ:
        standalone = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        for k, v in standalone.items():
            if k not in os.environ:
                os.environ[k] = v
                _STANDALONE_ENV.append(k)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank or max(1, usable_cores() // local_world))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(rank, world, timeout)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistEnv(rank, world, local_rank, local_world, device, backend)


def reader_threads(data: DataConfig, env: DistEnv) -> Tuple[int, int]:
    """``(prefetch_batches, num_workers)`` with ``-1`` (auto) resolved: background reading
    only where this rank has a core its intra-op threads leave free. On GPU the intra-op
    threads are idle (the device computes), so the rank's cores less the training thread and
    the batch-converting reader thread read row groups: up to 4, 8 batches queued."""
    per_rank = usable_cores() // max(1, env.local_world_size)
    if env.device.type == "cuda":
        auto_prefetch, auto_workers = 8, min(4, max(1, per_rank - 2))
    else:
        spare = per_rank - torch.get_num_threads()
        auto_prefetch, auto_workers = (4, min(2, spare)) if spare >= 1 else (0, 0)
    prefetch = data.prefetch_batches if data.prefetch_batches >= 0 else auto_prefetch
    workers = data.num_workers if data.num_workers >= 0 else auto_workers
    return prefetch, workers


def cache_bytes(data: DataConfig, env: DistEnv) -> int:
    """``data.cache_mb`` in bytes, with -1 (auto) resolved: a tenth of the memory available now
    over this host's ranks (per stream: train and eval together a fifth), at most 4 GiB (0
    where the available memory is unknown)."""
    if data.cache_mb >= 0:
        return data.cache_mb * 2**20
    from dlrm_mtl.memory import available_memory_bytes

    avail = available_memory_bytes()
    if avail is None:
        return 0
    return int(min(4 * 2**30, avail // 10 // max(1, env.local_world_size)))


def shutdown_distributed() -> None:
    """Destroys the default process group and removes the rendezvous variables that
    :func:`init_distributed` set for a standalone process."""
    if dist.is_initialized():
        dist.destroy_process_group()
    while _STANDALONE_ENV:
        os.environ.pop(_STANDALONE_ENV.pop(), None)


def _restart_store(rank: int, world: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """After a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0): the rendezvous store, its
    keys prefixed by the attempt.

    torchrun's c10d agent keeps one store across restarts, so the keys that
    ``dist.new_group`` (which DMP calls) publishes are still there from the killed attempt,
    and a restarted rank connects to a dead peer's old address ("Gloo connectFullMesh
    failed ... Connection refused"). A per-attempt prefix keeps every attempt apart.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0:
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    tcp = dist.TCPStore(host, port, world, is_master=(not agent_store and rank == 0), timeout=timeout,
                        multi_tenant=not agent_store)
    return dist.PrefixStore(f"/dlrm_mtl/attempt_{attempt}", tcp)


class CPUWideEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock sharder offers row_wise / table_row_wise / grid_shard on GPU only; on CPU
    they work too (their forward matched an unsharded reference to ~4e-9 on CPU + gloo), so offer them."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(super().sharding_types(compute_device_type))
        for t in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if t not in types:
                types.append(t)
        return types


def make_planner(cfg: Config, env: DistEnv, schema: Schema, world_size: Optional[int] = None) -> EmbeddingShardingPlanner:
    """The planner used by training and ``dlrm-mtl plan`` alike, for the tables of ``schema``."""
    ws = world_size or env.world_size
    compute = "cuda" if env.device.type == "cuda" else "cpu"
    cap = memory_per_rank_bytes(cfg, compute, env.local_world_size)
    topo = Topology(
        world_size=ws,
        compute_device=compute,
        hbm_cap=cap if compute == "cuda" else None,
        ddr_cap=cap if compute == "cpu" else None,
        local_world_size=min(env.local_world_size, ws),
    )
    tables = {f.table for f in schema.sparse + schema.sequence}
    unknown = set(cfg.sharding.tables) - tables
    if unknown:
        raise ValueError(f"sharding.tables names unknown table(s) {sorted(unknown)}; the schema has {sorted(tables)}")
    types = list(cfg.sharding.types)
    if ws == 1 and ShardingType.TABLE_WISE.value in types:
        # one rank holds every table whatever the type; row-wise sharding would still bucketize
        # every batch and read the bucket sizes back from the device (a host sync per step)
        types = [ShardingType.TABLE_WISE.value]
    constraints: Dict[str, ParameterConstraints] = {}
    for t in tables:
        override = cfg.sharding.tables.get(t)
        constraints[t] = ParameterConstraints(
            sharding_types=list(override.types) if override and override.types else types,
            compute_kernels=list(override.compute_kernels) if override and override.compute_kernels else None,
        )
    return EmbeddingShardingPlanner(topology=topo, batch_size=cfg.data.batch_size, constraints=constraints)


def memory_per_rank_bytes(cfg: Config, compute: str, local_world_size: int) -> int:
    """``sharding.memory_per_rank_gb`` or, when 0, the real hardware's: the GPU's memory, or
    the host's memory divided by the ranks on it."""
    if cfg.sharding.memory_per_rank_gb > 0:
        return int(cfg.sharding.memory_per_rank_gb * 1024**3)
    if compute == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("no GPU here to read its memory from: set sharding.memory_per_rank_gb")
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host // max(1, local_world_size))


def plan_summary(plan: ShardingPlan) -> Dict[str, Dict[str, object]]:
    """table -> {sharding_type, compute_kernel, ranks}, JSON-friendly."""
    out: Dict[str, Dict[str, object]] = {}
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            out[table] = {
                "module": module_path,
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": sorted(set(ps.ranks or [])),
            }
    return out


TABLE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def table_modules(module: nn.Module) -> Dict[str, nn.Module]:
    """Every embedding table under ``module`` by table name: the EmbeddingBagCollection's
    bags and, with sequence features, the EmbeddingCollection's tables."""
    out: Dict[str, nn.Module] = {}
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            out.update(m.embedding_bags.items())
        elif isinstance(m, EmbeddingCollection):
            out.update(m.embeddings.items())
    return out


def bounds_check_modes() -> Dict[str, Any]:
    """``sharding.bounds_check`` -> fbgemm's ``BoundsCheckMode``."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    return {"none": BoundsCheckMode.NONE, "warning": BoundsCheckMode.WARNING, "fatal": BoundsCheckMode.FATAL}


def table_sharders(bounds_check: str = "none") -> List[ModuleSharder[nn.Module]]:
    """The sharders of the model's two table collections (planner and DMP take the same), their
    kernels checking ids as ``sharding.bounds_check`` says."""
    fused = {"bounds_check_mode": bounds_check_modes()[bounds_check]}
    return [CPUWideEmbeddingBagCollectionSharder(fused_params=dict(fused)),  # type: ignore[list-item]
            EmbeddingCollectionSharder(fused_params=dict(fused))]


IN_BACKWARD_MODULE = "torch.distributed.optim.apply_optimizer_in_backward"
_in_backward_light: Optional[ModuleType] = None


def in_backward_optimizers(ddp: bool) -> ModuleType:
    """PyTorch's ``torch.distributed.optim.apply_optimizer_in_backward``: the function that
    attaches a table's optimizer to its parameters (TorchRec's sharders read it from there),
    and the hook maps DDP consults when it wraps such parameters.

    ``ddp``: DDP will wrap this process's parameters (a world of more than one): the module as
    its package imports it. Otherwise (a world of one: no DDP) the same file loaded under a
    private name without the package's ``__init__``, which imports every functional optimizer
    of ``torch.distributed.optim`` and compiles them with TorchScript — 0.27 s of each run's
    start-up on the development machine for a module of plain Python that needs none of it
    (docs/performance.md, "Twentieth round"). Its hook maps then hold only the hooks of the
    ``meta`` parameters that DMP replaces. Where the file is not there (another layout of
    torch), the plain import."""
    global _in_backward_light
    if ddp:
        return importlib.import_module(IN_BACKWARD_MODULE)
    if _in_backward_light is None:
        path = Path(dist.__file__).parent / "optim" / "apply_optimizer_in_backward.py"
        spec = importlib.util.spec_from_file_location("dlrm_mtl._apply_optimizer_in_backward", path) if path.is_file() else None
        if spec is None or spec.loader is None:
            return importlib.import_module(IN_BACKWARD_MODULE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _in_backward_light = module
    return _in_backward_light


def apply_table_optimizers(module: nn.Module, cfg: Config, ddp: bool = True) -> Dict[str, str]:
    """Registers each table's fused optimizer (fbgemm applies it in the backward pass):
    row-wise Adagrad at ``train.sparse_lr`` unless ``sharding.tables.<t>`` says otherwise.
    ``module``: a table collection or anything holding them (the model); ``ddp``: whether DDP
    will wrap the process's parameters (:func:`in_backward_optimizers`)."""
    chosen: Dict[str, str] = {}
    for name, table in table_modules(module).items():
        override = cfg.sharding.tables.get(name)
        kind = override.optimizer if override else "rowwise_adagrad"
        if kind not in TABLE_OPTIMIZERS:
            raise ValueError(f"sharding.tables.{name}.optimizer {kind!r}: expected one of {sorted(TABLE_OPTIMIZERS)}")
        lr = override.lr if override and override.lr > 0 else cfg.train.sparse_lr
        in_backward_optimizers(ddp)._apply_optimizer_in_backward(TABLE_OPTIMIZERS[kind], table.parameters(), {"lr": lr})
        chosen[name] = f"{kind}(lr={lr:g})"
    return chosen


def shard_model(module: nn.Module, cfg: Config, env: DistEnv, schema: Schema) -> Tuple[DistributedModelParallel, CombinedOptimizer, ShardingPlan]:
    """Fused row-wise Adagrad on the tables, planner-chosen sharding, DMP (DDP on dense), Adam on dense.

    ``module`` must contain exactly one :class:`MultiScenarioMultiTaskModel` (built on the
    ``meta`` device so DMP materialises only this rank's shards).

    Three things a world of one does not need are left out, with identical results: DDP (its
    all-reduce over one rank only copies every gradient into a bucket and divides it by 1),
    TorchRec's input and output distribution of the lookup (``sharding.local_lookup``:
    :class:`~dlrm_mtl.models.local_lookup.LocalPooledLookup` calls the tables' kernels
    directly), and the dense Adam runs as PyTorch's fused kernel (one operator per step for all
    parameters instead of ~12 per parameter, and no host read of each step counter) on any
    world size. The optimizers come back as one :class:`TrainingOptimizer` (a
    ``CombinedOptimizer`` whose step calls each optimizer directly).
    """
    ebcs = [m for m in module.modules() if isinstance(m, MultiScenarioMultiTaskModel)]
    if len(ebcs) != 1:
        raise ValueError("expected exactly one MultiScenarioMultiTaskModel in the module")
    apply_table_optimizers(ebcs[0], cfg, ddp=dist.get_world_size() > 1)
    sharders = table_sharders(cfg.sharding.bounds_check)
    planner = make_planner(cfg, env, schema)
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=module, device=env.device, plan=plan, sharders=sharders,
                                   init_data_parallel=dist.get_world_size() > 1)
    if dist.get_world_size() == 1:
        # DMP's data-parallel wrapper is what moves the dense part to the device; without it
        # the dense parameters (built on the host, not meta) would stay there
        dmp._dmp_wrapped_module.to(env.device)
        if cfg.sharding.local_lookup:  # the tables' kernels without TorchRec's dist over one rank
            model = ebcs[0]
            one_table = {"auto": None, "one_table": True, "per_table": False}[cfg.sharding.cpu_backward]
            model.local_lookup = LocalPooledLookup.of(model.ebc, model.feature_names, model.feature_names, one_table,
                                                     model.mean_spans)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.train.dense_lr, weight_decay=cfg.train.dense_weight_decay, fused=True),
    )
    return dmp, TrainingOptimizer([dmp.fused_optimizer, dense]), plan

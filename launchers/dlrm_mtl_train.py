"""TorchX component for dlrm_mtl training.

(No `from __future__ import annotations` here: TorchX decodes arguments from real type objects.)

Runs ``python -m dlrm_mtl train --config CONFIG [--set K=V ...]`` under torchrun on every
replica (TorchX's ``dist.ddp``), so the same component works with any TorchX scheduler::

    torchx run -s local_cwd launchers/dlrm_mtl_train.py:train -j 1x2 --config configs/demo.yaml
    torchx run -s local_cwd launchers/dlrm_mtl_train.py:train -j 2x1 --config configs/demo.yaml \
        train.epochs=2 data.batch_size=4096        # trailing KEY=VALUE pairs become --set overrides
    torchx run -s slurm launchers/dlrm_mtl_train.py:train -j 4x8 --gpu 8 --config my.yaml
    torchx run -s local_cwd launchers/dlrm_mtl_train.py:evaluate -j 1x2 --config runs/demo/config.yaml \
        --checkpoint runs/demo/checkpoints/final --out runs/demo/eval

``local_cwd`` runs in the current directory; ``torchrun`` must be on PATH (``make demo``
puts ``.venv/bin`` first).
"""


import os
from typing import Any, Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components import dist


def train(
    *overrides: str,
    config: str = "configs/demo.yaml",
    j: str = "1x2",
    image: str = "",
    name: str = "/dlrm-mtl-train",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains a dlrm_mtl model.

    Args:
        overrides: config overrides KEY=VALUE, passed as ``--set KEY=VALUE``
        config: dlrm_mtl YAML config file (path as seen by the workers); several files compose
            when separated by commas, e.g. ``base.yaml,arch/hinet.yaml`` (later ones override)
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one host, two ranks) or 2x1
        image: container image, or the working directory for local_cwd (default: cwd)
        name: job name
        h: named resource (overrides cpu/gpu/memMB)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables, e.g. NCCL_DEBUG=INFO,GLOO_SOCKET_IFNAME=eth0
        max_retries: scheduler retries (whole-job resubmissions, where the scheduler supports them)
        max_restarts: torchrun restarts all workers up to this many times when one fails; the
            restarted run resumes from the latest complete checkpoint (set checkpoint.every_steps)
        rdzv_port: c10d rendezvous port on rank 0's host (multi-node)
        rdzv_backend: rendezvous backend (c10d, static, etcd)
        mounts: mounts for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    app = _dlrm_mtl_job(
        ["train"] + [a for c in config.split(",") for a in ("--config", c)], overrides, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
        j=j, env=env, max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
    )
    if max_restarts:
        role = app.roles[0]
        assert role.args[0] == "-c" and role.args[1].startswith("torchrun "), role.args
        role.args[1] = role.args[1].replace("torchrun ", f"torchrun --max_restarts {int(max_restarts)} ", 1)
    return app


def _dlrm_mtl_job(args: List[str], overrides: Tuple[str, ...], image: str, **ddp_kwargs: Any) -> specs.AppDef:
    """``python -m dlrm_mtl ARGS --set K=V ...`` under torchrun on every replica (dist.ddp)."""
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r}: expected KEY=VALUE")
        args = args + ["--set", ov]
    return dist.ddp(*args, m="dlrm_mtl", image=image or os.getcwd(), **ddp_kwargs)


def evaluate(
    *overrides: str,
    config: str,
    checkpoint: str,
    out: str,
    data: str = "",
    j: str = "1x2",
    image: str = "",
    name: str = "/dlrm-mtl-evaluate",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Evaluates a dlrm_mtl checkpoint (any world size: tables are resharded on load).

    Args:
        overrides: config overrides KEY=VALUE, passed as ``--set KEY=VALUE``
        config: the run's config (RUN_DIR/config.yaml)
        checkpoint: checkpoint directory, e.g. RUN_DIR/checkpoints/final
        out: directory for metrics.json
        data: data to evaluate on (default: data.eval of the config)
        j: {nnodes}x{nproc_per_node}
        image: container image, or the working directory for local_cwd (default: cwd)
        name: job name
        h: named resource (overrides cpu/gpu/memMB)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on rank 0's host (multi-node)
        rdzv_backend: rendezvous backend
        mounts: mounts for container schedulers
    """
    args = ["evaluate", "--config", config, "--checkpoint", checkpoint, "--out", out] + (["--data", data] if data else [])
    return _dlrm_mtl_job(
        args, overrides, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
        j=j, env=env, max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
    )


def predict(
    *overrides: str,
    config: str,
    checkpoint: str,
    data: str,
    out: str,
    keep: str = "",
    j: str = "1x2",
    image: str = "",
    name: str = "/dlrm-mtl-predict",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Scores Parquet rows with a dlrm_mtl checkpoint: one ``part-<rank>.parquet`` per rank,
    then ``_SUCCESS`` (any world size: tables are resharded on load)::

        torchx run -s local_cwd launchers/dlrm_mtl_train.py:predict -j 1x2 --config runs/demo/config.yaml \\
            --checkpoint runs/demo/checkpoints/final --data data/synthetic/eval --out runs/demo/pred --keep user_id

    Args:
        overrides: config overrides KEY=VALUE, passed as ``--set KEY=VALUE`` (e.g. predict.fusion={ctr: 1, ctcvr: 2})
        config: the run's config (RUN_DIR/config.yaml)
        checkpoint: checkpoint directory, e.g. RUN_DIR/checkpoints/final
        data: Parquet file, directory, glob or URI to score
        out: new output directory
        keep: comma-separated input columns copied to the output (user id, request id, ...)
        j: {nnodes}x{nproc_per_node}
        image: container image, or the working directory for local_cwd (default: cwd)
        name: job name
        h: named resource (overrides cpu/gpu/memMB)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on rank 0's host (multi-node)
        rdzv_backend: rendezvous backend
        mounts: mounts for container schedulers
    """
    args = ["predict", "--config", config, "--checkpoint", checkpoint, "--data", data, "--out", out]
    if keep:
        args += ["--keep"] + [k for k in keep.split(",") if k]
    return _dlrm_mtl_job(
        args, overrides, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
        j=j, env=env, max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
    )

"""init_distributed / shutdown_distributed outside torchrun."""

from __future__ import annotations


def test_standalone_process_group_leaves_no_rendezvous_variables(monkeypatch):
    """A world of one set up by init_distributed removes the variables it set, so a later run
    or a child process does not inherit a stale MASTER_PORT/RANK (EADDRINUSE)."""
    import os

    from dlrm_mtl.distributed import init_distributed, shutdown_distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # set by the user: must survive
    env = init_distributed("gloo", 30)
    assert env.world_size == 1 and os.environ["RANK"] == "0"
    shutdown_distributed()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    env = init_distributed("gloo", 30)  # and a second standalone run works
    shutdown_distributed()

"""dlrm_mtl: multi-scenario, multi-task ranking models on TorchRec."""

__version__ = "0.1.0"

"""``train.allow_bf16_matmul``: on the CPU, fp32 matmuls from bf16-rounded inputs (oneDNN), off
by default; ``configure_backends`` sets PyTorch's switch both ways."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.config import TrainConfig
from dlrm_mtl.train import configure_backends


@pytest.fixture
def restore_precision():
    before = torch.backends.mkldnn.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision = before


def _rel_error(x: torch.Tensor, w: torch.Tensor) -> float:
    exact = x.double() @ w.double()
    return float(((x @ w).double() - exact).abs().max() / exact.abs().max())


def test_off_by_default_and_set_both_ways(restore_precision):
    assert TrainConfig().allow_bf16_matmul is False
    configure_backends(TrainConfig(allow_bf16_matmul=True, keep_host_memory=False), torch.device("cpu"))
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    configure_backends(TrainConfig(keep_host_memory=False), torch.device("cpu"))
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # PyTorch's default: MKL, as without the switch


def _native_bf16() -> bool:
    """The CPU computes bf16 products natively (AVX512-BF16 or AMX-BF16), where PyTorch's
    bf16 fp32-matmul mode takes effect. An AVX-512 CPU without them (Xeon model 85, seen
    here) passes ``_is_mkldnn_bf16_supported`` but keeps the fp32 products: error 4.8e-7."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.skipif(not _native_bf16(), reason="no native bf16 (AVX512-BF16 / AMX) on this CPU: the switch has no effect")
def test_bf16_inputs_change_the_products_within_bf16_rounding(restore_precision):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 121, generator=g), torch.randn(121, 128, generator=g)
    configure_backends(TrainConfig(keep_host_memory=False), torch.device("cpu"))
    exact = _rel_error(x, w)
    configure_backends(TrainConfig(allow_bf16_matmul=True, keep_host_memory=False), torch.device("cpu"))
    rounded = _rel_error(x, w)
    assert exact < 1e-5  # fp32 products
    assert 1e-4 < rounded < 2e-2  # inputs rounded to 8-bit mantissas, accumulated in fp32

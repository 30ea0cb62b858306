"""Expert utilisation: mean gate weight per leaf scenario, gate and expert, merged over ranks,
rendered as TensorBoard heatmap images."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from dlrm_mtl.collectives import all_reduce_host
from dlrm_mtl.schema import Schema, leaf_ids, scenario_names


class ExpertUtilisation:
    """Accumulates gate weights over evaluation rows.

    Every gate tensor the model returns is ``[B, E]`` (one gate per row, e.g. the row's
    scenario gate) or ``[B, G, E]`` (G gates, e.g. one per task). ``compute()`` returns, per
    gate name, the mean weight ``[S, G, E]`` over the real rows of each leaf scenario S — sums
    and counts are all-reduced, so the result is exact across ranks. ``heatmaps()`` reduces it
    to the matrix worth looking at: scenario × expert for a per-row gate (which experts each
    scenario uses), gate × expert for G > 1 (which experts each task uses, over all rows).

    Example::

        util = ExpertUtilisation(schema)
        util.update(gates, batch.scenario, batch.real)
        for name, (matrix, rows) in util.heatmaps().items(): ...   # matrix [R, E], R row labels
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.names = scenario_names(schema)
        self.sums: Dict[str, torch.Tensor] = {}  # [S, G, E] float64
        self.counts = torch.zeros(len(self.names), dtype=torch.float64)  # [S]

    @torch.no_grad()
    def update(self, gates: Dict[str, torch.Tensor], scenario: torch.Tensor, real: torch.Tensor) -> None:
        leaf = leaf_ids(scenario, self.schema).cpu()[real.cpu()]  # [B']
        self.counts.index_add_(0, leaf, torch.ones_like(leaf, dtype=torch.float64))
        for name, g in gates.items():
            g = g.detach().cpu().double()[real.cpu()]
            g = g.unsqueeze(1) if g.dim() == 2 else g  # [B', G, E]
            if name not in self.sums:
                self.sums[name] = torch.zeros(len(self.names), *g.shape[1:], dtype=torch.float64)
            self.sums[name].index_add_(0, leaf, g)

    def compute(self) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Mean gate weight ``[S, G, E]`` per gate name (NaN for a scenario without rows) and the
        rows per scenario ``[S]``, both summed over ranks (one all-reduce)."""
        counts = self.counts.clone()
        sums = {k: v.clone() for k, v in sorted(self.sums.items())}
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = all_reduce_host(torch.cat([counts] + [v.flatten() for v in sums.values()]))
            counts, off = flat[: len(counts)], len(counts)
            for k, v in sums.items():
                sums[k] = flat[off : off + v.numel()].view_as(v)
                off += v.numel()
        return {k: v / counts.view(-1, 1, 1) for k, v in sums.items()}, counts

    def heatmaps(self) -> Dict[str, Tuple[np.ndarray, List[str]]]:
        """Per gate: ``(matrix [R, E], row labels)`` — scenario × expert for per-row gates,
        gate × expert (mean over all rows) for gates with G > 1."""
        means, counts = self.compute()
        out = {}
        for name, m in means.items():
            if m.shape[1] == 1:
                out[name] = (m[:, 0].numpy(), list(self.names))
            else:
                overall = (torch.nan_to_num(m) * counts.view(-1, 1, 1)).sum(0) / counts.sum().clamp(min=1)  # [G, E]
                out[name] = (overall.numpy(), [f"gate{g}" for g in range(m.shape[1])])
        return out


def render_heatmap(matrix: np.ndarray, cell: int = 24) -> np.ndarray:
    """``[R, E]`` weights in [0, 1] -> an RGB image ``[3, R·cell, E·cell]`` uint8 (dark = 0,
    bright yellow = 1; NaN rows grey), for ``SummaryWriter.add_image``. No plotting library."""
    m = np.clip(np.asarray(matrix, dtype=np.float64), 0.0, 1.0)
    nan = np.isnan(m)
    m = np.nan_to_num(m)
    # a small perceptual ramp (dark blue -> teal -> yellow), interpolated
    stops = np.array([[0.02, 0.02, 0.20], [0.13, 0.57, 0.55], [0.99, 0.91, 0.14]])
    pos = m * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    t = (pos - lo)[..., None]
    rgb = stops[lo] * (1 - t) + stops[lo + 1] * t  # [R, E, 3]
    rgb[nan] = 0.5
    img = np.kron(rgb, np.ones((cell, cell, 1)))  # [R·cell, E·cell, 3]
    # 1-pixel grid lines between cells
    img[::cell, :, :] = 0.0
    img[:, ::cell, :] = 0.0
    return (img * 255).astype(np.uint8).transpose(2, 0, 1)

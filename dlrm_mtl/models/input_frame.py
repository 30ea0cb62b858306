"""What the dense arch puts beside the pooled embeddings in its input, for a lookup that writes them all."""

from __future__ import annotations

from typing import List, NamedTuple

import torch

from dlrm_mtl import native


class InputFrame(NamedTuple):
    """The rest of the dense arch's input ``x [B, d]`` around the pooled embeddings ``[B, P]``:
    ``x = [front | pooled | W_0[scenario[:, 0]] | ... | W_{L-1}[scenario[:, L-1]]]``
    (:meth:`~dlrm_mtl.models.ranking_model.DenseArch.input_frame`; ``d = a + P + Σ e_l``).

    A lookup handed one may write the whole ``x`` in one pass instead of the pooled part alone
    (:class:`~dlrm_mtl.models.one_table_lookup.OneTableInputRows`), which spares the dense
    arch's ``cat``: the copy of every pooled row into ``x`` (~1 MB per MovieLens step at batch
    2,048; docs/performance.md, "Seventeenth round"). The dense arch tells the two outputs
    apart by their width (``d`` against ``P``).

    ``front [B, a]``: the dense part (raw dense features: no gradient); ``scenario [B, ≥ L]``
    int64, level l's ids in column l; ``tables``: the levels' embedding weights ``[V_l, e_l]``.
    """

    front: torch.Tensor
    scenario: torch.Tensor
    tables: List[torch.Tensor]

    def width(self, pooled: int) -> int:
        """``d`` for ``pooled`` columns of pooled embeddings."""
        return self.front.shape[1] + pooled + sum(t.shape[1] for t in self.tables)

    def host_ready(self, rows: int) -> bool:
        """Whether the C kernels can write it for ``rows`` rows: float32 host ``front`` without a
        gradient (unit column stride), int64 ``scenario`` with a column per level, float32
        contiguous tables (:func:`dlrm_mtl.native.table_rows_applies`)."""
        f, s = self.front, self.scenario
        return (f.dim() == 2 and f.shape[0] == rows and f.dtype == torch.float32 and f.stride(1) == 1
                and not f.requires_grad and f.is_cpu and s.dim() == 2 and s.shape[0] == rows
                and s.shape[1] >= len(self.tables)
                and all(native.table_rows_applies(t, s[:, i]) for i, t in enumerate(self.tables)))

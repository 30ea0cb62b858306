"""Task graph: chained (entire-space) probabilities built from the schema's ``parent`` links."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from dlrm_mtl.schema import Schema


class TaskGraph:
    """The forest of tasks. Head t predicts the conditional P(t | parent(t)); the entire-space
    probability of t is the product along its chain (ESMM, Ma et al. 2018, eq. 1-2:
    pCTCVR = pCTR · pCVR). Deeper chains (click → cart → buy) work the same way.

    Example::

        g = TaskGraph(schema)                 # ctr, cvr(parent=ctr)
        g.chains                              # [[0], [0, 1]]
        g.entire_log_prob(logits).shape       # [B, T]; column 1 = log pCTR + log pCVR
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.chains: List[List[int]] = [schema.chain(t.name) for t in schema.tasks]
        self.entire_names: List[str] = [schema.entire_name(t) for t in schema.tasks]

    def entire_log_prob(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` logits of the conditional heads -> ``[B, T]`` log of the chained probabilities."""
        logp = F.logsigmoid(logits)  # [B, T]
        return torch.stack([logp[:, chain].sum(dim=1) for chain in self.chains], dim=1)

    def chained(self, x: torch.Tensor, reduce: str = "prod") -> torch.Tensor:
        """Per task, reduce ``x [B, T]`` along the chain (labels: product; masks: all)."""
        cols = []
        for chain in self.chains:
            c = x[:, chain]
            cols.append(c.all(dim=1) if reduce == "all" else c.prod(dim=1))
        return torch.stack(cols, dim=1)

    def parent_positive(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: the row lies in task t's conditional sample space (every ancestor label is 1)."""
        cols = []
        for chain in self.chains:
            anc = chain[:-1]
            if anc:
                cols.append(((labels[:, anc] == 1) & mask[:, anc]).all(dim=1))
            else:
                cols.append(torch.ones_like(labels[:, 0], dtype=torch.bool))
        return torch.stack(cols, dim=1)

    def probabilities(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Conditional and entire-space probabilities by metric name (e.g. ctr, cvr, ctcvr)."""
        out: Dict[str, torch.Tensor] = {}
        cond = torch.sigmoid(logits)
        entire = self.entire_log_prob(logits).exp()
        for i, t in enumerate(self.schema.tasks):
            out[t.name] = cond[:, i]
            if t.parent is not None:
                out[self.entire_names[i]] = entire[:, i]
        return out

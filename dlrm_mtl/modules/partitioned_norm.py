"""Partitioned normalisation (STAR): batch normalisation with per-scenario statistics and affine terms."""

from __future__ import annotations

import torch
from torch import nn


class PartitionedNorm(nn.Module):
    """Partitioned Normalization of STAR (Sheng et al., CIKM 2021, "One Model to Serve All: Star
    Topology Adaptive Recommender for Multi-Domain CTR Prediction", §4.1, eq. 2)::

        z' = (γ · γ_s) ⊙ (z − E_s) / sqrt(Var_s + ε) + (β + β_s)

    for a row of scenario s: γ, β are shared by all scenarios, γ_s, β_s belong to scenario s
    (initialised to 1 and 0, so training starts from plain batch normalisation). In training,
    E_s and Var_s are the statistics of scenario s's rows *in the batch*; in evaluation they are
    scenario s's moving averages, updated in training like ``nn.BatchNorm1d``'s
    (``running = (1 − momentum) · running + momentum · batch``, unbiased variance).

    Deviation: STAR trains on batches drawn from one scenario each, so "the batch statistics"
    are that scenario's. Batches here mix scenarios, so the statistics are taken over the
    batch's rows of each scenario separately, which is the same thing. A scenario with fewer
    than 2 rows in a batch does not update its moving statistics (its variance is undefined);
    its rows are still normalised with the batch's (single-row: zero) statistics.

    A feature that is *constant* within scenario s (e.g. the scenario embedding, which
    :class:`DenseArch` appends to ``x``) has zero variance there: batch statistics map it to
    exactly 0, but its moving statistics would divide the lag of the moving mean behind the
    (still training) embedding by sqrt(ε) and blow it up ~300× in evaluation. Such a feature
    carries nothing beyond the scenario id, which the star FCN is already conditioned on, so
    PN records which features were constant (max = min over the scenario's rows) in the last
    training batch and maps them to 0 before the affine terms, in training and evaluation
    alike. (STAR feeds the domain indicator to its auxiliary network, not through PN, so the
    paper does not meet this case.)

    Under DDP every rank normalises with its own batch's statistics (like ``BatchNorm1d``,
    not ``SyncBatchNorm``); the moving statistics are buffers, broadcast from rank 0.

    ``x [B, d]``, ``scenario [B]`` (ids in ``[0, num_scenarios)``) -> ``[B, d]``.

    Example::

        pn = PartitionedNorm(16, num_scenarios=3)
        pn(torch.randn(8, 16), torch.randint(0, 3, (8,))).shape   # [8, 16]
        pn.running_mean.shape                                     # [3, 16]
    """

    def __init__(self, dim: int, num_scenarios: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.dim, self.num_scenarios, self.eps, self.momentum = dim, num_scenarios, eps, momentum
        self.gamma = nn.Parameter(torch.ones(dim))  # γ, shared
        self.beta = nn.Parameter(torch.zeros(dim))  # β, shared
        self.scenario_gamma = nn.Parameter(torch.ones(num_scenarios, dim))  # γ_s
        self.scenario_beta = nn.Parameter(torch.zeros(num_scenarios, dim))  # β_s
        self.register_buffer("running_mean", torch.zeros(num_scenarios, dim))  # E_s
        self.register_buffer("running_var", torch.ones(num_scenarios, dim))  # Var_s
        self.register_buffer("constant", torch.zeros(num_scenarios, dim, dtype=torch.bool))  # feature constant within s

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var, constant = self._batch_stats(x, scenario)  # [S, d] each
        else:
            mean, var, constant = self.running_mean, self.running_var, self.constant
        x_hat = (x - mean[scenario]) * torch.rsqrt(var + self.eps)[scenario]  # [B, d]
        x_hat = x_hat.masked_fill(constant[scenario], 0.0)
        return x_hat * (self.gamma * self.scenario_gamma)[scenario] + (self.beta + self.scenario_beta)[scenario]  # eq. 2: [B, d]

    def _batch_stats(self, x: torch.Tensor, scenario: torch.Tensor):
        """Per-scenario mean, (biased) variance and constancy of the batch's rows, as ``[S, d]``
        tensors (rows of absent scenarios: 0, 1, False); updates the moving statistics of
        scenarios with at least 2 rows."""
        S, d = self.num_scenarios, self.dim
        count = torch.zeros(S, dtype=x.dtype, device=x.device).index_add_(0, scenario, torch.ones_like(x[:, 0]))  # [S]
        n = count.clamp(min=1).unsqueeze(1)  # [S, 1]
        mean = x.new_zeros(S, d).index_add(0, scenario, x) / n  # [S, d]
        centred = x - mean[scenario]  # [B, d]
        var = x.new_zeros(S, d).index_add(0, scenario, centred * centred) / n  # [S, d], biased
        var = torch.where(count.unsqueeze(1) > 0, var, torch.ones_like(var))
        with torch.no_grad():
            seen = (count >= 2).unsqueeze(1)  # [S, 1]
            index = scenario.unsqueeze(1).expand_as(x)  # [B, d]
            hi = x.new_full((S, d), float("-inf")).scatter_reduce(0, index, x, "amax")  # [S, d]
            lo = x.new_full((S, d), float("inf")).scatter_reduce(0, index, x, "amin")  # [S, d]
            constant = seen & (hi == lo)  # [S, d]
            self.constant.copy_(torch.where(seen, constant, self.constant))
            unbiased = var * count.unsqueeze(1) / (count.unsqueeze(1) - 1).clamp(min=1)
            m = self.momentum
            self.running_mean.copy_(torch.where(seen, (1 - m) * self.running_mean + m * mean, self.running_mean))
            self.running_var.copy_(torch.where(seen, (1 - m) * self.running_var + m * unbiased, self.running_var))
        return mean, var, constant

"""The paper's formulas: PQ Index from power sums, and SAP's pruning counts.

    PQI = 1 - d^(1/q - 1/p) * S_p^(1/p) / S_q^(1/q)
    r   = ceil( d * (1 + eta_r)^(-q/(q-p)) * (1 - PQI)^(q p/(q-p)) )
    c   = floor( d * clamp(gamma * (1 - r/d), 0, beta) )

Everything is evaluated in float64, the PQI in the log domain.
"""

from __future__ import annotations

import math

import torch


def pqi_from_sums(
    sum_p: torch.Tensor, sum_q: torch.Tensor, count: torch.Tensor, p: float, q: float
) -> torch.Tensor:
    """PQ Index from S_p, S_q and d (float64 tensors of one shape); NaN where undefined.

    PQI is undefined when d = 0 or every retained weight is 0.
    """
    sum_p, sum_q, count = sum_p.double(), sum_q.double(), count.double()
    # log of d^(1/q-1/p) * S_p^(1/p) / S_q^(1/q). A zero among the three makes
    # it infinite or NaN (log 0 = -inf): exactly the undefined units, given
    # finite non-negative sums. Few ops on purpose: on a GPU each is a launch,
    # and a global PQI is a handful of numbers after one pass over the weights.
    log_ratio = torch.log(count).mul_(1.0 / q - 1.0 / p)
    log_ratio.add_(torch.log(sum_p), alpha=1.0 / p).sub_(torch.log(sum_q), alpha=1.0 / q)
    return torch.where(log_ratio.abs() < math.inf, -torch.expm1(log_ratio), math.nan)


def pqi_upper_bound(count: torch.Tensor | float, p: float, q: float):
    """The largest possible PQI of d weights: 1 - d^(1/q - 1/p)."""
    return 1.0 - count ** (1.0 / q - 1.0 / p)


def sap_retained_lower_bound(
    pqi: torch.Tensor, count: torch.Tensor, p: float, q: float, eta_r: float
) -> torch.Tensor:
    """r_t = ceil(d (1 + eta_r)^(-q/(q-p)) (1 - PQI)^(q p/(q-p))), float64, per unit."""
    count = count.double()
    base = (1.0 + eta_r) ** (-q / (q - p))
    bound = count * base * (1.0 - pqi.double()).clamp(min=0.0) ** (q * p / (q - p))
    return torch.ceil(bound)


def sap_prune_counts(
    pqi: torch.Tensor,
    count: torch.Tensor,
    *,
    p: float = 0.5,
    q: float = 1.0,
    eta_r: float = 0.0,
    gamma: float = 1.0,
    beta: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_t, c_t) per unit as int64 tensors; c_t = 0 where the PQI is NaN."""
    count = count.double()
    retained_bound = sap_retained_lower_bound(pqi, count, p, q, eta_r)
    # d * min(gamma (1 - r/d), beta) in product form: the ratio form can round
    # an exact integer just below it, and floor would then lose one weight.
    prune = torch.minimum(gamma * (count - retained_bound), beta * count).clamp(min=0.0).floor()
    defined = ~torch.isnan(pqi) & (count > 0)
    prune = torch.where(defined, prune, torch.zeros_like(prune))
    retained_bound = torch.where(defined, retained_bound, count)
    return retained_bound.long(), prune.long()

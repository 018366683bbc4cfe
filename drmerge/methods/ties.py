"""TIES merging with mergekit's semantics (DESIGN.md s.3, baselines): the numbers users
compare against when they rerun a mergekit TIES config through drmerge.

Per tensor: trim each delta to its top ``density`` magnitudes; weight them, ``E_t = w_t D_t``;
elect the majority sign of ``sum_t E_t``, +1 where that sum is exactly zero (mergekit's
``(sum >= 0) * 2 - 1``); keep the entries of each ``E_t`` with that sign (a zero entry never
matches); divide their sum by the sum of the *weights* of the kept entries, 0 -> 1
(``disjoint_mean``, mergekit's ``normalize``). A negative weight flips its model's entries
before the vote, and its weight counts negatively in the divisor, exactly as in mergekit.

DRM's rule for vector-like tensors looks alike but follows its authors (methods/drm.py,
common.combine): sign elected on the unweighted values, the kept entries counted, and a
zero sum falling back to the sign of the sum of the elected signs.
"""

from __future__ import annotations

import torch

from ..spec import Parameters
from .common import elect_signs, keep_top_magnitudes


def ties_delta(deltas: torch.Tensor, weights: torch.Tensor, p: Parameters) -> torch.Tensor:
    """Merged delta ``D`` of a (T, ...) stack of task deltas, before the global scale."""
    trimmed = torch.stack([keep_top_magnitudes(d, p.density) for d in deltas])
    return ties_combine(trimmed, weights, sign_election=p.sign_election, disjoint_mean=p.disjoint_mean)


def ties_combine(trimmed: torch.Tensor, weights: torch.Tensor, *, sign_election: bool,
                 disjoint_mean: bool) -> torch.Tensor:
    """Everything after the trim, on a (T, ...) stack (a whole tensor or any chunk of it:
    each entry depends on its own column only). ``weights``: shape (T,).

    ``sign_election: false`` keeps every nonzero weighted entry. ``disjoint_mean: false``
    divides the sum of the kept entries by T (mergekit's ``normalize: false`` is the plain
    sum, i.e. this times T).
    """
    w = weights.to(trimmed.dtype).reshape((-1,) + (1,) * (trimmed.dim() - 1))
    weighted = trimmed * w
    if sign_election:
        sigma = elect_signs(weighted, torch.ones((), dtype=weighted.dtype, device=weighted.device))
        keep = torch.sign(weighted) == sigma
    else:
        keep = weighted != 0
    total = torch.where(keep, weighted, torch.zeros((), dtype=weighted.dtype, device=weighted.device)).sum(dim=0)
    if not disjoint_mean:
        return total / trimmed.shape[0]
    divisor = (w * keep).sum(dim=0)
    return total / divisor.masked_fill_(divisor == 0, 1.0)

"""TIES merging: trim each delta to its top ``density`` magnitudes, elect signs on the
weighted deltas, take the disjoint mean (DESIGN.md s.3, baselines)."""

from __future__ import annotations

import torch

from ..spec import Parameters
from .common import combine, keep_top_magnitudes


def ties_delta(deltas: torch.Tensor, weights: torch.Tensor, p: Parameters) -> torch.Tensor:
    trimmed = torch.stack([keep_top_magnitudes(d, p.density) for d in deltas])
    return combine(trimmed, weights, sign_election=p.sign_election,
                   disjoint_mean=p.disjoint_mean, elect_on_weighted=True)

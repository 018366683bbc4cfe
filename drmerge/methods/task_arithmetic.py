"""Task arithmetic: ``W0 + lam * sum_t w_t D_t``."""

from __future__ import annotations

import torch


def task_arithmetic_delta(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``deltas``: (T, ...) stack; returns ``sum_t w_t D_t`` (the caller applies ``lam``)."""
    w = weights.to(deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1))
    return (deltas * w).sum(dim=0)

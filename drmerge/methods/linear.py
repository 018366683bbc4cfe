"""Linear averaging: ``sum_t w_t W_t / sum_t w_t`` (no base model involved)."""

from __future__ import annotations

import torch

from ..errors import MergeError


def linear_weights(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = float(weights.sum())
    if total == 0.0:
        raise MergeError("invalid_spec", "linear merge needs model weights that do not sum to zero", param="models")
    w = weights.to(tensors.dtype).reshape((-1,) + (1,) * (tensors.dim() - 1))
    return (tensors * w).sum(dim=0) / total

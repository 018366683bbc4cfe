"""Merge methods as pure tensor functions; ``merge_tensor`` dispatches one tensor.

Each method lives in its own small module. Inputs are stacks of shape (T, ...) in the
compute dtype; matrices reach DRM already flattened to 2-D (``out x prod(rest)``).
"""

from __future__ import annotations

import torch

from ..spec import Parameters
from .drm import drm_matrix_delta, drm_vector_delta
from .linear import linear_weights
from .task_arithmetic import task_arithmetic_delta
from .ties import ties_delta

MATRIX = "matrix"
VECTOR = "vector"
COPY = "copy"


def merged_delta(method: str, kind: str, deltas: torch.Tensor, weights: torch.Tensor, p: Parameters) -> torch.Tensor:
    """The merged delta ``D`` of one tensor, before the global scale."""
    if method == "task_arithmetic":
        return task_arithmetic_delta(deltas, weights)
    if method == "ties":
        return ties_delta(deltas, weights, p)
    if method == "drm":
        if kind == MATRIX:
            flat = deltas.reshape(deltas.shape[0], deltas.shape[1], -1)
            return drm_matrix_delta(flat, weights, p).reshape(deltas.shape[1:])
        return drm_vector_delta(deltas, weights, p)
    raise ValueError(f"method {method!r} does not merge deltas")


def merge_tensor(method: str, kind: str, base: torch.Tensor | None, tensors: torch.Tensor,
                 weights: torch.Tensor, p: Parameters) -> torch.Tensor:
    """Merged weights of one tensor: ``W0 + lam * D``, or the weighted average for ``linear``."""
    if method == "linear":
        return linear_weights(tensors, weights)
    delta = merged_delta(method, kind, tensors - base, weights, p)
    return base + p.scale * delta

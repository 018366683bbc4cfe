"""Low-rank deltas: the ``LowRank`` type (``left @ right``) and its algebra, exact where it
can be (a weighted sum concatenates factors) and best-approximating where it must be (the
rank truncation of an adapter output). LoRA adapters' deltas arrive in this form
(adapters.py); DRM's factored form is methods/drm.py ``drm_lowrank_delta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .decompose import DECOMP_DTYPE


@dataclass(frozen=True)
class LowRank:
    """A delta held as ``left @ right``: ``left`` (n, r), ``right`` (r, m)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def t(self) -> "LowRank":
        return LowRank(self.right.T, self.left.T)

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.left.dtype
        return self.left.to(dtype) @ self.right.to(dtype)

    @staticmethod
    def zeros(n: int, m: int, dtype=DECOMP_DTYPE, device=None) -> "LowRank":
        return LowRank(torch.zeros(n, 0, dtype=dtype, device=device), torch.zeros(0, m, dtype=dtype, device=device))


Factors = Sequence["LowRank | None"]  # one entry per task; None: the task leaves this matrix alone


def weighted_sum(factors: Factors, shape: tuple[int, int], weights: torch.Tensor) -> LowRank:
    """``sum_t w_t D_t`` exactly, by concatenating factors (task arithmetic, linear)."""
    live = [(float(w), f) for w, f in zip(weights.tolist(), factors) if f is not None and f.rank > 0]
    if not live:
        device = next((f.left.device for f in factors if f is not None), None)
        return LowRank.zeros(*shape, device=device)
    left = torch.cat([w * f.left.to(DECOMP_DTYPE) for w, f in live], dim=1)
    right = torch.cat([f.right.to(DECOMP_DTYPE) for _, f in live], dim=0)
    return LowRank(left, right)


def truncated(delta: LowRank, rank: int) -> tuple[LowRank, float, float]:
    """Best rank-``rank`` approximation of a factored delta (Eckart-Young), with the
    squared Frobenius norms kept and total: ``(approx, kept, total)``.

    The approximation is split as ``left = U sqrt(s)``, ``right = sqrt(s) V^T`` so both
    factors have the same scale (safe to store in half precision). It may hold fewer
    than ``rank`` components when the delta's rank is lower.
    """
    n, m = delta.shape
    if delta.rank == 0:
        return LowRank.zeros(n, m, device=delta.left.device), 0.0, 0.0
    q_l, r_l = torch.linalg.qr(delta.left.to(DECOMP_DTYPE))
    q_r, r_r = torch.linalg.qr(delta.right.to(DECOMP_DTYPE).T)
    u_c, s, vh_c = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)
    total = float((s * s).sum())
    k = min(rank, int((s > 0).sum()))
    root = s[:k].sqrt()
    approx = LowRank((q_l @ u_c[:, :k]) * root, root[:, None] * (vh_c[:k] @ q_r.T))
    return approx, float((s[:k] * s[:k]).sum()), total


def dense_to_lowrank(delta: torch.Tensor) -> LowRank:
    """A dense merged delta as factors (thin SVD), for adapter output of merges that
    have no factored form (TIES, vector-like rules, mixed inputs)."""
    u, s, vh = torch.linalg.svd(delta.to(DECOMP_DTYPE), full_matrices=False)
    return LowRank(u * s, vh)

"""DRM (and the linear baselines) on low-rank task deltas, without the dense stack.

A LoRA adapter's delta is ``D_t = B_t A_t`` (scaling folded into ``B_t``), so the
vertical stack of step 2 factors as

    S = [B_1 A_1; ...; B_T A_T] = blockdiag(B_1..B_T) @ [A_1; ...; A_T].

With ``B_t = Q_t R_t`` and ``[A_1; ...; A_T]^T = Q_A R_A`` (thin QRs),
``S = blockdiag(Q_t) (blockdiag(R_t) R_A^T) Q_A^T``; both outer factors have orthonormal
columns, so the SVD of the small core ``C = blockdiag(R_t) R_A^T`` (at most
``sum r_t`` square) ``C = U_c diag(s) V_c^T`` gives the SVD of ``S``:

    U = blockdiag(Q_t) U_c,   V = Q_A V_c,   same s.

That is everything ``merge_loadings`` (steps 3-8, shared with the dense path in
``drm.py``) needs: ``P_t = D_t V = U_t diag(s) = Q_t U_c[rows of t] diag(s)`` and ``V``.
Every step costs O((n + m) R^2 + R^3) for R = sum of ranks; nothing n x m is formed
except the one merged output the caller may ask for (``LowRank.dense``).

Horizontal DRM is vertical DRM on the transposes, as in ``drm.py``: ``D_t^T = A_t^T B_t^T``
is again a factored delta with the roles of the factors swapped.

The decomposition runs in float64 like the dense path's Gram matrix, so the two agree to
rounding (DESIGN.md s.3 asks 1e-5 on small matrices; the tests check both dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..errors import MergeError
from ..spec import Parameters
from .drm import DECOMP_DTYPE, merge_loadings


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


def lowrank_row_basis(factors: Factors, shape: tuple[int, int], rank_threshold: float):
    """Step 2 (vertical) from factors: ``(P, V)`` with ``P[t] = D_t V`` (T, n, k) and ``V``
    (m, k), keeping ``s_i > rho * s_1``; ``None`` if every delta is zero.

    Same contract as ``drm.shared_row_basis`` on the materialised stack.
    """
    n, m = shape
    live = [(t, f) for t, f in enumerate(factors) if f is not None and f.rank > 0]
    if not live:
        return None
    device = live[0][1].left.device
    qs, rs = [], []
    for _, f in live:
        q, r = torch.linalg.qr(f.left.to(DECOMP_DTYPE))  # q (n, k_t), r (k_t, r_t)
        qs.append(q)
        rs.append(r)
    a_stack = torch.cat([f.right.to(DECOMP_DTYPE) for _, f in live])  # (R, m)
    q_a, r_a = torch.linalg.qr(a_stack.T)  # q_a (m, k_a), r_a (k_a, R)
    core = torch.block_diag(*rs) @ r_a.T  # (sum k_t, k_a)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return None
    keep = (s > rank_threshold * s[0]) & (s > 0)
    s, u_c, v_c = s[keep], u_c[:, keep], vh_c[keep].T
    v = q_a @ v_c  # (m, k)
    loadings = torch.zeros(len(factors), n, s.numel(), dtype=DECOMP_DTYPE, device=device)
    row = 0
    for (t, _), q in zip(live, qs):
        rows = q.shape[1]
        loadings[t] = q @ (u_c[row:row + rows] * s)
        row += rows
    return loadings, v


def drm_lowrank_delta(factors: Factors, shape: tuple[int, int], weights: torch.Tensor, p: Parameters) -> LowRank:
    """Merged DRM delta (steps 2-9) of T factored deltas, returned factored: ``M @ V^T``
    (vertical) or ``V M^T`` (horizontal). Float64; the caller casts."""
    if p.direction == "horizontal":
        transposed = [f.t() if f is not None else None for f in factors]
        return drm_lowrank_delta(transposed, (shape[1], shape[0]), weights, replace(p, direction="vertical")).t()
    basis = lowrank_row_basis(factors, shape, p.rank_threshold)
    if basis is None:  # every delta is zero
        device = next((f.left.device for f in factors if f is not None), None)
        return LowRank.zeros(*shape, device=device)
    loadings, v = basis
    merged = merge_loadings(loadings, weights.to(device=loadings.device, dtype=loadings.dtype), p)  # steps 3-8
    return LowRank(merged, v.T)  # step 9, kept factored


def weighted_sum(factors: Factors, shape: tuple[int, int], weights: torch.Tensor) -> LowRank:
    """``sum_t w_t D_t`` exactly, by concatenating factors (task arithmetic, linear)."""
    live = [(float(w), f) for w, f in zip(weights.tolist(), factors) if f is not None and f.rank > 0]
    if not live:
        device = next((f.left.device for f in factors if f is not None), None)
        return LowRank.zeros(*shape, device=device)
    left = torch.cat([w * f.left.to(DECOMP_DTYPE) for w, f in live], dim=1)
    right = torch.cat([f.right.to(DECOMP_DTYPE) for _, f in live], dim=0)
    return LowRank(left, right)


def linear_factor_weights(weights: torch.Tensor) -> torch.Tensor:
    """``linear`` over models that share the base is ``W0 + sum_t w_t D_t / sum_t w_t``."""
    total = float(weights.sum())
    if total == 0.0:
        raise MergeError("invalid_spec", "linear merge needs model weights that do not sum to zero", param="models")
    return weights / total


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


def mixed_merged_delta(method: str, kind: str, deltas: Sequence["torch.Tensor | LowRank | None"],
                       shape: tuple[int, ...], weights: torch.Tensor, p: Parameters) -> "LowRank | torch.Tensor":
    """Merged delta of one tensor whose task deltas may be dense, factored or absent (zero).

    All-factored DRM matrices and the linear baselines stay factored; anything else
    (a full fine-tune among the inputs, TIES, vector-like rules) materialises the
    factored deltas and runs the dense method, so results never depend on the path.
    For ``linear`` the deltas are relative to the base: ``sum_t w_t D_t / sum_t w_t``.
    """
    from . import MATRIX, merged_delta
    from .task_arithmetic import task_arithmetic_delta

    factored = all(d is None or isinstance(d, LowRank) for d in deltas)
    if factored and len(shape) == 2:
        if method == "drm" and kind == MATRIX:
            return drm_lowrank_delta(deltas, shape, weights, p)
        if method == "task_arithmetic":
            return weighted_sum(deltas, shape, weights)
        if method == "linear":
            return weighted_sum(deltas, shape, linear_factor_weights(weights))
    dtype = next((d.dtype for d in deltas if isinstance(d, torch.Tensor)), torch.float32)
    device = next((d.device if isinstance(d, torch.Tensor) else d.left.device for d in deltas if d is not None), None)
    stack = torch.stack([torch.zeros(shape, dtype=dtype, device=device) if d is None
                         else d.dense(dtype) if isinstance(d, LowRank) else d.to(dtype) for d in deltas])
    if method == "linear":
        return task_arithmetic_delta(stack, linear_factor_weights(weights))
    return merged_delta(method, kind, stack, weights, p)

"""An independent, literal float64 DRM (docs/DESIGN.md, "DRM, step by step", steps 2-9 via a float64 SVD of the stack).

Used by the bench to measure every implementation's error against exact arithmetic.
It shares no code with the engine on purpose.
"""

from __future__ import annotations

import torch


def _elect(stack: torch.Tensor) -> torch.Tensor:
    total = stack.sum(0)
    sigma = torch.sign(total)
    fb = torch.sign(sigma.sum()) or torch.tensor(1.0, dtype=stack.dtype)
    return torch.where(total == 0, fb, sigma)


def drm_reference(deltas: torch.Tensor, weights=None, direction: str = "vertical", drop_rate: float = 0.8,
                  rank_threshold: float = 0.01, svd_dtype=torch.float64) -> torch.Tensor:
    """Merged delta of a (T, n, m) stack, computed with one SVD of the stack in ``svd_dtype``
    and everything else in that dtype too (float32 = the research script's way)."""
    d = deltas.to(svd_dtype)
    t, n, m = d.shape
    w = torch.ones(t, dtype=svd_dtype) if weights is None else torch.as_tensor(weights, dtype=svd_dtype)
    if direction == "vertical":
        stack = d.reshape(t * n, m)
        u, s, vh = torch.linalg.svd(stack, full_matrices=False)
        keep = s > rank_threshold * s[0]
        u, s, vh = u[:, keep], s[keep], vh[keep]
        blocks = u.reshape(t, n, -1)  # U_t, (T, n, r)
        c = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)  # (T, 1, r)
    else:
        stack = d.permute(1, 0, 2).reshape(n, t * m)
        u, s, vh = torch.linalg.svd(stack, full_matrices=False)
        keep = s > rank_threshold * s[0]
        u, s, vh = u[:, keep], s[keep], vh[keep]
        blocks = vh.reshape(-1, t, m).permute(1, 2, 0)  # V_t as (T, m, r)
        c = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)
    vec = torch.where(c > 0, blocks / torch.where(c > 0, c, 1.0), 0.0)
    spec = s * c  # (T, 1, r)
    mags = vec.abs().reshape(-1)
    k = mags.numel() - round(mags.numel() * (1 - drop_rate))
    if k > 0:
        thr = torch.sort(mags).values[k - 1]
        vec = torch.where(vec.abs() < thr, 0.0, vec)
    mt = vec * spec
    sigma = _elect(mt)
    mt = torch.where(torch.sign(mt) == sigma, mt, 0.0) * w.reshape(-1, 1, 1)
    cnt = (mt != 0).sum(0).clamp_min(1)
    merged = mt.sum(0) / cnt
    if direction == "vertical":
        return merged @ vh  # (n, r) @ (r, m)
    return u @ merged.T  # (n, r) @ (r, m)

"""Building blocks shared by the TIES-style merges: trim, elect signs, disjoint mean."""

from __future__ import annotations

import torch


def keep_top_magnitudes(t: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero all but the ``int(fraction * numel)`` largest-magnitude entries (at least one).

    ``int`` (not ``round``) and ``topk`` match mergekit's magnitude sparsification, so
    our TIES agrees with it entry for entry.
    """
    if fraction >= 1.0:
        return t
    flat = t.reshape(-1)
    k = max(1, int(fraction * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), k, largest=True, sorted=False).indices] = True
    return (flat * mask).reshape(t.shape)


def elect_signs(stack: torch.Tensor) -> torch.Tensor:
    """Per-entry majority sign of a (T, ...) stack: ``sign(sum_t stack_t)``.

    Where that sum is exactly zero, the sign of the sum of all elected signs is used,
    so every entry gets a definite sign.
    """
    total = stack.sum(dim=0)
    sigma = torch.sign(total)
    fallback = torch.sign(sigma.sum())
    if fallback == 0:
        fallback = torch.ones((), dtype=sigma.dtype, device=sigma.device)
    return torch.where(total == 0, fallback, sigma)


def combine(stack: torch.Tensor, weights: torch.Tensor, *, sign_election: bool,
            disjoint_mean: bool, elect_on_weighted: bool) -> torch.Tensor:
    """Sign election, per-model weights and (disjoint) mean over a (T, ...) stack.

    DRM elects signs before weighting (DESIGN.md s.3 steps 6-7); TIES elects on the
    weighted deltas, as mergekit does. ``weights`` has shape (T,).
    """
    w = weights.to(stack.dtype).reshape((-1,) + (1,) * (stack.dim() - 1))
    weighted = stack * w
    if sign_election:
        sigma = elect_signs(weighted if elect_on_weighted else stack)
        weighted = torch.where(torch.sign(stack) == sigma, weighted, torch.zeros((), dtype=stack.dtype, device=stack.device))
    total = weighted.sum(dim=0)
    if disjoint_mean:
        count = (weighted != 0).sum(dim=0).clamp_min(1)
        return total / count
    return total / stack.shape[0]

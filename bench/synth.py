"""Realistic synthetic fine-tuning deltas: low-rank structure plus noise, not pure noise.

A full fine-tune moves each weight matrix mostly along a few directions (some shared
by every task, some task-specific, with a decaying spectrum) plus a broad noise floor.
We model that as ``D_t = shared_t + specific_t + noise_t`` with the noise floor's top
singular value ~15% of the structured part's, so that most of the spectrum lies above
DRM's 1% rank threshold, as it does for real full fine-tunes. Deterministic per seed.
"""

from __future__ import annotations

import torch


def _low_rank(n: int, m: int, rank: int, top: float, decay: float, gen: torch.Generator) -> torch.Tensor:
    rank = min(rank, n, m)
    a = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0]
    b = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0]
    s = top * torch.arange(1, rank + 1, dtype=torch.float32) ** -decay
    return (a * s) @ b.T


def task_delta(shape: tuple[int, ...], seed: int, task: int, scale: float = 1e-3) -> torch.Tensor:
    """Task ``task``'s float32 delta for a tensor; the shared directions depend on ``seed``
    only, so every task of one tensor shares them. ``scale`` ~ typical entry magnitude."""
    task_gen = torch.Generator().manual_seed(seed * 7919 + task + 1)
    if len(shape) == 1:
        return torch.randn(tuple(shape), generator=task_gen) * scale
    n, m = shape[0], int(torch.tensor(shape[1:]).prod())
    top = scale * (n * m) ** 0.5 / 3.0  # structured part carries most of the energy
    shared = _low_rank(n, m, 8, top, 0.8, torch.Generator().manual_seed(seed))
    coef = 0.5 + torch.rand((), generator=task_gen)
    sign = 1.0 if torch.rand((), generator=task_gen) < 0.7 else -1.0
    out = shared.mul_(sign * coef).add_(_low_rank(n, m, 32, top, 0.7, task_gen))
    noise_std = 0.15 * top / (n ** 0.5 + m ** 0.5)  # Marchenko-Pastur edge ~ 15% of s_1
    out.add_(torch.randn(n, m, generator=task_gen), alpha=noise_std)
    return out.reshape(tuple(shape))


def task_deltas(shape: tuple[int, ...], tasks: int, seed: int, scale: float = 1e-3) -> torch.Tensor:
    """(tasks, *shape) float32 deltas of one tensor."""
    return torch.stack([task_delta(shape, seed, t, scale) for t in range(tasks)])

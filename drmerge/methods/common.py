"""Building blocks shared by the TIES-style merges: trim, elect signs, disjoint mean."""

from __future__ import annotations

import torch


def keep_top_magnitudes(t: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero all but the ``int(fraction * numel)`` largest-magnitude entries (at least one).

    ``int`` (not ``round``) and exactly k kept entries match mergekit's magnitude
    sparsification. Entries tied at the k-th magnitude are kept lowest flat index first,
    so the result is deterministic on every device (``topk``/``argsort`` break such ties
    arbitrarily) and a tensor merged in chunks gets the same mask (``TopMask``).
    """
    if fraction >= 1.0 or t.numel() == 0:
        return t
    mask = TopMask.of(t, fraction)
    return t * mask.chunk(t.reshape(-1).abs(), 0).reshape(t.shape)


class TopMask:
    """The keep-mask of ``keep_top_magnitudes``, applicable chunk by chunk: everything
    above the k-th largest magnitude, plus the first ``ties`` entries equal to it."""

    def __init__(self, threshold: torch.Tensor, ties: int):
        self.threshold, self.ties = threshold, ties

    @classmethod
    def of(cls, t: torch.Tensor, fraction: float) -> "TopMask":
        mags = t.reshape(-1).abs()
        k = max(1, int(fraction * mags.numel()))
        threshold = torch.kthvalue(mags, mags.numel() - k + 1).values  # the k-th largest
        return cls(threshold, k - int((mags > threshold).sum()))

    def chunk(self, mags: torch.Tensor, ties_before: int) -> torch.Tensor:
        """Mask of a flat chunk of magnitudes; ``ties_before``: entries equal to the
        threshold in the chunks before it (see ``count_ties``)."""
        keep = mags > self.threshold
        if self.ties > ties_before:
            equal = mags == self.threshold
            rank = torch.cumsum(equal, 0) + ties_before  # 1-based rank among tied entries
            keep |= equal & (rank <= self.ties)
        return keep

    def count_ties(self, mags: torch.Tensor) -> int:
        return int((mags == self.threshold).sum())


def elect_signs(stack: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Per-entry majority sign of a (T, ...) stack: ``sign(sum_t stack_t)``.

    Where that sum is exactly zero, the sign of the sum of all elected signs is used,
    so every entry gets a definite sign. ``fallback`` supplies that sign when the stack
    is one chunk of a larger tensor (see methods.elementwise).
    """
    total = stack.sum(dim=0)
    sigma = torch.sign(total)
    if fallback is None:
        fallback = fallback_sign(sigma.sum())
    return torch.where(total == 0, fallback.to(sigma.dtype), sigma)


def fallback_sign(sign_sum: torch.Tensor) -> torch.Tensor:
    """Sign used where an entry's sum is zero: that of the sum of elected signs, else +1."""
    fallback = torch.sign(sign_sum)
    if fallback == 0:
        fallback = torch.ones((), dtype=fallback.dtype, device=fallback.device)
    return fallback


def combine(stack: torch.Tensor, weights: torch.Tensor, *, sign_election: bool,
            disjoint_mean: bool, elect_on_weighted: bool, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Sign election, per-model weights and (disjoint) mean over a (T, ...) stack.

    DRM elects signs before weighting (DESIGN.md s.3 steps 6-7); TIES elects on the
    weighted deltas, as mergekit does. ``weights`` has shape (T,). ``fallback``: see
    ``elect_signs``.
    """
    w = weights.to(stack.dtype).reshape((-1,) + (1,) * (stack.dim() - 1))
    weighted = stack * w
    if sign_election:
        sigma = elect_signs(weighted if elect_on_weighted else stack, fallback)
        weighted = torch.where(torch.sign(stack) == sigma, weighted, torch.zeros((), dtype=stack.dtype, device=stack.device))
    total = weighted.sum(dim=0)
    if disjoint_mean:
        count = (weighted != 0).sum(dim=0).clamp_min(1)
        return total / count
    return total / stack.shape[0]

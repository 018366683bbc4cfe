"""The top-k magnitude trim (TIES's density, DRM's trim of vector-like tensors) and the
k-th largest magnitude it rests on (also DRM's pooled pruning, step 4)."""

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
    above the k-th largest magnitude ``threshold``, plus the entries equal to it up to flat
    index ``last_tie`` (the lowest-index ones, as many as k needs)."""

    def __init__(self, threshold: torch.Tensor, last_tie: int):
        self.threshold, self.last_tie = threshold, last_tie

    @classmethod
    def of(cls, t: torch.Tensor, fraction: float) -> "TopMask":
        return cls.of_magnitudes(t.reshape(-1).abs(), fraction)

    @classmethod
    def of_magnitudes(cls, mags: torch.Tensor, fraction: float) -> "TopMask":
        """The mask of a flat tensor of magnitudes (``abs()`` of the values)."""
        k = max(1, int(fraction * mags.numel()))
        threshold, _, last_tie = kth_largest(mags, k)
        return cls(threshold, last_tie)

    def chunk(self, mags: torch.Tensor, start: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Mask (bool) of the flat chunk of magnitudes that starts at flat index ``start``."""
        keep = mags > self.threshold if out is None else torch.gt(mags, self.threshold, out=out)
        if start <= self.last_tie:
            equal = mags == self.threshold
            cut = self.last_tie + 1 - start
            if cut < equal.numel():
                equal[cut:] = False
            keep |= equal
        return keep


# Below this many entries a plain ``kthvalue`` is as fast as the radix select.
RADIX_MIN = 1 << 16
_FINITE_LIMIT = 0x7F80  # high 16 bits of float32 +inf: buckets from here on hold inf and NaN


def kth_largest(mags: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The k-th largest entry of a flat tensor of magnitudes (>= 0, 1 <= k <= numel), how
    many entries are larger, and the flat index of the ``k - larger``-th entry equal to it
    (so keeping the larger ones and the equal ones up to that index keeps exactly k):
    the value and count ``kthvalue`` gives, computed faster.

    float32 on the CPU: a radix select. Non-negative floats order like their bit
    patterns, so one histogram of the high 16 bits (``bincount``) finds the bucket that
    holds the k-th largest, and ``kthvalue`` runs only on that bucket's entries (about
    two passes over the data instead of a copy plus a quickselect over all of it, which
    ``kthvalue`` alone does single-threaded). Any other case, or magnitudes holding
    inf/NaN, uses ``kthvalue`` on everything.
    """
    n = mags.numel()
    if mags.dtype == torch.float32 and mags.device.type == "cpu" and n >= RADIX_MIN and mags.is_contiguous():
        hi = mags.view(torch.int32) >> 16
        cum = torch.bincount(hi, minlength=1 << 15).cumsum(0)
        idx = n - k  # 0-based ascending position of the k-th largest
        if int(cum[_FINITE_LIMIT - 1]) == n:  # no inf/NaN (kthvalue orders NaN its own way)
            b = int(torch.searchsorted(cum, torch.tensor(idx, dtype=cum.dtype), right=True))
            below = int(cum[b - 1]) if b else 0
            where = (hi == b).nonzero().reshape(-1)  # ascending flat indexes of the bucket
            del hi
            bucket = mags[where]
            threshold = torch.kthvalue(bucket, idx - below + 1).values
            greater = n - int(cum[b]) + int((bucket > threshold).sum())
            equal = where[bucket == threshold]
            return threshold, greater, int(equal[k - greater - 1])
    threshold = torch.kthvalue(mags, n - k + 1).values
    greater = int((mags > threshold).sum())
    equal = (mags == threshold).nonzero().reshape(-1)  # empty for a NaN threshold: no tie kept
    return threshold, greater, int(equal[min(k - greater, equal.numel()) - 1]) if equal.numel() else -1

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


class FloorMask:
    """``TopMask``'s interface for a trim by a given magnitude: keep the entries whose
    magnitude is at least ``floor`` (DRM's pooled trim; ``PooledKth`` finds the floor)."""

    def __init__(self, floor: float):
        self.floor = floor

    def chunk(self, mags: torch.Tensor, start: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return mags >= self.floor if out is None else torch.ge(mags, self.floor, out=out)


def mask_of(mags: torch.Tensor, keep: float, floor: float | None) -> "TopMask | FloorMask":
    """The keep-mask of one model's flat magnitudes: its top ``keep`` fraction, or the
    entries at or above ``floor`` when one is given."""
    if floor is not None:
        return FloorMask(floor)
    return TopMask.of_magnitudes(mags, keep)


class PooledKth:
    """The k-th smallest magnitude of a pool of float32 magnitudes seen in pieces (many
    tensors, each read chunk by chunk), exactly and in bounded memory: two passes over the
    pool. Non-negative float32 values order like their bit patterns, so pass 1 histograms
    the high 16 bits of every entry (``add``), ``select(k)`` finds the bucket that holds the
    k-th smallest, and pass 2 histograms the low 16 bits of that bucket's entries (``add``
    again), which pins the value down bit for bit (``value``): what ``kthvalue`` of the
    concatenated pool gives. Memory: two histograms of 2^16 counters."""

    def __init__(self):
        self.hist = torch.zeros(1 << 16, dtype=torch.int64)
        self.count = 0
        self.bucket: int | None = None
        self.rank = 0
        self.low: torch.Tensor | None = None

    def add(self, mags: torch.Tensor) -> None:
        """One piece of the pool (float32 magnitudes, >= 0 and finite), in either pass."""
        bits = mags.reshape(-1).to(device="cpu", dtype=torch.float32).contiguous().view(torch.int32)
        if self.bucket is None:
            self.hist += torch.bincount(bits >> 16, minlength=1 << 16)
            self.count += bits.numel()
        else:
            inside = bits[(bits >> 16) == self.bucket] & 0xFFFF
            self.low += torch.bincount(inside, minlength=1 << 16)

    def add_zeros(self, n: int) -> None:
        """``n`` entries of magnitude 0 (a model that leaves a tensor alone)."""
        if self.bucket is None:
            self.hist[0] += n
            self.count += n
        elif self.bucket == 0:
            self.low[0] += n

    def select(self, k: int) -> None:
        """After pass 1: look for the k-th smallest (1 <= k <= count) in pass 2."""
        cum = self.hist.cumsum(0)
        self.bucket = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype)))  # first with cum >= k
        self.rank = k - (int(cum[self.bucket - 1]) if self.bucket else 0)
        self.low = torch.zeros(1 << 16, dtype=torch.int64)

    def value(self) -> float:
        """After pass 2: the k-th smallest magnitude."""
        cum = self.low.cumsum(0)
        low = int(torch.searchsorted(cum, torch.tensor(self.rank, dtype=cum.dtype)))
        bits = torch.tensor([(self.bucket << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32)[0])


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

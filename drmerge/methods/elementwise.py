"""Element-wise merges (task arithmetic, TIES, linear, and DRM's rule for vector-like
tensors) executed chunk by chunk, so that a large tensor (a 32000 x 4096 embedding) never
needs T float32 copies of itself plus their temporaries: memory per tensor is the inputs
as read, the output, and a few chunks.

The result equals the whole-tensor functions (``merge_tensor``) exactly. Two quantities
span a whole tensor: each model's top-k keep-mask threshold (``TopMask``), computed
first, and the fallback sign of the sign election, summed over the chunks as they are
merged (the few chunks it changes are merged again). Every chunk goes through the same
``combine`` as a whole tensor would.

Fast paths, equal bit for bit to the general code (tests/test_perf_paths.py): task
arithmetic accumulates into preallocated chunk buffers, checking finiteness once on the
result (a non-finite input always makes it non-finite; the inputs are then checked one
by one to name the culprit); for TIES/DRM trims the finiteness of every input follows
from that of the whole deltas computed for the masks, and the sign election reuses the
sums it computed and skips multiplying by unit weights.
"""

from __future__ import annotations

import math

import torch

from ..errors import MergeError
from ..spec import Parameters
from .common import TopMask, combine, fallback_sign
from .linear import linear_weights
from .task_arithmetic import task_arithmetic_delta

CHUNK_ELEMENTS = 1 << 20  # per model: 4 MB of float32 (a chunk's temporaries stay ~100 MB at T=6)


def is_elementwise(method: str, kind: str, matrix_kind: str) -> bool:
    """Every method but DRM on a matrix combines entries independently of each other."""
    return method != "drm" or kind != matrix_kind


def merge_elementwise(method: str, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: torch.Tensor,
                      p: Parameters, *, compute_dtype: torch.dtype, device: torch.device, out_dtype: torch.dtype,
                      check_finite=None, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Merged tensor (``out_dtype``, on the CPU) of ``tensors`` (as read, any float dtype;
    or pipeline.LazyTensor objects that read each chunk from storage when it is needed).

    ``check_finite(base_chunk, stack_chunk)`` is called on every chunk before use."""
    shape = tensors[0].shape
    flats = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    n = flats[0].numel()
    spans = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    w = weights.to(device=device, dtype=compute_dtype)
    unit = bool((w == 1).all())  # x * 1 == x exactly: the weighting can be skipped
    if method == "task_arithmetic" and flat_base is not None:
        return _task_arithmetic(flat_base, flats, w, unit, p.scale, spans, compute_dtype=compute_dtype,
                                device=device, out_dtype=out_dtype, check_finite=check_finite).reshape(shape)

    def load(a: int, b: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        stack = torch.empty((len(flats), b - a), dtype=compute_dtype, device=device)
        for i, f in enumerate(flats):
            stack[i].copy_(f[a:b])
        bc = flat_base[a:b].to(device=device, dtype=compute_dtype) if flat_base is not None else None
        if check_finite is not None and not inputs_finite:
            check_finite(bc, stack)
        if bc is not None:
            stack -= bc
        return bc, stack

    # Whole-tensor quantities first: per-model keep-masks (TIES density / DRM's optional trim).
    fraction = p.density if method == "ties" else (1.0 - p.nonlinear_drop_rate if method == "drm" else 1.0)
    masks = None
    inputs_finite = False  # known to be finite already (then chunks are not checked again)
    if fraction < 1.0 and n:
        masks = []
        all_finite = True
        whole_base = flat_base.to(device=device, dtype=compute_dtype) if flat_base is not None else None
        for f in flats:
            if whole_base is not None and isinstance(f, torch.Tensor) and f.dtype == compute_dtype \
                    and f.device == whole_base.device:
                d = f - whole_base  # never in place: ``f`` is the caller's tensor
            else:
                d = f.to(device=device, dtype=compute_dtype, copy=True)
                if whole_base is not None:
                    d -= whole_base
            # W_t - W0 finite implies both finite; ``d`` is only needed as magnitudes now.
            all_finite = all_finite and _finite(d)
            masks.append(TopMask.of_magnitudes(d.reshape(-1).abs_(), fraction))
            del d
        del whole_base
        inputs_finite = all_finite

    def trimmed(a: int, b: int, ties_seen: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        bc, stack = load(a, b)
        if masks is not None:
            for i, m in enumerate(masks):
                mags = stack[i].abs()
                stack[i] *= m.chunk(mags, ties_seen[i])
                if ties_seen[i] < m.ties:  # past that, the count no longer changes any mask
                    ties_seen[i] += m.count_ties(mags)
        return bc, stack

    elect_on_weighted = method == "ties"
    electing = method in ("ties", "drm") and p.sign_election
    out = torch.empty(n, dtype=out_dtype)
    seen = [0] * len(flats)
    sign_sum = 0.0
    provisional = torch.ones((), dtype=compute_dtype, device=device)
    redo: list[tuple[int, int, list[int]]] = []  # chunks whose result depends on the fallback sign
    for a, b in spans:
        if method == "linear":
            _, stack = load(a, b)  # no base: the stack holds the weights themselves
            out[a:b] = linear_weights(stack, w).to(out_dtype).cpu()
            continue
        ties_before = list(seen)
        bc, stack = trimmed(a, b, seen)
        if method == "task_arithmetic":
            delta = task_arithmetic_delta(stack, w)
        elif electing:
            # The fallback sign (for entries whose sum is exactly 0) spans the whole tensor;
            # it only matters where such an entry has a nonzero delta. Merge with +1 now and
            # redo just those chunks if the tensor's fallback turns out to be -1.
            if unit:
                delta, total, count = _elect_unit(stack, provisional, p.disjoint_mean)
                sign_sum += float(torch.sign(total).sum())
                # Unit weights: an entry with sum 0 and a nonzero delta has deltas of both
                # signs, so it kept some (count > 0) under the provisional sign.
                if bool(((total == 0) & (count > 0)).any()):
                    redo.append((a, b, ties_before))
            else:
                total = (stack * w.reshape(-1, 1) if elect_on_weighted else stack).sum(dim=0)
                sign_sum += float(torch.sign(total).sum())
                if bool(((total == 0) & (stack != 0).any(dim=0)).any()):
                    redo.append((a, b, ties_before))
                delta = combine(stack, w, sign_election=True, disjoint_mean=p.disjoint_mean,
                                elect_on_weighted=elect_on_weighted, fallback=provisional)
        elif method in ("ties", "drm"):
            delta = combine(stack, w, sign_election=False, disjoint_mean=p.disjoint_mean,
                            elect_on_weighted=elect_on_weighted)
        else:
            raise MergeError("internal_error", f"method {method!r} is not element-wise")
        _store(out, a, b, bc, delta, p.scale)
    if redo:
        fallback = fallback_sign(torch.tensor(sign_sum, dtype=compute_dtype, device=device))
        if fallback != provisional:
            for a, b, ties_before in redo:
                bc, stack = trimmed(a, b, list(ties_before))
                delta = combine(stack, w, sign_election=True, disjoint_mean=p.disjoint_mean,
                                elect_on_weighted=elect_on_weighted, fallback=fallback)
                out[a:b] = (bc + p.scale * delta).to(out_dtype).cpu()
    return out.reshape(shape)


def _finite(t: torch.Tensor) -> bool:
    """True only if every entry is finite: an inf or NaN entry makes the sum inf or NaN.
    (A sum that overflows gives a false alarm, which callers follow by exact checks.)
    One reduction, ~30x cheaper than ``isfinite(t).all()`` on the CPU."""
    return math.isfinite(float(t.sum()))


def _store(out: torch.Tensor, a: int, b: int, bc: torch.Tensor, delta: torch.Tensor, scale: float) -> None:
    """``out[a:b] = bc + scale * delta`` in the output dtype (``1.0 * x == x``: skipped)."""
    merged = delta.mul_(scale) if scale != 1.0 else delta
    merged.add_(bc)  # == bc + merged: IEEE addition is commutative
    if merged.device.type == "cpu":
        out[a:b].copy_(merged)
    else:
        out[a:b] = merged.to(out.dtype).cpu()


def _elect_unit(stack: torch.Tensor, fallback: torch.Tensor, disjoint_mean: bool):
    """``combine(stack, ones, sign_election=True, ...)`` with the weighting skipped (unit
    weights: the weighted stack is the stack), also returning the entry sums and the
    number of kept deltas per entry."""
    total = stack.sum(dim=0)
    sigma = torch.where(total == 0, fallback.to(stack.dtype), torch.sign(total))
    agree = torch.sign(stack) == sigma  # sigma is +-1: only nonzero deltas agree
    kept = torch.where(agree, stack, torch.zeros((), dtype=stack.dtype, device=stack.device))
    count = agree.sum(dim=0)
    merged = kept.sum(dim=0)
    if disjoint_mean:
        return merged / count.clamp_min(1), total, count
    return merged / stack.shape[0], total, count


def _task_arithmetic(flat_base: torch.Tensor, flats: list, w: torch.Tensor, unit: bool, scale: float,
                     spans: list[tuple[int, int]], *, compute_dtype: torch.dtype, device: torch.device,
                     out_dtype: torch.dtype, check_finite) -> torch.Tensor:
    """``W0 + lam * sum_t w_t (W_t - W0)`` chunk by chunk in three preallocated buffers
    (the sum in the order ``(stack * w).sum(dim=0)`` adds, so the result is the same)."""
    n = flats[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    if not spans:
        return out
    size = max(b - a for a, b in spans)
    acc, tmp, base = (torch.empty(size, dtype=compute_dtype, device=device) for _ in range(3))
    for a, b in spans:
        length = b - a
        bc, total, d = base[:length], acc[:length], tmp[:length]
        bc.copy_(flat_base[a:b])
        total.zero_()
        for i, f in enumerate(flats):
            d.copy_(f[a:b])
            d -= bc
            if not unit:
                d *= w[i]
            total += d
        if check_finite is not None and not _finite(total):
            # Non-finite: an input is (NaN and inf always propagate here) or the sum
            # overflowed. The per-input check names the culprit, or lets an overflow pass.
            stack = torch.stack([f[a:b].to(device=device, dtype=compute_dtype) for f in flats])
            check_finite(bc, stack)
        _store(out, a, b, bc, total, scale)
    return out

"""The element-wise executor: one method's ``ElementwiseRule`` (kernels/rules.py: trim,
sign rule, divisor, scale) run chunk by chunk over a tensor, so that a large tensor (a
32000 x 4096 embedding) never needs T float32 copies of itself plus their temporaries:
memory per tensor is the inputs as read, the output, and a few chunks. It knows no method
by name: task arithmetic, TIES, linear and DRM's rule for vector-like tensors are rules.

The result equals the whole-tensor form (``rule_delta``, ``MergeMethod.merge_tensor``)
exactly. Two quantities span a whole tensor: each model's top-k keep-mask threshold
(``TopMask``), computed first, and DRM's fallback sign of the sign election (that of the
sum of all elected signs, ``Sign.UNWEIGHTED``), summed over the chunks as they are merged
(the few chunks it changes are merged again); TIES's (``Sign.WEIGHTED``) is always +1, as
in mergekit. Every chunk goes through the same ``signs.combine`` as a whole tensor would.

Fast paths, equal bit for bit to the general code (tests/unit/test_perf_paths.py): a plain
weighted sum (task arithmetic) accumulates into preallocated chunk buffers, checking
finiteness once on the result (a non-finite input always makes it non-finite; the inputs
are then checked one by one to name the culprit); with a trim, the finiteness of every
input follows from that of the whole deltas computed for the masks, and a sign election
with unit weights reuses the sums it computed and skips multiplying by the weights.
"""

from __future__ import annotations

import math

import torch

from .rules import Divide, ElementwiseRule, Sign
from .signs import add_agreeing_, combine, fallback_sign
from .topk import TopMask, keep_top_magnitudes, mask_of

CHUNK_ELEMENTS = 1 << 20  # per model: 4 MB of float32 (a chunk's temporaries stay ~100 MB at T=6)


def rule_delta(rule: ElementwiseRule, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The rule on a whole (T, ...) stack of task deltas at once: the merged delta before
    the scale (``merge_elementwise`` equals ``W0 + scale * rule_delta``)."""
    if rule.trims and rule.floor is not None:
        floor = torch.tensor(rule.floor, dtype=deltas.dtype, device=deltas.device).reshape((-1,) + (1,) * (deltas.dim() - 1))
        deltas = deltas * (deltas.abs() >= floor)
    elif rule.trims:
        deltas = torch.stack([keep_top_magnitudes(d, k) for d, k in zip(deltas, rule.keeps(deltas.shape[0]))])
    return combine(deltas, weights, rule.sign, rule.divide)


def merge_elementwise(rule: ElementwiseRule, base: torch.Tensor | None, tensors: list[torch.Tensor],
                      weights: torch.Tensor, *, compute_dtype: torch.dtype, device: torch.device,
                      out_dtype: torch.dtype, check_finite=None, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Merged tensor (``out_dtype``, on the CPU) of ``tensors`` (as read, any float dtype;
    or inputs.LazyTensor objects that read each chunk from storage when it is needed).

    ``check_finite(base_chunk, stack_chunk)`` raises if a chunk's inputs are not finite;
    it is called on a chunk's inputs before use unless they are already known to be finite
    (trims: from the whole deltas; a plain sum: from a finite result)."""
    shape = tensors[0].shape
    flats = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    n = flats[0].numel()
    spans = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    w = weights.to(device=device, dtype=compute_dtype)
    unit = bool((w == 1).all())  # x * 1 == x exactly: the weighting can be skipped
    if rule.of_weights:  # e.g. linear: an average of the weights themselves; the base takes no part
        return _of_weights(rule, flats, w, spans, compute_dtype=compute_dtype, device=device, out_dtype=out_dtype,
                           check_finite=check_finite).reshape(shape)
    if flat_base is not None and rule.sign == Sign.NONE and rule.divide == Divide.NONE and not rule.trims:
        return _weighted_sum(flat_base, flats, w, unit, rule.scale, spans, compute_dtype=compute_dtype,
                             device=device, out_dtype=out_dtype, check_finite=check_finite).reshape(shape)

    def load(a: int, b: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        stack = _stack(flats, a, b, compute_dtype, device)
        bc = flat_base[a:b].to(device=device, dtype=compute_dtype) if flat_base is not None else None
        if check_finite is not None and not inputs_finite:
            check_finite(bc, stack)
        if bc is not None:
            stack -= bc
        return bc, stack

    # Whole-tensor quantities first: per-model keep-masks (the trim) and, for a sign
    # election, the entry sums (see _masks) that give DRM's fallback sign and the
    # unit-weight fast path its majority signs. TIES's sign at a zero sum is always +1
    # (mergekit's), so its chunks need nothing else from the whole tensor.
    masks, total, inputs_finite = None, None, False
    fallback = None
    if rule.trims and n:
        sums = rule.elects and (rule.sign == Sign.UNWEIGHTED or (unit and flat_base is not None))
        masks, total, inputs_finite = _masks(flats, flat_base, rule.keeps(len(flats)), spans, sums=sums,
                                             compute_dtype=compute_dtype, device=device, floors=rule.floor)
        if total is not None:
            if rule.sign == Sign.WEIGHTED:
                fallback = torch.ones((), dtype=compute_dtype, device=device)
            else:
                sign_sum = sum(float(torch.sign(total[a:b]).sum()) for a, b in spans)
                fallback = fallback_sign(torch.tensor(sign_sum, dtype=compute_dtype, device=device))
            # With unit weights the weighted and unweighted signs agree and the kept weights
            # are a count: TIES's rule is DRM's with the fallback +1.
            if unit and flat_base is not None and (inputs_finite or check_finite is None) \
                    and rule.divide in (Divide.COUNT, Divide.KEPT_WEIGHTS, Divide.MODELS):
                out = torch.empty(n, dtype=out_dtype)
                _elect_trimmed_unit(flat_base, flats, masks, total, fallback, spans, out,
                                    disjoint_mean=rule.divide != Divide.MODELS, scale=rule.scale,
                                    compute_dtype=compute_dtype, device=device)
                return out.reshape(shape)
            del total

    def trimmed(a: int, b: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        bc, stack = load(a, b)
        if masks is not None:
            for i, m in enumerate(masks):
                stack[i] *= m.chunk(stack[i].abs(), a)
        return bc, stack

    out = torch.empty(n, dtype=out_dtype)
    sign_sum = 0.0
    provisional = torch.ones((), dtype=compute_dtype, device=device)
    redo: list[tuple[int, int]] = []  # chunks whose result depends on DRM's fallback sign
    for a, b in spans:
        bc, stack = trimmed(a, b)
        if rule.sign == Sign.UNWEIGHTED and fallback is None:
            # DRM's fallback sign (for entries whose sum is exactly 0) spans the whole tensor;
            # it only matters where such an entry has a nonzero delta. Merge with +1 now and
            # redo just those chunks if the tensor's fallback turns out to be -1.
            total = stack.sum(dim=0)
            sign_sum += float(torch.sign(total).sum())
            if bool(((total == 0) & (stack != 0).any(dim=0)).any()):
                redo.append((a, b))
            delta = combine(stack, w, rule.sign, rule.divide, fallback=provisional)
        else:  # the fallback is known (from the masks' pass), or not needed
            delta = combine(stack, w, rule.sign, rule.divide, fallback=fallback)
        _store(out, a, b, bc, delta, rule.scale)
    if redo:
        fallback = fallback_sign(torch.tensor(sign_sum, dtype=compute_dtype, device=device))
        if fallback != provisional:
            for a, b in redo:
                bc, stack = trimmed(a, b)
                delta = combine(stack, w, rule.sign, rule.divide, fallback=fallback)
                _store(out, a, b, bc, delta, rule.scale)
    return out.reshape(shape)


def _masks(flats: list, flat_base, keeps: tuple[float, ...], spans: list[tuple[int, int]], *, sums: bool,
           compute_dtype: torch.dtype, device: torch.device, floors: tuple[float, ...] | None = None):
    """One pass over each model's whole delta: its keep-mask (``TopMask``, keeping the
    fraction ``keeps[i]``; ``FloorMask`` when ``floors`` gives each model's threshold) and, if ``sums``,
    the entry sums of the trimmed, unweighted deltas (DRM elects on those; TIES, on the
    weighted ones, asks for them only with unit weights), accumulated model after model as
    ``stack.sum(dim=0)`` adds them. Also whether every input is finite (``W_t - W0`` finite
    implies both are)."""
    masks: list[TopMask] = []
    all_finite = True
    total = torch.zeros(flats[0].numel(), dtype=compute_dtype, device=device) if sums else None
    whole_base = flat_base.to(device=device, dtype=compute_dtype) if flat_base is not None else None
    for i, f in enumerate(flats):
        if whole_base is not None and isinstance(f, torch.Tensor) and f.dtype == compute_dtype \
                and f.device == whole_base.device:
            d = f - whole_base  # never in place: ``f`` is the caller's tensor
        else:
            d = f.to(device=device, dtype=compute_dtype, copy=True)
            if whole_base is not None:
                d -= whole_base
        all_finite = all_finite and _finite(d)
        mags = d.abs()
        mask = mask_of(mags, keeps[i], floors[i] if floors is not None else None)
        masks.append(mask)
        if total is not None:
            for a, b in spans:  # chunk views: temporaries stay chunk-sized
                part = d[a:b]
                part *= mask.chunk(mags[a:b], a)
                total[a:b] += part
        del d, mags
    return masks, total, all_finite


def _elect_trimmed_unit(flat_base, flats: list, masks: list[TopMask], total: torch.Tensor, fallback: torch.Tensor,
                        spans: list[tuple[int, int]], out: torch.Tensor, *, disjoint_mean: bool, scale: float,
                        compute_dtype: torch.dtype, device: torch.device) -> None:
    """A trimmed, sign-electing rule with unit weights, the sums ``total`` and the fallback
    sign already known: ``combine(trimmed, ones, Sign.UNWEIGHTED, COUNT or MODELS,
    fallback)`` chunk by chunk, model by model (``add_agreeing_``), in preallocated buffers
    (no per-chunk allocations). With unit weights TIES's rule (``Sign.WEIGHTED``,
    ``Divide.KEPT_WEIGHTS``) is this one with the fallback +1: weighted and unweighted
    signs agree and the kept weights are a count."""
    size = max(b - a for a, b in spans)

    def buf(dtype=compute_dtype):
        return torch.empty(size, dtype=dtype, device=device)

    bc_, row_, mags_, sigma_, sign_, merged_, count_ = (buf() for _ in range(7))
    keep_, agree_ = buf(torch.bool), buf(torch.bool)
    fb = fallback.to(device=device, dtype=compute_dtype)
    for a, b in spans:
        n = b - a
        bc, row, mags, sigma, sgn, merged, count = (x[:n] for x in (bc_, row_, mags_, sigma_, sign_, merged_, count_))
        keep, agree = keep_[:n], agree_[:n]
        bc.copy_(flat_base[a:b])
        tot = total[a:b]
        torch.sign(tot, out=sigma)
        sigma.masked_fill_(tot == 0, fb)  # where(total == 0, fallback, sign(total))
        merged.zero_()
        count.zero_()
        for f, mask in zip(flats, masks):
            row.copy_(f[a:b])
            row -= bc
            torch.abs(row, out=mags)
            row *= mask.chunk(mags, a, out=keep)
            add_agreeing_(row, sigma, merged, count, sgn, agree)
        if disjoint_mean:
            merged /= count.clamp_min_(1)
        else:
            merged /= len(flats)
        _store(out, a, b, bc, merged, scale)


def _stack(flats: list, a: int, b: int, compute_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (T, b - a) chunk of every input, in the compute dtype."""
    stack = torch.empty((len(flats), b - a), dtype=compute_dtype, device=device)
    for i, f in enumerate(flats):
        stack[i].copy_(f[a:b])
    return stack


def _of_weights(rule: ElementwiseRule, flats: list, w: torch.Tensor, spans: list[tuple[int, int]], *,
                compute_dtype: torch.dtype, device: torch.device, out_dtype: torch.dtype, check_finite) -> torch.Tensor:
    """The rule on the models' weights themselves, chunk by chunk (linear: ``sum_t w_t W_t /
    sum_t w_t``). With a ``base_model`` the base still shapes the plan (and supplies the
    copied tensors), but a merged tensor is never relative to it (subtracting it would
    average the deltas)."""
    if rule.trims:
        raise ValueError("a rule on the models' weights cannot trim them (keep must be 1)")
    n = flats[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    for a, b in spans:
        stack = _stack(flats, a, b, compute_dtype, device)
        if check_finite is not None:
            check_finite(None, stack)
        merged = combine(stack, w, rule.sign, rule.divide)
        if rule.scale != 1.0:
            merged = merged * rule.scale
        out[a:b] = merged.to(out_dtype).cpu()
    return out


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


def _weighted_sum(flat_base: torch.Tensor, flats: list, w: torch.Tensor, unit: bool, scale: float,
                  spans: list[tuple[int, int]], *, compute_dtype: torch.dtype, device: torch.device,
                     out_dtype: torch.dtype, check_finite) -> torch.Tensor:
    """``W0 + lam * sum_t w_t (W_t - W0)`` (task arithmetic) chunk by chunk in three
    preallocated buffers (the sum in the order ``(stack * w).sum(dim=0)`` adds, so the
    result is the same as ``combine``'s)."""
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

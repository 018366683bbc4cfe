"""Element-wise merges (task arithmetic, TIES, linear, and DRM's rule for vector-like
tensors) executed chunk by chunk, so that a large tensor (a 32000 x 4096 embedding) never
needs T float32 copies of itself plus their temporaries: memory per tensor is the inputs
as read, the output, and a few chunks.

The result equals the whole-tensor functions (``merge_tensor``) exactly. Two quantities
span a whole tensor: each model's top-k keep-mask threshold (``TopMask``), computed
first, and the fallback sign of the sign election, summed over the chunks as they are
merged (the few chunks it changes are merged again). Every chunk goes through the same
``combine`` as a whole tensor would.
"""

from __future__ import annotations

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

    def load(a: int, b: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        stack = torch.empty((len(flats), b - a), dtype=compute_dtype, device=device)
        for i, f in enumerate(flats):
            stack[i].copy_(f[a:b])
        bc = flat_base[a:b].to(device=device, dtype=compute_dtype) if flat_base is not None else None
        if check_finite is not None:
            check_finite(bc, stack)
        if bc is not None:
            stack -= bc
        return bc, stack

    # Whole-tensor quantities first: per-model keep-masks (TIES density / DRM's optional trim).
    fraction = p.density if method == "ties" else (1.0 - p.nonlinear_drop_rate if method == "drm" else 1.0)
    masks = None
    if fraction < 1.0 and n:
        masks = []
        whole_base = flat_base.to(device=device, dtype=compute_dtype) if flat_base is not None else None
        for f in flats:
            d = f.to(device=device, dtype=compute_dtype)
            if whole_base is not None:
                d = d - whole_base
            masks.append(TopMask.of(d, fraction))
            del d
        del whole_base

    def trimmed(a: int, b: int, ties_seen: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        bc, stack = load(a, b)
        if masks is not None:
            for i, m in enumerate(masks):
                mags = stack[i].abs()
                stack[i] *= m.chunk(mags, ties_seen[i])
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
        out[a:b] = (bc + p.scale * delta).to(out_dtype).cpu()
    if redo:
        fallback = fallback_sign(torch.tensor(sign_sum, dtype=compute_dtype, device=device))
        if fallback != provisional:
            for a, b, ties_before in redo:
                bc, stack = trimmed(a, b, list(ties_before))
                delta = combine(stack, w, sign_election=True, disjoint_mean=p.disjoint_mean,
                                elect_on_weighted=elect_on_weighted, fallback=fallback)
                out[a:b] = (bc + p.scale * delta).to(out_dtype).cpu()
    return out.reshape(shape)

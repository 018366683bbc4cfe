"""Element-wise merges (task arithmetic, TIES, linear, and DRM's rule for vector-like
tensors) executed chunk by chunk, so that a large tensor (a 32000 x 4096 embedding) never
needs T float32 copies of itself plus their temporaries: memory per tensor is the inputs
as read, the output, and a few chunks.

The result equals the whole-tensor functions (``merge_tensor``) exactly. The only
quantities that span a whole tensor are computed first: each model's top-k keep-mask
threshold (``TopMask``) and the fallback sign of the sign election (summed over chunks);
every chunk then goes through the same ``combine`` as a whole tensor would.
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from ..spec import Parameters
from .common import TopMask, combine, elected_sign_sum, fallback_sign
from .linear import linear_weights
from .task_arithmetic import task_arithmetic_delta

CHUNK_ELEMENTS = 1 << 22  # per model: 16 MB of float32


def is_elementwise(method: str, kind: str, matrix_kind: str) -> bool:
    """Every method but DRM on a matrix combines entries independently of each other."""
    return method != "drm" or kind != matrix_kind


def merge_elementwise(method: str, base: torch.Tensor | None, tensors: list[torch.Tensor], weights: torch.Tensor,
                      p: Parameters, *, compute_dtype: torch.dtype, device: torch.device, out_dtype: torch.dtype,
                      check_finite=None, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Merged tensor (``out_dtype``, on the CPU) of ``tensors`` (as read, any float dtype).

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
        for i, f in enumerate(flats):
            d = f.to(device=device, dtype=compute_dtype)
            if flat_base is not None:
                d = d - flat_base.to(device=device, dtype=compute_dtype)
            masks.append(TopMask.of(d, fraction))
            del d

    def trimmed(a: int, b: int, ties_seen: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        bc, stack = load(a, b)
        if masks is not None:
            for i, m in enumerate(masks):
                mags = stack[i].abs()
                stack[i] *= m.chunk(mags, ties_seen[i])
                ties_seen[i] += m.count_ties(mags)
        return bc, stack

    elect_on_weighted = method == "ties"
    fallback = None
    if method in ("ties", "drm") and p.sign_election and len(spans) > 1:
        total = 0.0
        seen = [0] * len(flats)
        for a, b in spans:
            _, stack = trimmed(a, b, seen)
            if elect_on_weighted:
                stack *= w.reshape(-1, 1)
            total += float(elected_sign_sum(stack))
        fallback = fallback_sign(torch.tensor(total, dtype=compute_dtype, device=device))

    out = torch.empty(n, dtype=out_dtype)
    seen = [0] * len(flats)
    for a, b in spans:
        if method == "linear":
            _, stack = load(a, b)  # no base: the stack holds the weights themselves
            out[a:b] = linear_weights(stack, w).to(out_dtype).cpu()
            continue
        bc, stack = trimmed(a, b, seen)
        if method == "task_arithmetic":
            delta = task_arithmetic_delta(stack, w)
        elif method in ("ties", "drm"):
            delta = combine(stack, w, sign_election=p.sign_election, disjoint_mean=p.disjoint_mean,
                            elect_on_weighted=elect_on_weighted, fallback=fallback)
        else:
            raise MergeError("internal_error", f"method {method!r} is not element-wise")
        out[a:b] = (bc + p.scale * delta).to(out_dtype).cpu()
    return out.reshape(shape)

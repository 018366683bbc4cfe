"""A matrix as the plan's view presents it to a structured method (drmerge/layouts.py
``MatrixView``): the linear map ``out x in`` (a stored ``in x out`` weight transposed),
merged part by part (the rows, or columns, of each part gathered from every task's
delta, merged as one matrix and scattered back in place), then put back as stored.

Dense stacks and LoRA factors alike: a part of a factored delta ``B A`` is ``B[rows] A``
(or ``B A[:, cols]``), still factored, so LoRA inputs on a fused module stay on the
low-rank path; the parts' merged factors are assembled into one factored delta whose
left (or right) factor is block-structured. Nothing here knows a method.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .lowrank import LowRank

# merge(part_stack or part_factors, part) -> the part's merged delta; part is None for a
# matrix that is not split.
DenseMerge = Callable[[torch.Tensor, object], torch.Tensor]
LowRankMerge = Callable[[list, tuple[int, int], object], LowRank]


def _index(part, device) -> slice | torch.Tensor:
    """A slice for a part that is one block (a view, no copy), else its index list."""
    if len(part.ranges) == 1:
        a, b = part.ranges[0]
        return slice(a, b)
    return torch.cat([torch.arange(a, b, device=device) for a, b in part.ranges])


def dense_by_parts(view, stack: torch.Tensor, merge: DenseMerge) -> torch.Tensor:
    """The merged delta, as stored, of a (T, *stored) stack of task deltas: ``merge`` on
    the linear maps' stack (T, out, in), once per part (or once if ``view`` has none)."""
    lin = stack.transpose(1, 2) if view is not None and view.transposed else stack
    if view is None or not view.parts:
        out = merge(lin, None)
    else:
        out = torch.empty(lin.shape[1:], dtype=stack.dtype, device=stack.device)
        for part in view.parts:
            idx = _index(part, stack.device)
            if view.axis == "out":
                out[idx] = merge(lin[:, idx], part)
            else:
                out[:, idx] = merge(lin[:, :, idx], part)
    return out.T.contiguous() if view is not None and view.transposed else out


def lowrank_by_parts(view, factors: Sequence[LowRank | None], shape: tuple[int, int],
                     merge: LowRankMerge) -> LowRank:
    """The merged factored delta, as stored, of factored task deltas (each ``LowRank`` as
    stored, or None): ``merge`` on the linear maps' factors, once per part."""
    transposed = view is not None and view.transposed
    lin = [f.t() if f is not None and transposed else f for f in factors]
    n, m = (shape[1], shape[0]) if transposed else shape
    if view is None or not view.parts:
        merged = merge(lin, (n, m), None)
    else:
        results = []
        for part in view.parts:
            idx = _index(part, _device(lin))
            if view.axis == "out":
                pf = [LowRank(f.left[idx], f.right) if f is not None else None for f in lin]
                results.append((idx, merge(pf, (part.size, m), part)))
            else:
                pf = [LowRank(f.left, f.right[:, idx]) if f is not None else None for f in lin]
                results.append((idx, merge(pf, (n, part.size), part)))
        merged = _assemble(results, view.axis, n, m)
    return merged.t() if transposed else merged


def _assemble(results: list, axis: str, n: int, m: int) -> LowRank:
    """One factored delta from the parts' merged factors: the parts' rows (columns) of the
    left (right) factor in a block of their own, the other factor concatenated."""
    ref = results[0][1]
    dtype, device = ref.left.dtype, ref.left.device
    k = sum(r.rank for _, r in results)
    if axis == "out":
        left = torch.zeros(n, k, dtype=dtype, device=device)
        col = 0
        for idx, r in results:
            left[idx, col:col + r.rank] = r.left.to(dtype)
            col += r.rank
        return LowRank(left, torch.cat([r.right.to(dtype) for _, r in results], dim=0))
    right = torch.zeros(k, m, dtype=dtype, device=device)
    row = 0
    for idx, r in results:
        right[row:row + r.rank, idx] = r.right.to(dtype)
        row += r.rank
    return LowRank(torch.cat([r.left.to(dtype) for _, r in results], dim=1), right)


def _device(factors) -> torch.device | None:
    return next((f.left.device for f in factors if f is not None), None)

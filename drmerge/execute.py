"""The executor: merges one planned tensor by its plan's operation (methods/base.py ``Op``).

``task_delta`` is the merged delta of one tensor from its task deltas, dense or factored
(LoRA) or absent: the method's low-rank form (``Op.LOWRANK``: every task delta factored
or absent) or its dense delta on the materialised stack (``Op.DENSE``), so results never
depend on the path.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .kernels.lowrank import LowRank
from .methods.base import MergeMethod, Op, Params


def task_delta(method: MergeMethod, op: Op, kind: str, deltas: Sequence["torch.Tensor | LowRank | None"],
               shape: tuple[int, ...], weights: torch.Tensor, params: Params) -> "LowRank | torch.Tensor":
    """Merged delta (before the scale) of one tensor whose task deltas may be dense,
    factored or absent (``None``: zero). ``Op.LOWRANK`` keeps it factored; ``Op.DENSE``
    materialises the factored deltas and runs the method's dense delta."""
    if op == Op.LOWRANK:
        return method.lowrank_delta(kind, deltas, shape, weights, params)
    dtype = next((d.dtype for d in deltas if isinstance(d, torch.Tensor)), torch.float32)
    device = next((d.device if isinstance(d, torch.Tensor) else d.left.device for d in deltas if d is not None), None)
    stack = torch.stack([torch.zeros(shape, dtype=dtype, device=device) if d is None
                         else d.dense(dtype) if isinstance(d, LowRank) else d.to(dtype) for d in deltas])
    return method.dense_delta(kind, stack, weights, params)


def factored_op(method: MergeMethod, kind: str, params: Params, deltas: Sequence, shape: tuple[int, ...]) -> Op:
    """``Op.LOWRANK`` where the method has a low-rank form for this kind and every task
    delta of a 2-D tensor is factored or absent, else ``Op.DENSE``."""
    factored = all(d is None or isinstance(d, LowRank) for d in deltas)
    return Op.LOWRANK if factored and len(shape) == 2 and method.has_lowrank(kind, params) else Op.DENSE

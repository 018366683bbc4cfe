"""The executor: reads planned tensors ahead and merges each by its plan's operation
(``TensorPlan.op``, decided once by plan.py): it never asks which method, which kind of
tensor or which kind of input it has.

- ``Op.COPY``: the base's tensor (or the reference's), in the output dtype.
- ``Op.ELEMENTWISE`` / ``ELEMENTWISE_LAZY``: the method's element-wise rule, chunk by chunk
  (kernels/elementwise.py); the lazy form's inputs are read range by range.
- ``Op.DENSE``: the method's dense delta on the stack of task deltas, materialised in one
  preallocated float32 stack (LoRA factors multiplied out, absent deltas zero).
- ``Op.LOWRANK``: the method's low-rank form on LoRA factors; nothing n x m per task.

Every path checks its inputs are finite and names the model at fault.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch

from .checkpoint import DTYPES
from .errors import Cancelled, MergeError
from .kernels.elementwise import merge_elementwise
from .kernels.lowrank import LowRank, dense_to_lowrank
from .methods.base import Op
from .plan import TensorPlan

if TYPE_CHECKING:
    from .inputs import Inputs

COMPUTE_DTYPE = torch.float32
PREFETCH = 2  # tensors read ahead of the one being merged


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("invalid_spec", "device 'cuda' was requested but no CUDA device is available", param="device")
    if device not in ("cpu", "cuda"):
        raise MergeError("invalid_spec", f"device must be auto, cpu or cuda, got {device!r}", param="device")
    return torch.device(device)


def model_weights(tp: TensorPlan) -> torch.Tensor:
    """The models' weights for this tensor, a (T,) tensor in the compute dtype (CPU)."""
    return torch.tensor(tp.models.weight, dtype=COMPUTE_DTYPE)


# ---------------------------------------------------------------------------- one tensor


def merge_one(inputs: "Inputs", tp: TensorPlan, base: torch.Tensor | None, tensors: list,
              device: torch.device) -> torch.Tensor:
    """Merge one tensor (already read) and return it in its output dtype, on the CPU.

    Memory: element-wise merges run chunk by chunk; a dense merge converts the inputs once
    into a preallocated float32 stack whose deltas are formed in place, and the buffers as
    read are released (``tensors`` is emptied) as soon as it is built.
    """
    out_dtype = DTYPES[tp.out.dtype][0]
    if tp.op == Op.COPY:
        return (base if base is not None else tensors[0]).to(out_dtype)
    if tp.op in (Op.ELEMENTWISE, Op.ELEMENTWISE_LAZY):
        def check(b, stack):
            check_finite(inputs.spec, tp.name, b, stack)
        rule = inputs.method.elementwise_rule(tp.kind, tp.params, tp.models)
        return merge_elementwise(rule, base, tensors, model_weights(tp), compute_dtype=COMPUTE_DTYPE, device=device,
                                 out_dtype=out_dtype, check_finite=check)
    if tp.op == Op.DENSE:
        merged = _dense(inputs, tp, base, tensors, device)
    elif tp.op == Op.LOWRANK:
        merged = _lowrank(inputs, tp, base, tensors, device)
    else:
        raise MergeError("internal_error", f"unknown operation {tp.op!r} for tensor {tp.name!r}")
    return merged.to(dtype=out_dtype).cpu()


def _dense(inputs: "Inputs", tp: TensorPlan, base: torch.Tensor, tensors: list, device: torch.device) -> torch.Tensor:
    """``W0 + lam * D``, ``D`` the method's dense delta of the materialised task deltas."""
    method = inputs.method
    if base is None:  # no method plans a dense merge without a base (needs_base)
        raise MergeError("internal_error", f"tensor {tp.name!r} is planned dense but the merge has no base_model")
    b = _base(base, tp.name, device)
    if any(t is not None for t in tensors):
        stack = task_stack(inputs.spec.models, tp.name, tensors, b, tp.out.shape, device)
        tensors.clear()
        delta = method.dense_delta(tp.kind, stack, model_weights(tp).to(device), tp.params, tp.models)
        del stack
        return delta.mul_(method.scale(tp.params)).add_(b)  # W0 + lam * D, as MergeMethod.merge_tensor computes it
    return base  # no model changes this tensor (LoRA adapters that leave it alone)


def _lowrank(inputs: "Inputs", tp: TensorPlan, base: torch.Tensor, tensors: list, device: torch.device) -> torch.Tensor:
    """``W0 + lam * D``, ``D`` the method's low-rank form on the factored task deltas."""
    method = inputs.method
    b = _base(base, tp.name, device)
    factors = _factors(inputs, tp, tensors, device)
    if all(f is None for f in factors):
        return base  # no model changes this tensor
    delta = method.lowrank_delta(tp.kind, factors, tuple(tp.out.shape), model_weights(tp).to(device), tp.params,
                                 tp.models).dense(torch.float32)
    return b + method.scale(tp.params) * delta.reshape(base.shape)


def module_delta(inputs: "Inputs", tp: TensorPlan, factors: list, device: torch.device) -> LowRank:
    """``D`` of one LoRA-adapted module for an adapter output, factored: the method's
    low-rank form (``Op.LOWRANK``), or the SVD of its dense delta (``Op.DENSE``)."""
    method = inputs.method
    shape = tuple(tp.out.shape)
    weights = model_weights(tp).to(device)
    if tp.op == Op.LOWRANK:
        return method.lowrank_delta(tp.kind, _factors(inputs, tp, factors, device), shape, weights, tp.params,
                                    tp.models)
    if tp.op != Op.DENSE:
        raise MergeError("internal_error", f"operation {tp.op!r} cannot make an adapter module ({tp.name!r})")
    stack = task_stack(inputs.spec.models, tp.name, factors, None, shape, device)
    return dense_to_lowrank(method.dense_delta(tp.kind, stack, weights, tp.params, tp.models).reshape(shape))


# ---------------------------------------------------------------------------- task deltas


def _base(base: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    b = base.to(device=device, dtype=COMPUTE_DTYPE)
    if not _all_finite(b):
        raise MergeError("non_finite_weights", f"base_model has NaN or Inf values in tensor {name!r}", param="base_model")
    return b


def task_stack(entries: Sequence, name: str, tensors: list, b: torch.Tensor | None, shape: Sequence[int],
               device: torch.device, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """The (T, ...) stack of the task deltas of tensor ``name``, in one preallocated
    buffer on ``device``: ``W_t - W0`` for full weights (``b``: the base, already checked;
    ``None``: the tensors are deltas already), ``B_t A_t`` for LoRA factors, zero where a
    model leaves the tensor alone. Each input is checked finite; ``entries`` (the spec's
    models) name the one at fault."""
    stack = torch.empty((len(tensors),) + tuple(shape), dtype=dtype, device=device)
    for i, (entry, t) in enumerate(zip(entries, tensors)):
        row = stack[i]
        if t is None:
            row.zero_()
        elif isinstance(t, LowRank):
            row.copy_(_factor(t, i, entry, name, device, dtype).dense(dtype))
        else:
            row.copy_(t)
            if not _all_finite(row):
                raise _not_finite(i, entry, name)
            if b is not None:
                row -= b
    return stack


def _factors(inputs: "Inputs", tp: TensorPlan, tensors: list, device: torch.device) -> list:
    out = []
    for i, (entry, t) in enumerate(zip(inputs.spec.models, tensors)):
        if t is not None and not isinstance(t, LowRank):
            raise MergeError("internal_error", f"tensor {tp.name!r} of models[{i}] is not factored, but its plan "
                             "is low-rank")
        out.append(None if t is None else _factor(t, i, entry, tp.name, device))
    return out


def _factor(t: LowRank, i: int, entry, name: str, device: torch.device, dtype: torch.dtype = COMPUTE_DTYPE) -> LowRank:
    f = t.to(device=device, dtype=dtype)
    if not (bool(torch.isfinite(f.left).all()) and bool(torch.isfinite(f.right).all())):
        raise _not_finite(i, entry, name, factors=True)
    return f


def _not_finite(i: int, entry, name: str, factors: bool = False) -> MergeError:
    return MergeError("non_finite_weights", f"models[{i}] ({entry.model}) has NaN or Inf values in "
                      f"{'the LoRA factors of ' if factors else ''}tensor {name!r}", param=f"models[{i}]")


def check_finite(spec, name: str, base, tensors) -> None:
    """Raise ``non_finite_weights`` naming the first input (base, then models in order) of
    ``tensors`` (a (T, ...) stack, or a chunk of one) that holds a NaN or an Inf."""
    # One sum over the stack in the common case (an inf or NaN entry makes it non-finite;
    # an overflowing sum only sends us to the exact check); per input only to name the culprit.
    if (base is None or _sum_finite(base)) and _sum_finite(tensors):
        return
    for label, t in ([("base_model", base)] if base is not None else []) + [
            (f"models[{i}] ({m.model})", x) for i, (m, x) in enumerate(zip(spec.models, tensors))]:
        if not bool(torch.isfinite(t).all()):
            raise MergeError("non_finite_weights", f"{label} has NaN or Inf values in tensor {name!r}", param=label.split(" ")[0])


def _sum_finite(t: torch.Tensor) -> bool:
    return math.isfinite(float(t.sum()))


def _all_finite(t: torch.Tensor) -> bool:
    return _sum_finite(t) or bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------- streaming


def merged_tensors(inputs: "Inputs", names: Iterable[str], device: torch.device,
                   timings: dict, progress_bytes: Callable[[int], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Merge any subset of tensors, in the given order, prefetching the next ones.

    This is the unit a merge can be split into across workers.
    """
    plans = inputs.plan.by_name()
    order = [plans[n] for n in names]
    pool = ThreadPoolExecutor(max_workers=max(2, min(8, len(inputs.models) + 1)), thread_name_prefix="drmerge-read")
    pending: list[Future] = []
    reads = {Op.COPY: inputs.read_copied, Op.ELEMENTWISE_LAZY: inputs.lazy}
    try:
        def submit(i: int) -> None:
            tp = order[i]
            pending.append(pool.submit(reads.get(tp.op, inputs.read), tp.name))

        for i in range(min(PREFETCH, len(order))):
            submit(i)
        for i, tp in enumerate(order):
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            t0 = time.perf_counter()
            base, tensors = pending.pop(0).result()
            if i + PREFETCH < len(order):
                submit(i + PREFETCH)
            t1 = time.perf_counter()
            if progress_bytes:
                progress_bytes(inputs.nbytes(tp.name))
            merged = merge_one(inputs, tp, base, tensors, device)
            del base, tensors  # the buffers as read are not kept alive while the writer works
            timings["read_wait_s"] += t1 - t0
            timings["compute_s"] += time.perf_counter() - t1
            yield tp, merged
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# glibc gives each thread that allocates its own malloc arena; the reader threads' large,
# short-lived buffers then fragment up to 8 x cores arenas and the process keeps memory it
# no longer uses (W1 DRM horizontal: peak RSS 1561-1678 MB with the default, 1015 MB with
# two arenas, same speed; bench/PERF.md). Set once, before the first reader thread starts,
# unless the environment chose (MALLOC_ARENA_MAX).
MALLOC_ARENAS = 2
_arenas_set = False


def limit_malloc_arenas() -> None:
    global _arenas_set
    if _arenas_set:
        return
    _arenas_set = True
    import os
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX (glibc)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        pass

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
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch

from .checkpoint import DTYPES
from .errors import Cancelled, MergeError
from .kernels.elementwise import CHUNK_ELEMENTS, merge_elementwise
from .kernels.lowrank import LowRank, dense_to_lowrank
from .kernels.parts import dense_by_parts, lowrank_by_parts
from .kernels.rules import Divide, ElementwiseRule, Sign
from .kernels.topk import PooledKth
from .methods.base import POOL_FLOOR, Op
from .plan import TensorPlan

if TYPE_CHECKING:
    from .inputs import Inputs

COMPUTE_DTYPE = torch.float32
PREFETCH = 2  # tensors read ahead of the one being merged
# Op.MEAN (normalisation statistics): sum_t w_t X_t / sum_t w_t of the models' values.
MEAN_RULE = ElementwiseRule(sign=Sign.NONE, divide=Divide.WEIGHTS, of_weights=True)


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
              device: torch.device, notes: dict | None = None) -> torch.Tensor:
    """Merge one tensor (already read) and return it in its output dtype, on the CPU.
    ``notes`` (a dict) receives what the method decided per matrix or part (``decide``).

    Memory: element-wise merges run chunk by chunk; a dense merge converts the inputs once
    into a preallocated float32 stack whose deltas are formed in place, and the buffers as
    read are released (``tensors`` is emptied) as soon as it is built.
    """
    out_dtype = DTYPES[tp.out.dtype][0]
    if tp.op == Op.COPY:
        return (base if base is not None else tensors[0]).to(out_dtype)
    if tp.op in (Op.ELEMENTWISE, Op.ELEMENTWISE_LAZY, Op.MEAN):
        def check(b, stack):
            check_finite(inputs.spec, tp.name, b, stack)
        if tp.op == Op.MEAN:  # a model that leaves the tensor alone (a LoRA adapter) holds the base's values
            rule, tensors, base = MEAN_RULE, [base if t is None else t for t in tensors], None
        else:
            rule = inputs.method.elementwise_rule(tp.kind, tp.params, tp.models)
        return merge_elementwise(rule, base, tensors, model_weights(tp), compute_dtype=COMPUTE_DTYPE, device=device,
                                 out_dtype=out_dtype, check_finite=check)
    if tp.op == Op.DENSE:
        merged = _dense(inputs, tp, base, tensors, device, notes)
    elif tp.op == Op.LOWRANK:
        merged = _lowrank(inputs, tp, base, tensors, device, notes)
    else:
        raise MergeError("internal_error", f"unknown operation {tp.op!r} for tensor {tp.name!r}")
    return merged.to(dtype=out_dtype).cpu()


def _dense(inputs: "Inputs", tp: TensorPlan, base: torch.Tensor, tensors: list, device: torch.device,
           notes: dict | None = None) -> torch.Tensor:
    """``W0 + lam * D``, ``D`` the method's dense delta of the materialised task deltas."""
    method = inputs.method
    if base is None:  # no method plans a dense merge without a base (needs_base)
        raise MergeError("internal_error", f"tensor {tp.name!r} is planned dense but the merge has no base_model")
    b = _base(base, tp.name, device)
    if any(t is not None for t in tensors):
        stack = task_stack(inputs.spec.models, tp.name, tensors, b, tp.out.shape, device)
        tensors.clear()
        delta = dense_delta(inputs, tp, stack, model_weights(tp).to(device), notes)
        del stack
        return delta.mul_(method.scale(tp.params)).add_(b)  # W0 + lam * D, as MergeMethod.merge_tensor computes it
    return base  # no model changes this tensor (LoRA adapters that leave it alone)


def _lowrank(inputs: "Inputs", tp: TensorPlan, base: torch.Tensor, tensors: list, device: torch.device,
             notes: dict | None = None) -> torch.Tensor:
    """``W0 + lam * D``, ``D`` the method's low-rank form on the factored task deltas."""
    method = inputs.method
    b = _base(base, tp.name, device)
    factors = _factors(inputs, tp, tensors, device)
    if all(f is None for f in factors):
        return base  # no model changes this tensor
    delta = lowrank_delta(inputs, tp, factors, model_weights(tp).to(device), notes).dense(torch.float32)
    return b + method.scale(tp.params) * delta.reshape(base.shape)


def dense_delta(inputs: "Inputs", tp: TensorPlan, stack: torch.Tensor, weights: torch.Tensor,
                notes: dict | None = None) -> torch.Tensor:
    """The method's dense delta of a (T, *stored) stack, through the plan's view of the
    matrix (transposed to out x in, part by part: kernels/parts.py), the parameters of
    each part as the method decides them (``decide``), as stored."""
    method = inputs.method

    def merge(sub: torch.Tensor, part) -> torch.Tensor:
        params, record = method.decide(tp.kind, tp.params, deltas=sub)
        _note(notes, part, record)
        return method.dense_delta(tp.kind, sub, weights, params, tp.models)

    return dense_by_parts(tp.view, stack, merge)


def lowrank_delta(inputs: "Inputs", tp: TensorPlan, factors: list, weights: torch.Tensor,
                  notes: dict | None = None) -> LowRank:
    """``dense_delta``'s twin on factored task deltas: the method's low-rank form, part by
    part (a part of ``B A`` is ``B[rows] A``), kept factored, as stored."""
    method = inputs.method

    def merge(part_factors: list, shape: tuple[int, int], part) -> LowRank:
        if all(f is None for f in part_factors):
            return LowRank.zeros(*shape, device=next((f.left.device for f in factors if f is not None), None))
        params, record = method.decide(tp.kind, tp.params, factors=part_factors, shape=shape)
        _note(notes, part, record)
        return method.lowrank_delta(tp.kind, part_factors, shape, weights, params, tp.models)

    return lowrank_by_parts(tp.view, factors, tuple(tp.out.shape), merge)


def _note(notes: dict | None, part, record: dict) -> None:
    """What the method decided for a matrix (``notes[None]``) or a part (by its name)."""
    if notes is not None and record:
        notes[part.name if part is not None else None] = dict(record)


def decisions_record(notes: dict) -> dict:
    """A tensor's notes as drmerge.json records them: the decision of an unsplit matrix,
    or ``{"parts": {name: decision}}``."""
    if None in notes:
        return notes[None]
    return {"parts": notes}


def module_delta(inputs: "Inputs", tp: TensorPlan, factors: list, device: torch.device,
                 notes: dict | None = None) -> LowRank:
    """``D`` of one LoRA-adapted module for an adapter output, factored: the method's
    low-rank form (``Op.LOWRANK``), or the SVD of its dense delta (``Op.DENSE``)."""
    shape = tuple(tp.out.shape)
    weights = model_weights(tp).to(device)
    if tp.op == Op.LOWRANK:
        return lowrank_delta(inputs, tp, _factors(inputs, tp, factors, device), weights, notes)
    if tp.op != Op.DENSE:
        raise MergeError("internal_error", f"operation {tp.op!r} cannot make an adapter module ({tp.name!r})")
    stack = task_stack(inputs.spec.models, tp.name, factors, None, shape, device)
    return dense_to_lowrank(dense_delta(inputs, tp, stack, weights, notes).reshape(shape))


# ---------------------------------------------------------------------------- pooled trims


def resolve_pools(inputs: "Inputs", names: Iterable[str] | None = None, poll: Callable[[], None] | None = None,
                  chunk: int = CHUNK_ELEMENTS) -> dict[str, tuple[float, ...]]:
    """Compute every pooled trim of the plan (``Plan.pools``: a method's ``pool_keep``) that
    a tensor among ``names`` (None: all) takes part in, and hand each member tensor its
    models' thresholds as the per-model value ``POOL_FLOOR``. Returns pool -> thresholds.

    Per model ``t``, over the ``N`` entries of all the pool's task deltas together (a model
    that leaves a tensor alone contributes zeros): ``k = N - round(N * keep)`` and the
    threshold is the k-th smallest magnitude, the authors' ``kthvalue`` (no trim, threshold
    0, when ``k <= 0``). Memory stays bounded whatever the pool's size (embeddings included):
    two streaming passes over the pool, chunk by chunk (kernels/topk.py ``PooledKth``)."""
    plan = inputs.plan
    wanted = None if names is None else set(names)
    found: dict[str, tuple[float, ...]] = {}
    for pool, keep in plan.pools.items():
        members = [tp for tp in plan.tensors if tp.pool == pool]
        if wanted is not None and not any(tp.name in wanted for tp in members):
            continue
        selects = [PooledKth() for _ in inputs.models]
        for _ in range(2):
            for tp in members:
                _pool_pass(inputs, tp, selects, poll, chunk)
            if selects[0].bucket is None:  # after pass 1: where the k-th smallest lies
                n = selects[0].count
                k = n - round(n * keep)
                if k <= 0:
                    break
                for sel in selects:
                    sel.select(k)
        floors = tuple(sel.value() if sel.bucket is not None else 0.0 for sel in selects)
        found[pool] = floors
        for i, tp in enumerate(plan.tensors):
            if tp.pool == pool:
                plan.tensors[i] = replace(tp, models=replace(tp.models, values={**tp.models.values, POOL_FLOOR: floors}))
    return found


def _pool_pass(inputs: "Inputs", tp: TensorPlan, selects: list, poll, chunk: int) -> None:
    """One pass of every model's task delta of one tensor into its ``PooledKth``."""
    from .checkpoint import Source

    base = inputs.base
    n = math.prod(tp.out.shape)
    for i, (entry, reader, source, sel) in enumerate(zip(inputs.spec.models, inputs.models, tp.sources, selects)):
        if poll is not None:
            poll()
        if source == Source.ABSENT:
            sel.add_zeros(n)
        elif source == Source.FULL:
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                d = reader.read_elements(tp.name, a, b).to(COMPUTE_DTYPE)
                if base is not None:
                    bc = base.read_elements(tp.name, a, b).to(COMPUTE_DTYPE)
                    if not _all_finite(bc):
                        raise MergeError("non_finite_weights", f"base_model has NaN or Inf values in tensor "
                                         f"{tp.name!r}", param="base_model")
                    d -= bc
                if not _all_finite(d):
                    raise _not_finite(i, entry, tp.name)
                sel.add(d.abs_())
        else:  # LoRA factors (or an adapter's layer copy plus them): the whole delta, one tensor at a time
            t = reader.read(tp.name)
            if isinstance(t, LowRank):
                d = _factor(t, i, entry, tp.name, torch.device("cpu")).dense(COMPUTE_DTYPE)
            else:
                d = t.to(COMPUTE_DTYPE)
                if not _all_finite(d):
                    raise _not_finite(i, entry, tp.name)
                if base is not None:
                    d -= base.read(tp.name).to(COMPUTE_DTYPE)
            sel.add(d.abs_())


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
                   should_cancel: Callable[[], bool] | None = None,
                   decisions: dict | None = None) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Merge any subset of tensors, in the given order, prefetching the next ones.
    ``decisions`` (a dict) receives, per tensor, what the method decided for it
    (``decisions_record``), if anything.

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
            notes: dict = {}
            merged = merge_one(inputs, tp, base, tensors, device, notes)
            del base, tensors  # the buffers as read are not kept alive while the writer works
            if notes and decisions is not None:
                decisions[tp.name] = decisions_record(notes)
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

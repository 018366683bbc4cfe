"""Which tensor gets which treatment, decided and validated before any merging starts.

The plan checks that every model holds every base tensor with the same shape, picks
each tensor's kind (matrix, vector-like, or copied from the base: the ``select`` rules),
its operation (``Op``: what the executor does with it, asked of the method once, here),
the method's parameters and per-model values for it, its output dtype, and the output
shard layout. A bad input is therefore refused before anything is written, and the
executor (execute.py) only ever runs what the plan says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .checkpoint import CODE_OF, CheckpointReader, OutTensor, Source, TensorInfo, plan_shards
from .errors import MergeError, StopPoll
from .methods.base import COPY, MATRIX, VECTOR, MergeMethod, Op, Params, PerModel
from .patterns import Matcher, compile_patterns
from .spec import MergeSpec, Select

MAX_LISTED = 5
# An element-wise tensor whose inputs (base + models, as stored) exceed this is not read
# ahead whole but read range by range as it is merged (inputs.LazyTensor): Op.ELEMENTWISE_LAZY.
LAZY_INPUT_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: str  # MATRIX, VECTOR or COPY (the select rules)
    out: OutTensor
    op: Op = Op.COPY  # what the executor does with it
    params: Params | None = None  # the method's parameters for this tensor (None: copied)
    models: PerModel | None = None  # per-model values for this tensor: weights, per-model parameters
    sources: tuple[Source, ...] = ()  # how each model (spec order) holds it


@dataclass
class Plan:
    tensors: list[TensorPlan]
    shards: list[list[OutTensor]]
    warnings: list[str]

    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}


class Selector:
    """``select`` rules compiled once (patterns.py: the guarded compile); patterns match
    whole names (``fullmatch``), each match bounded in time, ``poll`` (cancel, time
    limit) asked as it goes."""

    def __init__(self, select: Select, poll: Callable[[], None] | None = None):
        items = [(p, f"select.{which}[{i}]", f"select.{which}[{i}]")
                 for which in ("linear", "exclude", "ignore") for i, p in enumerate(getattr(select, which))]
        compiled = compile_patterns(items, code="invalid_spec", source="select", poll=poll)
        self.linear = [p for p in compiled if p.label.startswith("select.linear[")]
        self.exclude = [p for p in compiled if p.label.startswith("select.exclude[")]
        self.ignore = [p for p in compiled if p.label.startswith("select.ignore[")]
        self.matcher = Matcher(poll=poll)

    def _any(self, patterns, name: str) -> bool:
        return any(self.matcher.fullmatch(p, name, "tensor names") for p in patterns)

    def kind(self, info: TensorInfo) -> str:
        if not info.is_float or self._any(self.ignore, info.name):
            return COPY
        if len(info.shape) >= 2 and self._any(self.linear, info.name) and not self._any(self.exclude, info.name):
            return MATRIX
        return VECTOR


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def build_plan(spec: MergeSpec, reference: CheckpointReader, base: CheckpointReader | None, models: Sequence,
               model_uris: list[str], poll: Callable[[], None] | None = None) -> Plan:
    """The plan over ``reference`` (the base; for ``linear`` without one, the first model;
    for an adapter output without one, the adapters' modules: adapters.AdapterReference).
    ``base`` and ``models`` (every model's reader in spec order, full checkpoints or LoRA
    adapters) give each tensor's sources; the full checkpoints other than the reference
    are checked against it. ``poll`` (cancel, time limit: errors.StopPoll) is asked as it
    goes: a plan may cover 10^5 tensors."""
    poll = poll or StopPoll()
    warnings: list[str] = []
    ref = reference.tensors
    selector = Selector(spec.select, poll)
    kinds = {name: selector.kind(info) for name, info in ref.items()}
    for uri, reader in zip(model_uris, models):
        if reader.is_adapter or reader is reference:
            continue
        poll()
        missing = [n for n in ref if n not in reader.tensors]
        # A tensor copied from the base (integer/bool buffers, ``select.ignore``) needs no
        # fine-tuned copy: checkpoints saved by different library versions differ in such
        # buffers (e.g. BERT's int64 ``embeddings.position_ids``), so this is only a warning.
        copied = [n for n in missing if kinds[n] == COPY]
        missing = [n for n in missing if kinds[n] != COPY]
        if missing:
            raise MergeError("incompatible_checkpoints",
                             f"{uri} lacks {len(missing)} tensor(s) of the base: {_listing(missing)}")
        if copied:
            warnings.append(f"{uri} lacks {len(copied)} tensor(s) that are copied from the base anyway "
                            f"(not floating-point, or ignored by select): {_listing(copied)}")
        mismatched = [f"{n} {list(reader.tensors[n].shape)} vs {list(ref[n].shape)}"
                      for n in ref if n in reader.tensors and reader.tensors[n].shape != ref[n].shape]
        if mismatched:
            raise MergeError("incompatible_checkpoints",
                             f"{uri} has tensors shaped differently from the base: {_listing(mismatched)}")
        extra = [n for n in reader.tensors if n not in ref]
        if extra:
            warnings.append(f"{uri} holds {len(extra)} tensor(s) the base lacks; they are not merged: {_listing(extra)}")
    method = spec.merge_method
    # Per-model values: every model's weight, and each parameter the method takes per model
    # (today the spec's global value for every model; issue #13 resolves them per model and
    # per tensor here, and the hooks read them from TensorPlan.models unchanged).
    models_values = PerModel(weight=tuple(m.weight for m in spec.models),
                             values={k: (getattr(spec.parameters, k),) * len(spec.models) for k in method.per_model})
    readers = ([base] if base is not None else []) + list(models)
    interned: dict[tuple, tuple] = {}  # one tuple per distinct combination of sources
    plans = []
    for name, info in ref.items():
        kind = kinds[name]
        dtype = CODE_OF[spec.dtype] if spec.dtype and kind != COPY else info.dtype
        out = OutTensor(name, dtype, info.shape)
        if kind == COPY:
            plans.append(TensorPlan(name, kind, out))
            continue
        sources = tuple(m.source(name) for m in models)
        sources = interned.setdefault(sources, sources)
        params = spec.parameters  # per tensor when parameters vary over layers (issue #13)
        op = operation(method, kind, params, sources, info.shape,
                       lambda: sum(r.nbytes(name) for r in readers))
        plans.append(TensorPlan(name, kind, out, op, params, models_values, sources))
    if not any(p.kind != COPY for p in plans):
        warnings.append("no tensor is merged: every tensor is ignored or not floating-point")
    shards = plan_shards([p.out for p in plans], spec.shard_size)
    return Plan(plans, shards, warnings)


def operation(method: MergeMethod, kind: str, params: Params, sources: Sequence[Source], shape: Sequence[int],
              input_bytes: Callable[[], int]) -> Op:
    """What the executor does with one merged tensor.

    Every input a full checkpoint: the method's operation for the kind (element-wise, read
    range by range when its inputs exceed LAZY_INPUT_BYTES, or dense). LoRA inputs: the
    method's low-rank form when the tensor is a matrix, the method has one for its kind and
    every task delta is factored or absent; else the dense delta on the materialised
    stack (a full fine-tune or an adapter's full layer copy among them, or no low-rank form).
    """
    if all(s == Source.FULL for s in sources):
        op = method.operation(kind, params)
        if op == Op.ELEMENTWISE and input_bytes() > LAZY_INPUT_BYTES:
            return Op.ELEMENTWISE_LAZY
        return op
    factored = all(s in (Source.FACTORED, Source.ABSENT) for s in sources)
    return Op.LOWRANK if factored and len(shape) == 2 and method.has_lowrank(kind, params) else Op.DENSE

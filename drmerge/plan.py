"""Which tensor gets which treatment, decided and validated before any merging starts.

The plan checks that every model holds every base tensor with the same shape, picks
each tensor's kind (DRM matrix, vector-like, or copied from the base), its output dtype,
and the output shard layout. A bad input is therefore refused before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .checkpoint import CODE_OF, CheckpointReader, OutTensor, TensorInfo, plan_shards
from .errors import MergeError, StopPoll
from .methods.base import COPY, MATRIX, VECTOR
from .patterns import Matcher, compile_patterns
from .spec import MergeSpec, Select

MAX_LISTED = 5


@dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: str  # MATRIX, VECTOR or COPY
    out: OutTensor


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


def build_plan(spec: MergeSpec, reference: CheckpointReader, models: list[CheckpointReader],
               model_uris: list[str], poll: Callable[[], None] | None = None) -> Plan:
    """``reference`` is the base (or, for ``linear``, the first model). ``poll`` (cancel,
    time limit: errors.StopPoll) is asked as it goes: a plan may cover 10^5 tensors."""
    poll = poll or StopPoll()
    warnings: list[str] = []
    ref = reference.tensors
    selector = Selector(spec.select, poll)
    kinds = {name: selector.kind(info) for name, info in ref.items()}
    for uri, reader in zip(model_uris, models):
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
    plans = []
    for name, info in ref.items():
        kind = kinds[name]
        dtype = CODE_OF[spec.dtype] if spec.dtype and kind != COPY else info.dtype
        plans.append(TensorPlan(name, kind, OutTensor(name, dtype, info.shape)))
    if not any(p.kind != COPY for p in plans):
        warnings.append("no tensor is merged: every tensor is ignored or not floating-point")
    shards = plan_shards([p.out for p in plans], spec.shard_size)
    return Plan(plans, shards, warnings)

"""Which tensor gets which treatment, decided and validated before any merging starts.

The plan checks that every model holds every base tensor with the same shape, picks
each tensor's kind (DRM matrix, vector-like, or copied from the base), its output dtype,
and the output shard layout. A bad input is therefore refused before anything is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import regex

from .checkpoint import CODE_OF, CheckpointReader, OutTensor, TensorInfo, plan_shards
from .errors import MergeError
from .methods import COPY, MATRIX, VECTOR
from .spec import MergeSpec, Select

MAX_LISTED = 5
# Select patterns come from users and run against tensor names from files: a pattern with
# catastrophic backtracking (``(.*){1,32000}[bc]``) would hold a worker for hours. The
# ``regex`` engine can stop a match after a timeout (``re`` cannot be interrupted), so each
# match gets MATCH_TIMEOUT_S and one plan's matching at most SELECT_BUDGET_S in total; a
# pattern that runs out is refused as ``invalid_spec``. (Refusing nested quantifiers up
# front would also refuse harmless patterns like ``(layers\.\d+\.)*weight`` and still miss
# others such as ``(a|aa)*``; a time bound is exact.)
MATCH_TIMEOUT_S = 0.5
SELECT_BUDGET_S = 120.0


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
    """``select`` rules compiled once; patterns match whole names (``fullmatch``), each
    match bounded in time (see MATCH_TIMEOUT_S)."""

    def __init__(self, select: Select):
        self.linear = [("linear", i, regex.compile(p)) for i, p in enumerate(select.linear)]
        self.exclude = [("exclude", i, regex.compile(p)) for i, p in enumerate(select.exclude)]
        self.ignore = [("ignore", i, regex.compile(p)) for i, p in enumerate(select.ignore)]
        self.spent = 0.0

    def _any(self, patterns, name: str) -> bool:
        for which, i, p in patterns:
            left = SELECT_BUDGET_S - self.spent
            t0 = time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                hit = p.fullmatch(name, timeout=min(MATCH_TIMEOUT_S, left))
            except TimeoutError:
                raise MergeError(
                    "invalid_spec",
                    f"select.{which}[{i}] {p.pattern[:80]!r} takes too long to match tensor names "
                    f"(over {MATCH_TIMEOUT_S}s for {name[:80]!r}, or {SELECT_BUDGET_S:g}s in all): it backtracks "
                    "catastrophically; use a simpler pattern (avoid nested or overlapping repetition)",
                    param=f"select.{which}[{i}]") from None
            finally:
                self.spent += time.monotonic() - t0
            if hit:
                return True
        return False

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
               model_uris: list[str]) -> Plan:
    """``reference`` is the base (or, for ``linear``, the first model)."""
    warnings: list[str] = []
    ref = reference.tensors
    selector = Selector(spec.select)
    kinds = {name: selector.kind(info) for name, info in ref.items()}
    for uri, reader in zip(model_uris, models):
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

"""What a merge method is: its parameter class, the operation the plan gives each kind of
tensor, and the hooks the executor calls (docs/DESIGN.md, "The method registry").

Torch-free at import: the API process imports every method through the spec parser (to
validate ``parameters`` and to build the JSON Schema) and must never load torch. A hook
that touches tensors imports torch, or a ``drmerge.kernels`` module, in its body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import MergeError
from ..kernels.rules import Divide, ElementwiseRule, Sign  # noqa: F401 (the hooks' vocabulary)

if TYPE_CHECKING:
    import torch

    from ..kernels.lowrank import LowRank

# What the select rules make of a tensor (plan.Selector.kind).
MATRIX = "matrix"  # a 2-D (or more) weight the linear patterns pick and exclude does not
VECTOR = "vector"  # every other floating-point tensor: biases, norms, embeddings, heads
STATISTIC = "statistic"  # normalisation statistics (running_mean/var): the weighted mean, whatever the method
COPY = "copy"  # copied from the base unchanged: not floating-point, or select.ignore


class Op(StrEnum):
    """What the executor does with one tensor, chosen once when the plan is built."""

    COPY = "copy"  # the base's (or reference's) tensor, converted to the output dtype
    ELEMENTWISE = "elementwise"  # every input read whole, merged chunk by chunk by the method's rule
    ELEMENTWISE_LAZY = "elementwise_lazy"  # the same, inputs read range by range (large tensors)
    DENSE = "dense"  # the method's whole-tensor delta on the materialised stack of task deltas
    LOWRANK = "lowrank"  # the method's low-rank form on LoRA factors: nothing n x m per task
    MEAN = "mean"  # the weighted mean of the models' values (statistics): no method is asked


class Params(BaseModel):
    """A method's parameters: one subclass per method, its fields with their defaults and
    bounds. Unknown keys are refused (``extra="forbid"``), values are never coerced
    (``strict``: ``"0.5"`` or ``true`` is not a number), and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# The per-model value a pooled trim hands the hooks (``MergeMethod.pool_keep``): each
# model's magnitude threshold over the pool; entries of smaller magnitude are dropped.
POOL_FLOOR = "pool_floor"


@dataclass(frozen=True)
class PerModel:
    """Per-model values for one tensor, one entry per model in spec order: every model's
    ``weight``, and each parameter the method declares per model (``MergeMethod.per_model``).

    Resolved by the planner for every tensor (plan.py). Today each model has only its
    weight and every tensor gets the spec's; per-model parameters, gradients and filters
    resolve here without touching the hooks that read them."""

    weight: tuple[float, ...]
    values: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> tuple[float, ...]:
        return self.weight if name == "weight" else self.values[name]


class MergeMethod:
    """One merge method: registered by the module that defines it (``METHOD = ...``).

    Subclasses set ``name``, ``Params`` and ``summary``, and implement the hooks their
    method has. The executor calls them with per-tensor arguments: ``kind`` (MATRIX or
    VECTOR), the task deltas (or factors), ``weights`` (a (T,) tensor of the models'
    weights), the tensor's resolved ``params`` and ``models`` (its PerModel values)."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    summary: ClassVar[str]
    needs_base: ClassVar[bool] = True  # a full output needs base_model (the deltas are relative to it)
    accepts_adapters: ClassVar[bool] = True  # LoRA adapters may be inputs
    per_model: ClassVar[tuple[str, ...]] = ()  # parameters given per model, besides weight (none yet)
    # Merges a matrix by its structure (a decomposition), not entry by entry: the plan hands
    # it every matrix as the linear map out x in (Conv1D weights transposed) and every part
    # of a fused projection (q/k/v, gate/up) as its own matrix (drmerge/layouts.py). An
    # element-wise method needs neither: both change nothing for it.
    splits_fused: ClassVar[bool] = False

    # ------------------------------------------------------------------ parameters

    def parse_params(self, data: Any, where: str = "parameters", others: Sequence["MergeMethod"] = ()) -> Params:
        """The validated parameters, or ``invalid_spec`` naming ``parameters.<key>``.
        ``others``: the other registered methods, named when a key belongs to one of them."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise MergeError("invalid_spec", f"{where}: must be a mapping, got {type(data).__name__}", param=where)
        fields = self.Params.model_fields
        for key in data:
            if key not in fields:
                raise MergeError("invalid_spec", f"{where}.{key}: {self._not_ours(key, others)}", param=f"{where}.{key}")
        try:
            return self.Params(**data)
        except ValidationError as e:
            errors = {err["loc"][0]: err for err in e.errors() if err.get("loc")}
            key = next(k for k in data if k in errors)
            raise MergeError("invalid_spec", f"{where}.{key}: {_message(fields[key], errors[key], data[key])}",
                             param=f"{where}.{key}") from None

    def _not_ours(self, key: str, others: Sequence["MergeMethod"]) -> str:
        own = list(self.Params.model_fields)
        theirs = [m.name for m in others if m is not self and key in m.Params.model_fields]
        its = f"its parameters: {', '.join(own)}" if own else "it takes no parameters"
        if theirs:
            return f"does not apply to method {self.name!r} ({its}; {key} is a parameter of {', '.join(theirs)})"
        return f"unknown key ({its})"

    def json_schema(self) -> dict:
        """The JSON Schema of this method's ``parameters`` (the API's OpenAPI document)."""
        schema = self.Params.model_json_schema()
        schema.pop("title", None)
        schema["description"] = f"Parameters of method `{self.name}`."
        return schema

    # ------------------------------------------------------------------ what the plan does

    def operation(self, kind: str, params: Params) -> Op:
        """``Op.ELEMENTWISE`` if this method combines a tensor of this kind entry by entry
        (then ``elementwise_rule`` says how), else ``Op.DENSE`` (``dense_delta`` on the whole
        stack). The planner refines it (lazy reads, low-rank inputs)."""
        return Op.ELEMENTWISE

    def has_lowrank(self, kind: str, params: Params) -> bool:
        """Whether ``lowrank_delta`` merges factored deltas of this kind exactly."""
        return False

    def scale(self, params: Params) -> float:
        """The global scale ``lam`` of ``W0 + lam * D`` (1 for methods without one)."""
        return getattr(params, "scale", 1.0)

    def pool_keep(self, kind: str, params: Params) -> float | None:
        """The fraction of each model's entries kept by one trim over *all* tensors of this
        kind together (one magnitude threshold per model, computed over the pool before
        they are merged; the hooks then find it as the per-model value ``POOL_FLOOR``),
        or None: no pooled trim."""
        return None

    def decided(self, params: Params) -> dict[str, str]:
        """The parameters this method decides per matrix from the data, at merge time
        (``decide``), with how: ``drmerge validate`` reports them, since it reads no data."""
        return {}

    def decide(self, kind: str, params: Params, deltas: "torch.Tensor | None" = None,
               factors: "Sequence[LowRank | None] | None" = None, shape: tuple[int, int] | None = None
               ) -> tuple[Params, dict]:
        """The parameters to merge one matrix (or one part of a fused one) with, given its
        task deltas (a (T, n, m) stack) or factors, and what was decided (recorded per
        matrix in drmerge.json): the parameters as they are, and nothing, by default."""
        return params, {}

    # ------------------------------------------------------------------ hooks

    def elementwise_rule(self, kind: str, params: Params, models: PerModel | None = None) -> ElementwiseRule | None:
        return None

    def dense_delta(self, kind: str, deltas: "torch.Tensor", weights: "torch.Tensor", params: Params,
                    models: PerModel | None = None) -> "torch.Tensor":
        """Merged delta ``D`` of one tensor from the (T, ...) stack of its task deltas,
        before the scale. Default: the element-wise rule applied to the whole tensor."""
        rule = self.elementwise_rule(kind, params, models)
        if rule is None or rule.of_weights:
            raise MergeError("internal_error", f"method {self.name!r} has no dense delta for {kind} tensors")
        from ..kernels.elementwise import rule_delta

        return rule_delta(rule, deltas, weights)

    def lowrank_delta(self, kind: str, factors: Sequence["LowRank | None"], shape: tuple[int, int],
                      weights: "torch.Tensor", params: Params, models: PerModel | None = None) -> "LowRank":
        """Merged delta of factored task deltas (``None``: the task leaves the tensor alone),
        kept factored. Only called where ``has_lowrank`` said yes."""
        raise MergeError("internal_error", f"method {self.name!r} has no low-rank form")

    def merge_tensor(self, kind: str, base: "torch.Tensor | None", tensors: "torch.Tensor",
                     weights: "torch.Tensor", params: Params) -> "torch.Tensor":
        """Merged weights of one tensor from the (T, ...) stack of the models' weights, all at
        once: the plain whole-tensor form the chunked executor is tested against."""
        rule = self.elementwise_rule(kind, params)
        if rule is not None and rule.of_weights:
            from ..kernels.signs import combine

            merged = combine(tensors, weights, rule.sign, rule.divide)
            return merged * rule.scale if rule.scale != 1.0 else merged
        delta = self.dense_delta(kind, tensors - base, weights, params)
        return base + self.scale(params) * delta


def _message(info, err: dict, value) -> str:
    """A validation error in the spec's words (what is allowed, what was given)."""
    kind = err["type"]
    if kind in ("float_type", "int_type", "finite_number", "float_parsing"):
        return f"must be a finite number, got {value!r}"
    if kind == "bool_type":
        return f"must be true or false, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {', '.join(map(str, get_args(info.annotation)))}, got {value!r}"
    if kind == "value_error" and err.get("ctx", {}).get("error") is not None:
        return f"{err['ctx']['error']}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = []
        for m in info.metadata:
            for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                if getattr(m, attr, None) is not None:
                    bounds.append(f"{op} {getattr(m, attr)}")
        return f"must be {' and '.join(bounds)}, got {float(value)}"
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {value!r}"

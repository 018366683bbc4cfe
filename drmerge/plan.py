"""Which tensor gets which treatment, decided and validated before any merging starts.

The plan checks that every model holds every base tensor with the same shape, picks
each tensor's kind (matrix, vector-like, or copied from the base: the ``select`` rules),
its operation (``Op``: what the executor does with it, asked of the method once, here),
the method's parameters and per-model values for it, its output dtype, and the output
shard layout. A bad input is therefore refused before anything is written, and the
executor (execute.py) only ever runs what the plan says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .checkpoint import CODE_OF, CheckpointReader, OutTensor, Source, TensorInfo, plan_shards
from .errors import MergeError, StopPoll
from .layouts import MHA_IN_PROJ, MatrixView, SplitRule, presets
from .methods.base import COPY, MATRIX, STATISTIC, VECTOR, MergeMethod, Op, Params, PerModel
from .patterns import Matcher, compile_patterns
from .spec import MergeSpec, Select

MAX_LISTED = 5
# An element-wise tensor whose inputs (base + models, as stored) exceed this is not read
# ahead whole but read range by range as it is merged (inputs.LazyTensor): Op.ELEMENTWISE_LAZY.
LAZY_INPUT_BYTES = 256 * 2**20
# Counters of normalisation layers (BatchNorm's num_batches_tracked): copied from the base,
# whatever their dtype (an int64 counter is copied anyway, as every non-float tensor is).
COUNTERS = (r"(.*\.)?num_batches_tracked",)
MODEL_CONFIG = "config.json"  # the reference checkpoint's, read for the split presets and orientation
MAX_CONFIG_BYTES = 4 * 2**20


@dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: str  # MATRIX, VECTOR or COPY (the select rules)
    out: OutTensor
    op: Op = Op.COPY  # what the executor does with it
    params: Params | None = None  # the method's parameters for this tensor (None: copied)
    models: PerModel | None = None  # per-model values for this tensor: weights, per-model parameters
    sources: tuple[Source, ...] = ()  # how each model (spec order) holds it
    view: MatrixView | None = None  # a structured method's matrix: transposed and/or split (layouts.py)
    pool: str | None = None  # the pooled trim it takes part in (Plan.pools), if any


@dataclass
class Plan:
    tensors: list[TensorPlan]
    shards: list[list[OutTensor]]
    warnings: list[str]
    pools: dict[str, float] = field(default_factory=dict)  # pooled trims: name -> fraction of entries kept
    excluded: dict[str, list[str]] = field(default_factory=dict)  # select.exclude pattern -> matrices it excluded

    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}


class Selector:
    """``select`` rules compiled once (patterns.py: the guarded compile); patterns match
    whole names (``fullmatch``), each match bounded in time, ``poll`` (cancel, time
    limit) asked as it goes."""

    LISTS = ("linear", "exclude", "ignore", "statistics")

    def __init__(self, select: Select, poll: Callable[[], None] | None = None):
        items = [(p, f"select.{which}[{i}]", f"select.{which}[{i}]")
                 for which in self.LISTS for i, p in enumerate(getattr(select, which))]
        items += [(p, "counters", None) for p in COUNTERS]
        where = "select.split.rules"  # the normalized spec's path (a list given as select.split is its rules)
        items += [(r.pattern, f"{where}[{i}].pattern", f"{where}[{i}].pattern") for i, r in enumerate(select.split.rules)]
        compiled = compile_patterns(items, code="invalid_spec", source="select", poll=poll)
        for which in self.LISTS:
            setattr(self, which, [p for p in compiled if p.label.startswith(f"select.{which}[")])
        self.counters = [p for p in compiled if p.label == "counters"]
        self.split_rules = list(zip(select.split.rules, [p for p in compiled if p.label.startswith(where)]))
        self.split_presets = select.split.presets
        self.matcher = Matcher(poll=poll)

    def _any(self, patterns, name: str) -> bool:
        return any(self.matcher.fullmatch(p, name, "tensor names") for p in patterns)

    def kind(self, info: TensorInfo) -> str:
        if not info.is_float or self._any(self.ignore, info.name) or self._any(self.counters, info.name):
            return COPY
        if self._any(self.statistics, info.name):
            return STATISTIC
        if len(info.shape) >= 2 and self._any(self.linear, info.name) and not self._any(self.exclude, info.name):
            return MATRIX
        return VECTOR

    def excluded_by(self, info: TensorInfo) -> str | None:
        """The ``select.exclude`` pattern that made a would-be matrix vector-like, if one did."""
        if len(info.shape) < 2 or not self._any(self.linear, info.name):
            return None
        return next((p.text for p in self.exclude if self.matcher.fullmatch(p, info.name, "tensor names")), None)


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
    statistics = [n for n, k in kinds.items() if k == STATISTIC]
    if statistics:
        _check_statistics_weights(spec, statistics)
    views = _views(spec, method, reference, models, kinds, selector, warnings, poll)
    readers = ([base] if base is not None else []) + list(models)
    interned: dict[tuple, tuple] = {}  # one tuple per distinct combination of sources
    plans = []
    pools: dict[str, float] = {}
    for name, info in ref.items():
        kind = kinds[name]
        dtype = CODE_OF[spec.dtype] if spec.dtype and kind != COPY else info.dtype
        out = OutTensor(name, dtype, info.shape)
        if kind == COPY:
            plans.append(TensorPlan(name, kind, out))
            continue
        sources = tuple(m.source(name) for m in models)
        sources = interned.setdefault(sources, sources)
        if kind == STATISTIC:  # no method is asked: the weighted mean of the models' values
            plans.append(TensorPlan(name, kind, out, Op.MEAN, None, models_values, sources))
            continue
        params = spec.parameters  # per tensor when parameters vary over layers (issue #13)
        op = operation(method, kind, params, sources, info.shape,
                       lambda: sum(r.nbytes(name) for r in readers))
        keep = method.pool_keep(kind, params)
        if keep is not None:
            pools[kind] = keep
        plans.append(TensorPlan(name, kind, out, op, params, models_values, sources, views.get(name),
                                kind if keep is not None else None))
    if not any(p.kind != COPY for p in plans):
        warnings.append("no tensor is merged: every tensor is ignored or not floating-point")
    shards = plan_shards([p.out for p in plans], spec.shard_size)
    excluded: dict[str, list[str]] = {}
    for name, info in ref.items():
        if kinds[name] == VECTOR:
            pattern = selector.excluded_by(info)
            if pattern is not None:
                excluded.setdefault(pattern, []).append(name)
    return Plan(plans, shards, warnings, pools, excluded)


def _check_statistics_weights(spec: MergeSpec, statistics: list[str]) -> None:
    """Statistics are the weighted mean of the models' values, which keeps a variance
    positive only with weights >= 0 (and not all 0)."""
    weights = [m.weight for m in spec.models]
    negative = [i for i, w in enumerate(weights) if w < 0]
    if negative or not any(w > 0 for w in weights):
        i = negative[0] if negative else 0
        why = f"models[{i}].weight is {weights[i]}" if negative else "every model's weight is 0"
        raise MergeError("invalid_spec", f"{why}, but the checkpoints hold normalisation statistics ({statistics[0]}"
                         f"{f' and {len(statistics) - 1} more' if len(statistics) > 1 else ''}), which every method "
                         "merges as the weighted mean of the models' values: that needs weights >= 0, not all 0 (a "
                         "variance must stay positive). Give such weights, or keep the base's statistics with "
                         "select.ignore (e.g. '(.*\\.)?running_(mean|var)')", param=f"models[{i}].weight")


def model_config(reference, warnings: list[str]) -> dict | None:
    """The reference checkpoint's ``config.json`` (None if it has none or it is unreadable,
    with a warning: no split preset or orientation can come from it then)."""
    storage = getattr(reference, "storage", None)
    if storage is None or MODEL_CONFIG not in getattr(reference, "files", ()):
        return None
    try:
        size = storage.size(MODEL_CONFIG)
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{size} bytes, more than a config may be ({MAX_CONFIG_BYTES})")
        config = json.loads(bytes(storage.read_range(MODEL_CONFIG, 0, size)))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return config
    except (ValueError, UnicodeDecodeError) as e:
        warnings.append(f"{MODEL_CONFIG} of the reference checkpoint cannot be read ({e}): no fused-projection "
                        "preset or Conv1D orientation is taken from it")
        return None


def _views(spec: MergeSpec, method: MergeMethod, reference, models: Sequence, kinds: dict[str, str],
           selector: Selector, warnings: list[str], poll) -> dict[str, MatrixView]:
    """Each matrix's view for a structured method (``splits_fused``): transposed where the
    model stores it ``in x out`` (Conv1D), split where a ``select.split`` rule or a preset
    matches (docs/DESIGN.md, "Fused projections and orientation")."""
    rules = selector.split_rules
    if not method.splits_fused:
        if rules:
            warnings.append(f"select.split has no effect with method {method.name!r}: it merges entry by entry, "
                            "which splitting a matrix does not change")
        return {}
    matrices = {n: i for n, i in reference.tensors.items() if kinds[n] == MATRIX}
    if not matrices:
        return {}
    config = model_config(reference, warnings)
    if config is None and selector.split_presets and getattr(reference, "storage", None) is None:
        warnings.append(f"no {MODEL_CONFIG} to choose fused-projection presets from (an adapter output without "
                        "base_model): only the name-based ones apply (in_proj_weight); give base_model, or "
                        "select.split rules, to split the others")
    preset_rules, conv1d = presets(config, selector.split_presets)
    # PEFT decides fan_in_fan_out per layer from its type: an adapter bound to a weight stored
    # in x out (adapters.AdapterReader.bind) knows that weight is a Conv1D.
    adapted_transposed = {name for m in models if getattr(m, "is_adapter", False)
                          for name, mod in m.by_name.items() if mod.fan_in_fan_out}
    compiled = compile_patterns([(r.pattern, f"split preset {r.label}", None) for r in preset_rules]
                                + [(p, "Conv1D pattern", None) for p in conv1d], code="internal_error",
                                source="split presets", poll=poll)
    preset_patterns = list(zip(preset_rules, compiled[:len(preset_rules)]))
    conv1d_patterns = compiled[len(preset_rules):]
    match = selector.matcher.fullmatch
    used = [False] * len(rules)
    views: dict[str, MatrixView] = {}
    for name, info in matrices.items():
        poll()
        user = next(((i, r) for i, (r, p) in enumerate(rules) if match(p, name, "tensor names")), None)
        if len(info.shape) != 2:
            if user is not None:
                raise MergeError("invalid_spec", f"select.split.rules[{user[0]}] matches {name}, which is "
                                 f"{len(info.shape)}-D: only 2-D matrices are split", param=f"select.split.rules[{user[0]}]")
            continue
        transposed = name in adapted_transposed or any(match(p, name, "tensor names") for p in conv1d_patterns)
        linear = (info.shape[1], info.shape[0]) if transposed else tuple(info.shape)
        rule, label = None, None
        if user is not None:
            used[user[0]] = True
            rule, label = user[1], f"select.split.rules[{user[0]}]"
        elif selector.split_presets:
            rule = next((r for r, p in preset_patterns if match(p, name, "tensor names")), None)
            label = rule.label if rule is not None else None
        parts = ()
        if rule is not None:
            length = linear[0] if rule.axis == "out" else linear[1]
            if rule is MHA_IN_PROJ and linear[0] != 3 * linear[1]:
                warnings.append(f"{name} is {linear[0]}x{linear[1]}, not the (3E, E) in_proj_weight of "
                                "nn.MultiheadAttention: merged as one matrix")
                rule = None
            else:
                try:
                    parts = rule.split(length)
                except ValueError as e:
                    raise _split_error(rule, label, name, linear, str(e), config) from None
        if transposed or parts:
            views[name] = MatrixView(transposed, rule.axis if rule is not None else "out", parts,
                                     label if rule is not None else None)
    for i, u in enumerate(used):
        if not u:
            warnings.append(f"select.split.rules[{i}] ({rules[i][0].pattern!r}) matches no matrix")
    return views


def _split_error(rule: SplitRule, label: str, name: str, linear: tuple[int, int], why: str, config) -> MergeError:
    axis = "rows" if rule.axis == "out" else "columns"
    shape = f"{name} (the linear map {linear[0]}x{linear[1]}, out x in)"
    if label.startswith("select.split"):
        return MergeError("invalid_spec", f"{label} cannot split {shape}: its {axis}: {why}", param=label)
    fields = {k: config.get(k) for k in ("model_type", "num_attention_heads", "n_head", "num_kv_heads",
                                         "num_key_value_heads", "hidden_size", "head_dim", "new_decoder_architecture",
                                         "multi_query") if isinstance(config, dict) and k in config}
    return MergeError("incompatible_checkpoints", f"the split preset {label} (from config.json: {fields}) does not fit "
                      f"{shape}: its {axis}: {why}. Fix config.json, give a select.split rule for it, or merge it as "
                      "one matrix with select.split: false", param="select.split")


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

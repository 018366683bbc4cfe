"""How a stored weight becomes the linear maps a structured merge decomposes (docs/DESIGN.md,
"Fused projections and orientation").

Methods that merge a matrix by its structure (DRM, the SVD-space methods: those with
``MergeMethod.splits_fused``) must see every matrix the same way, whatever the
architecture stored it as:

- **Orientation.** Every matrix is the linear map ``out x in`` (what ``nn.Linear`` stores).
  GPT-2's ``Conv1D`` (and the models that copied it) stores ``in x out``; such a weight is
  transposed for the merge and back (``CONV1D``: which tensors of which ``model_type``).
  Otherwise "vertical" on GPT-2 would silently be the horizontal DRM of the map.
- **Fused projections.** One stored matrix may be several linear maps side by side:
  q, k and v in one ``c_attn`` / ``query_key_value`` / ``qkv_proj`` / ``in_proj_weight``,
  gate and up in one ``gate_up_proj``. A split rule (``SplitRule``) names the rows (or
  columns) of each part; each part is merged as its own matrix and written back in place.
  Presets (``presets``) come from the checkpoint's ``config.json``; ``select.split`` adds
  rules or turns the presets off.

Parts are sets of rows of the linear map: ``contiguous`` (one block each: ``[q | k | v]``)
or ``interleaved`` per head group (``groups`` blocks, each laid out ``[q | k | v]``, as
BLOOM, GPT-NeoX and Falcon store theirs). Every structured method is equivariant under a
common permutation of rows, so only which rows belong to a part matters, not their order.

Torch-free: the spec parser (and so the API process) validates ``select.split`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MergeError

LAYOUTS = ("contiguous", "interleaved")
AXES = ("out", "in")  # of the linear map: split its rows (outputs) or its columns (inputs)
MAX_SPLIT_RULES = 64
MAX_PARTS = 64
MAX_GROUPS = 1 << 16
MAX_PART_NAME = 64
RULE_KEYS = ("pattern", "parts", "sizes", "axis", "layout", "groups", "names")
SPLIT_KEYS = ("presets", "rules")


@dataclass(frozen=True)
class Part:
    """One part of a split matrix: its name and its rows (``axis`` out) or columns
    (``axis`` in) of the linear map, as half-open ranges in ascending order."""

    name: str
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)


@dataclass(frozen=True)
class MatrixView:
    """How the plan hands one stored matrix to a structured method: transposed first
    (stored ``in x out``), then split into ``parts`` along ``axis`` of the linear map
    (none: the whole map). ``rule`` says which preset or ``select.split`` rule split it."""

    transposed: bool = False
    axis: str = "out"
    parts: tuple[Part, ...] = ()
    rule: str | None = None

    def to_dict(self) -> dict:
        """For the plan fingerprint and ``drmerge validate``."""
        return {"transposed": self.transposed, "axis": self.axis, "rule": self.rule,
                "parts": {p.name: [list(r) for r in p.ranges] for p in self.parts}}


@dataclass(frozen=True)
class SplitRule:
    """Which tensors to split and how (one ``select.split`` rule, or a preset).

    ``pattern`` matches whole tensor names; ``parts`` (equal sizes) or ``sizes`` give the
    parts, per head group when ``layout`` is ``interleaved`` (``groups`` groups along the
    axis, each holding every part in order); ``names`` label the parts (default
    ``part0, part1, ...``). ``label`` (presets only) says where a preset came from."""

    pattern: str
    parts: int | None = None
    sizes: tuple[int, ...] | None = None
    axis: str = "out"
    layout: str = "contiguous"
    groups: int | None = None
    names: tuple[str, ...] | None = None
    label: str | None = None

    @property
    def count(self) -> int:
        return self.parts if self.parts is not None else len(self.sizes)

    def part_names(self) -> tuple[str, ...]:
        return self.names or tuple(f"part{i}" for i in range(self.count))

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "parts": self.parts, "sizes": list(self.sizes) if self.sizes else None,
                "axis": self.axis, "layout": self.layout, "groups": self.groups,
                "names": list(self.names) if self.names else None}

    def split(self, length: int) -> tuple[Part, ...]:
        """The parts of an axis of ``length``; ``ValueError`` saying why it does not fit."""
        groups = self.groups if self.layout == "interleaved" else 1
        if length % groups:
            raise ValueError(f"{length} is not divisible into {groups} head groups")
        per_group = length // groups
        if self.sizes is not None:
            sizes = self.sizes
            if sum(sizes) != per_group:
                where = f" per head group ({length} / {groups})" if groups > 1 else ""
                raise ValueError(f"the sizes {list(sizes)} add up to {sum(sizes)}, not {per_group}{where}")
        else:
            if per_group % self.parts:
                where = f" per head group ({length} / {groups})" if groups > 1 else ""
                raise ValueError(f"{per_group}{where} is not divisible into {self.parts} equal parts")
            sizes = (per_group // self.parts,) * self.parts
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = []
        for name, off, size in zip(self.part_names(), offsets, sizes):
            ranges: list[tuple[int, int]] = []
            for g in range(groups):
                a = g * per_group + off
                if ranges and ranges[-1][1] == a:
                    ranges[-1] = (ranges[-1][0], a + size)
                else:
                    ranges.append((a, a + size))
            parts.append(Part(name, tuple(ranges)))
        return tuple(parts)


@dataclass(frozen=True)
class SplitSpec:
    """``select.split`` normalized: whether the presets apply, and the user's rules (tried
    first, in order; the first whose pattern matches a matrix splits it)."""

    presets: bool = True
    rules: tuple[SplitRule, ...] = ()

    def to_dict(self) -> dict:
        return {"presets": self.presets, "rules": [r.to_dict() for r in self.rules]}


# ---------------------------------------------------------------------------- parsing


def _fail(param: str, message: str):
    raise MergeError("invalid_spec", f"{param}: {message}", param=param)


def _positive_int(value, param: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        _fail(param, f"must be an integer in [1, {limit}], got {value!r}")
    return value


def parse_split(value, param: str = "select.split") -> tuple[SplitSpec, list[tuple[str, str, str]]]:
    """``select.split`` as given: ``true`` (the presets; the default), ``false`` (no
    splitting: every fused matrix merged as one), a list of rules (tried before the
    presets), or the normalized mapping ``{presets: bool, rules: [...]}``. Returns the
    spec and its patterns as ``(text, label, param)`` for the one guarded compile."""
    if isinstance(value, bool):
        return SplitSpec(presets=value), []
    if isinstance(value, list):
        presets, rules, where = True, value, param
    elif isinstance(value, dict):
        unknown = [k for k in value if k not in SPLIT_KEYS]
        if unknown:
            _fail(f"{param}.{unknown[0]}", f"unknown key (allowed: {', '.join(SPLIT_KEYS)})")
        presets = value.get("presets", True)
        if not isinstance(presets, bool):
            _fail(f"{param}.presets", f"must be true or false, got {presets!r}")
        rules, where = value.get("rules") or [], f"{param}.rules"
        if not isinstance(rules, list):
            _fail(where, "must be a list of split rules")
    else:
        _fail(param, "must be true (the presets), false (no splitting) or a list of rules "
              "{pattern, parts | sizes, axis, layout, groups, names}")
    if len(rules) > MAX_SPLIT_RULES:
        _fail(where, f"at most {MAX_SPLIT_RULES} rules, got {len(rules)}")
    parsed = tuple(_rule(r, f"{where}[{i}]") for i, r in enumerate(rules))
    patterns = [(r.pattern, f"{where}[{i}].pattern", f"{where}[{i}].pattern") for i, r in enumerate(parsed)]
    return SplitSpec(presets=presets, rules=parsed), patterns


def _rule(data, param: str) -> SplitRule:
    if not isinstance(data, dict):
        _fail(param, f"must be a mapping {{pattern, parts | sizes, axis, layout, groups, names}}, got "
              f"{type(data).__name__}")
    unknown = [k for k in data if k not in RULE_KEYS]
    if unknown:
        _fail(f"{param}.{unknown[0]}", f"unknown key (allowed: {', '.join(RULE_KEYS)})")
    pattern = data.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        _fail(f"{param}.pattern", "is required: a regular expression matched against whole tensor names")
    parts, sizes = data.get("parts"), data.get("sizes")
    if (parts is None) == (sizes is None):
        _fail(param, "give exactly one of parts (a number of equal parts) and sizes (the parts' sizes)")
    if parts is not None:
        parts = _positive_int(parts, f"{param}.parts", MAX_PARTS)
        if parts < 2:
            _fail(f"{param}.parts", f"must be at least 2 (one part is no split), got {parts}")
    else:
        if not isinstance(sizes, list) or not 2 <= len(sizes) <= MAX_PARTS:
            _fail(f"{param}.sizes", f"must be a list of 2 to {MAX_PARTS} positive integers, got {sizes!r}")
        sizes = tuple(_positive_int(s, f"{param}.sizes[{i}]", 1 << 40) for i, s in enumerate(sizes))
    axis = data.get("axis", "out")
    if axis not in AXES:
        _fail(f"{param}.axis", f"must be out (the rows of the linear map out x in) or in (its columns), got {axis!r}")
    layout = data.get("layout", "contiguous")
    if layout not in LAYOUTS:
        _fail(f"{param}.layout", f"must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    groups = data.get("groups")
    if layout == "interleaved":
        if groups is None:
            _fail(f"{param}.groups", "is required with layout interleaved: the number of head groups the axis holds "
                  "(the heads, or the kv heads when the queries of a group come first)")
        groups = _positive_int(groups, f"{param}.groups", MAX_GROUPS)
    elif groups is not None:
        _fail(f"{param}.groups", "only applies with layout interleaved")
    names = data.get("names")
    count = parts if parts is not None else len(sizes)
    if names is not None:
        if (not isinstance(names, list) or len(names) != count
                or not all(isinstance(n, str) and 0 < len(n) <= MAX_PART_NAME for n in names)
                or len(set(names)) != len(names)):
            _fail(f"{param}.names", f"must be {count} distinct non-empty names of at most {MAX_PART_NAME} "
                  f"characters, one per part, got {names!r}")
        names = tuple(names)
    return SplitRule(pattern=pattern, parts=parts, sizes=sizes, axis=axis, layout=layout, groups=groups, names=names)


# ---------------------------------------------------------------------------- presets

# Weights stored ``in x out`` (transformers' ``Conv1D``), by ``model_type``: verified against
# transformers 5.24 by instantiating each model and listing its Conv1D modules. Everything
# else (``lm_head``, ``score``, embeddings) is ``nn.Linear`` or an embedding.
_GPT2_CONV1D = (r"(.*\.)?(attn|crossattention)\.(c_attn|q_attn|c_proj)\.weight", r"(.*\.)?mlp\.(c_fc|c_proj)\.weight")
CONV1D: dict[str, tuple[str, ...]] = {
    "gpt2": _GPT2_CONV1D,
    "openai-gpt": _GPT2_CONV1D,
    "imagegpt": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "clvp": (r"(.*\.)?mlp\.(c_fc|c_proj)\.weight",),
}
# nn.MultiheadAttention (torch, open_clip, torchvision ViT): q, k, v stacked in one
# (3E, E) parameter, contiguous (F._in_projection_packed chunks it in three). Any model.
MHA_IN_PROJ = SplitRule(r"(.*\.)?in_proj_weight", parts=3, names=("q", "k", "v"),
                        label="nn.MultiheadAttention in_proj_weight")
# Legacy Falcon remote-code configs: their fields are not verified here, so no guess.
LEGACY_FALCON = ("RefinedWeb", "RefinedWebModel")
PRESET_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "falcon", "bloom", "gpt_neox", "phi3")


def _field(config: dict, keys: tuple[str, ...], default, what: str):
    """The first of ``keys`` that ``config.json`` sets, else transformers' default."""
    for k in keys:
        if config.get(k) is not None:
            value = config[k]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MergeError("corrupt_checkpoint", f"config.json: {k} ({what}) must be a positive integer, "
                                 f"got {value!r}")
            return value
    return default


def _flag(config: dict, key: str, default: bool) -> bool:
    value = config.get(key)
    return default if value is None else bool(value)


def _heads(config: dict, nh: int, hidden: int, model_type: str) -> int:
    if hidden % nh:
        raise MergeError("corrupt_checkpoint", f"config.json ({model_type}): hidden_size {hidden} is not divisible "
                         f"by the {nh} attention heads")
    return hidden // nh


def presets(config: dict | None, splits: bool = True) -> tuple[list[SplitRule], list[str]]:
    """The split presets (none unless ``splits``) and the ``in x out`` (Conv1D) patterns
    for a checkpoint whose ``config.json`` is ``config`` (None: none was found). Fields a
    config omits take transformers' defaults (as ``from_pretrained`` would); the plan
    checks every preset against the tensor's shape, so a config that disagrees with its
    weights is refused.
    """
    rules: list[SplitRule] = []
    model_type = config.get("model_type") if isinstance(config, dict) else None
    config = config if isinstance(config, dict) else {}
    conv1d = list(CONV1D.get(model_type, ()))
    if not splits:
        return rules, conv1d
    if model_type in LEGACY_FALCON:
        raise MergeError("invalid_spec", f"config.json has model_type {model_type!r} (Falcon's legacy remote code), "
                         "whose fused query_key_value layout drmerge does not guess: give a select.split rule for "
                         "it, or select.split: false to merge it as one matrix", param="select.split")
    qkv = ("q", "k", "v")
    if model_type in ("gpt2", "openai-gpt", "imagegpt", "decision_transformer"):
        rules.append(SplitRule(r"(.*\.)?attn\.c_attn\.weight", parts=3, names=qkv, label=f"{model_type} c_attn"))
        rules.append(SplitRule(r"(.*\.)?crossattention\.c_attn\.weight", parts=2, names=("k", "v"),
                               label=f"{model_type} cross-attention c_attn"))
    elif model_type == "falcon":
        nh = _field(config, ("num_attention_heads",), 71, "attention heads")
        hidden = _field(config, ("hidden_size", "n_embed"), 4544, "hidden size")
        hd = _heads(config, nh, hidden, model_type)
        pattern = r"(.*\.)?self_attention\.query_key_value\.weight"
        if _flag(config, "new_decoder_architecture", False):
            nkv = _field(config, ("num_kv_heads",), nh, "kv heads")
            if nh % nkv:
                raise MergeError("corrupt_checkpoint", f"config.json (falcon): {nh} attention heads are not "
                                 f"divisible into {nkv} kv heads")
            rules.append(SplitRule(pattern, sizes=((nh // nkv) * hd, hd, hd), layout="interleaved", groups=nkv,
                                   names=qkv, label=f"falcon query_key_value (new architecture: {nkv} kv groups "
                                                    f"of {nh // nkv} q heads, k, v; head_dim {hd})"))
        elif _flag(config, "multi_query", True):
            rules.append(SplitRule(pattern, sizes=(nh * hd, hd, hd), names=qkv,
                                   label=f"falcon query_key_value (multi-query: {nh} q heads, 1 k, 1 v; "
                                         f"head_dim {hd})"))
        else:
            rules.append(SplitRule(pattern, sizes=(hd, hd, hd), layout="interleaved", groups=nh, names=qkv,
                                   label=f"falcon query_key_value (per head q, k, v: {nh} heads of {hd})"))
    elif model_type == "bloom":
        nh = _field(config, ("n_head", "num_attention_heads"), 8, "attention heads")
        hidden = _field(config, ("hidden_size", "n_embed"), 64, "hidden size")
        hd = _heads(config, nh, hidden, model_type)
        rules.append(SplitRule(r"(.*\.)?self_attention\.query_key_value\.weight", sizes=(hd, hd, hd),
                               layout="interleaved", groups=nh, names=qkv,
                               label=f"bloom query_key_value (per head q, k, v: {nh} heads of {hd})"))
    elif model_type == "gpt_neox":
        nh = _field(config, ("num_attention_heads",), 64, "attention heads")
        hidden = _field(config, ("hidden_size",), 6144, "hidden size")
        hd = _heads(config, nh, hidden, model_type)
        rules.append(SplitRule(r"(.*\.)?attention\.query_key_value\.weight", sizes=(hd, hd, hd),
                               layout="interleaved", groups=nh, names=qkv,
                               label=f"gpt_neox query_key_value (per head q, k, v: {nh} heads of {hd})"))
    elif model_type == "phi3":
        nh = _field(config, ("num_attention_heads",), 32, "attention heads")
        nkv = _field(config, ("num_key_value_heads",), nh, "kv heads")
        hidden = _field(config, ("hidden_size",), 3072, "hidden size")
        hd = config.get("head_dim") if isinstance(config.get("head_dim"), int) and config["head_dim"] > 0 \
            else _heads(config, nh, hidden, model_type)
        rules.append(SplitRule(r"(.*\.)?self_attn\.qkv_proj\.weight", sizes=(nh * hd, nkv * hd, nkv * hd), names=qkv,
                               label=f"phi3 qkv_proj ({nh} q heads, {nkv} kv heads of {hd})"))
        rules.append(SplitRule(r"(.*\.)?mlp\.gate_up_proj\.weight", parts=2, names=("gate", "up"),
                               label="phi3 gate_up_proj"))
    rules.append(MHA_IN_PROJ)
    return rules, conv1d

"""The merge spec: one format for the CLI, the Python API and the HTTP API (docs/DESIGN.md,
"The spec").

Parsing is strict: an unknown key anywhere is an error naming its path, and every value
is checked here, once, so the engine, the CLI and the service agree on what is valid.
``method`` names a method of the registry (drmerge/methods), whose parameter class
validates ``parameters``: a parameter of another method is refused, never ignored.
This module is pure Python on purpose: the API process validates specs without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace

from . import locations, methods
from .errors import MergeError
from .layouts import SplitSpec, parse_split
from .methods.base import MergeMethod, Params
from .patterns import MAX_PATTERN_LENGTH, MAX_PATTERN_SIZE, compile_patterns  # noqa: F401 (re-exported)

DEFAULT_METHOD = "drm"
DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
                  "half": "float16", "bf16": "bfloat16"}
OUTPUT_FORMATS = ("full", "adapter")

DEFAULT_LINEAR = (r".*weight$",)
# Embeddings and output heads, then the task heads fine-tunes re-initialise (docs/DESIGN.md,
# "Which tensors"): transformers' heads wherever they sit, timm's and lukemelas' only at the
# top level (or under HF's TimmWrapper ``timm_model.``), because ``head`` and ``fc`` are also
# pretrained layers inside other models (SigLIP's ``vision_model.head``, audio ``fc`` layers).
DEFAULT_EXCLUDE = (r".*embed.*", r".*lm_head.*", r".*wte.*", r".*wpe.*", r"(.*\.)?shared\.weight",
                   r"(.*[._])?classifier(\..+)?", r"(.*\.)?classification_head\..+", r"(.*\.)?score\.(weight|bias)",
                   r"(.*\.)?qa_outputs\..+",
                   r"(timm_model\.)?(head|head_dist|aux_head|fc|_fc|last_linear|classif)\.(weight|bias)",
                   r"(timm_model\.)?head\.(fc|linear|proj|l)(\..+)?")
# Normalisation statistics: never trimmed, sign-elected or scaled; every method takes the
# weighted mean of the models' values (docs/DESIGN.md, "Which tensors").
DEFAULT_STATISTICS = (r"(.*\.)?running_(mean|var)",)
SELECT_LISTS = ("linear", "exclude", "ignore", "statistics")

MAX_MODELS = 256
MAX_PATTERNS = 64  # per select list (their length and size: patterns.py)
MAX_URI_LENGTH = 2048
DEFAULT_SHARD_SIZE = 5 * 1000**3

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


@dataclass(frozen=True)
class ModelEntry:
    model: str
    weight: float = 1.0


@dataclass(frozen=True)
class Select:
    linear: tuple[str, ...] = DEFAULT_LINEAR
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    ignore: tuple[str, ...] = ()
    statistics: tuple[str, ...] = DEFAULT_STATISTICS
    split: SplitSpec = SplitSpec()  # fused projections (drmerge/layouts.py): presets on, no rules of the user's

    def to_dict(self) -> dict:
        return {**{k: list(getattr(self, k)) for k in SELECT_LISTS}, "split": self.split.to_dict()}


@dataclass(frozen=True)
class MergeSpec:
    models: tuple[ModelEntry, ...]
    output: str
    base_model: str | None = None
    method: str = DEFAULT_METHOD
    parameters: Params | None = None  # the method's Params (None: its defaults)
    select: Select = field(default_factory=Select)
    dtype: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    output_format: str = "full"
    adapter_rank: int | None = None

    def __post_init__(self):
        params_class = methods.get(self.method).Params
        if self.parameters is None:
            object.__setattr__(self, "parameters", params_class())
        elif type(self.parameters) is not params_class:
            raise TypeError(f"parameters of method {self.method!r} must be {params_class.__name__}, "
                            f"got {type(self.parameters).__name__}")

    @property
    def merge_method(self) -> MergeMethod:
        """The registry's entry for ``method``."""
        return methods.get(self.method)

    def to_dict(self) -> dict:
        """The normalized spec (defaults filled in), JSON-serializable. ``parameters`` is a
        flat mapping of the method's own parameters."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["models"] = [asdict(m) for m in self.models]
        d["parameters"] = self.parameters.model_dump()
        d["select"] = self.select.to_dict()
        return d

    def uris(self) -> list[str]:
        """Every storage location the spec names, inputs first, output last."""
        return ([self.base_model] if self.base_model else []) + [m.model for m in self.models] + [self.output]

    def with_overrides(self, **kw) -> "MergeSpec":
        """A copy with some fields changed, validated again like a new spec (so an
        override cannot skip the canonical locations or the output-vs-input rule)."""
        return parse_spec(replace(self, **kw).to_dict())


def _fail(param: str, message: str):
    raise MergeError("invalid_spec", f"{param}: {message}", param=param)


def _check_keys(data, allowed, where: str):
    if not isinstance(data, dict):
        _fail(where or "spec", f"must be a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        prefix = f"{where}." if where else ""
        _fail(f"{prefix}{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _number(value, param: str) -> float:
    """A finite number (an int is taken as a float; a bool is not a number). The methods'
    own parameters are checked by their parameter classes (drmerge/methods)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(param, f"must be a finite number, got {value!r}")
    return float(value)


def _bool(value, param: str) -> bool:
    if not isinstance(value, bool):
        _fail(param, f"must be true or false, got {value!r}")
    return value


def _choice(value, choices, param: str) -> str:
    if value not in choices:
        _fail(param, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _uri(value, param: str, base_dir: str | None, allow_relative: bool = True) -> str:
    """The location's canonical form (drmerge.locations): every later comparison,
    reservation and allow-list check sees only that string."""
    if not isinstance(value, str) or not value.strip():
        _fail(param, "must be a non-empty string (a local path or s3://bucket/prefix/)")
    if len(value) > MAX_URI_LENGTH or "\x00" in value:
        _fail(param, f"must be at most {MAX_URI_LENGTH} characters with no NUL bytes")
    try:
        return locations.canonical(value, base_dir, allow_relative=allow_relative)
    except MergeError as e:
        _fail(param, e.message)


def _patterns(value, param: str) -> list[tuple[str, str, str]]:
    """A ``select`` list's shape; its patterns are checked together in ``_select``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        _fail(param, f"must be a list of at most {MAX_PATTERNS} regular expressions")
    return [(p, f"{param}[{i}]", f"{param}[{i}]") for i, p in enumerate(value)]


def parse_size(value, param: str = "shard_size") -> int:
    """``5GB``, ``200MB``, ``512MiB`` or a plain byte count."""
    if isinstance(value, bool):
        _fail(param, f"must be a size like '5GB' or a byte count, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
        if not m:
            _fail(param, f"must be a size like '5GB' or a byte count, got {value!r}")
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    else:
        _fail(param, f"must be a size like '5GB' or a byte count, got {value!r}")
    if n < 1024:
        _fail(param, f"must be at least 1KiB, got {n} bytes")
    return n


def _listed(what: str, names: list[str]) -> str:
    quoted = ", ".join(repr(n) for n in names)
    return f"{what} {quoted}" if len(names) == 1 else f"{what}s {quoted}" if names else f"no {what}"


def _select(data) -> Select:
    """Every pattern goes through the one guarded compile (patterns.py) the plan uses."""
    _check_keys(data, set(SELECT_LISTS) | {"split"}, "select")
    lists = {k: _patterns(v, f"select.{k}") for k, v in data.items() if k != "split"}
    split, split_patterns = parse_split(data["split"]) if "split" in data else (SplitSpec(), [])
    compile_patterns([item for items in lists.values() for item in items] + split_patterns, code="invalid_spec",
                     source="select")
    return Select(**{k: tuple(text for text, _, _ in items) for k, items in lists.items()}, split=split)


def _models(data, base_dir, allow_relative: bool = True) -> tuple[ModelEntry, ...]:
    if not isinstance(data, list) or not data:
        _fail("models", "must be a non-empty list of {model: URI, weight: number}")
    if len(data) > MAX_MODELS:
        _fail("models", f"at most {MAX_MODELS} models per merge, got {len(data)}")
    out = []
    for i, entry in enumerate(data):
        param = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        _check_keys(entry, {"model", "weight"}, param)
        if "model" not in entry:
            _fail(f"{param}.model", "is required")
        weight = _number(entry.get("weight", 1.0), f"{param}.weight")
        out.append(ModelEntry(model=_uri(entry["model"], f"{param}.model", base_dir, allow_relative), weight=weight))
    return tuple(out)


def parse_spec(data, base_dir: str | None = None, *, allow_relative: bool = True) -> MergeSpec:
    """Validate a spec mapping and return it normalized, every location in its
    canonical form (drmerge.locations).

    ``base_dir`` resolves relative local paths (the CLI passes the spec file's folder;
    None: the current directory). ``allow_relative=False`` refuses relative local paths
    instead (the service: its working directory means nothing to a caller).
    """
    allowed = {f.name for f in fields(MergeSpec)}
    _check_keys(data, allowed, "")
    for required in ("models", "output"):
        if required not in data:
            _fail(required, "is required")
    kw: dict = {"models": _models(data["models"], base_dir, allow_relative),
                "output": _uri(data["output"], "output", base_dir, allow_relative)}
    kw["method"] = _choice(data.get("method", DEFAULT_METHOD), methods.names(), "method")
    method = methods.get(kw["method"])
    if "output_format" in data:  # before base_model, whose requirement depends on it
        kw["output_format"] = _choice(data["output_format"], OUTPUT_FORMATS, "output_format")
    if data.get("base_model") is not None:
        kw["base_model"] = _uri(data["base_model"], "base_model", base_dir, allow_relative)
    elif method.needs_base and kw.get("output_format") != "adapter":
        free = [m.name for m in methods.all_methods() if not m.needs_base]
        _fail("base_model", f"is required for method {method.name!r} with output_format 'full' (only "
              f"{_listed('method', free)}, and output_format 'adapter', which merges LoRA adapters into one "
              "adapter, work without a base)")
    kw["parameters"] = method.parse_params(data.get("parameters"), others=methods.all_methods())
    if "select" in data:
        kw["select"] = _select(data["select"] if data["select"] is not None else {})
    if data.get("dtype") is not None:
        dt = data["dtype"]
        dt = _DTYPE_ALIASES.get(dt, dt) if isinstance(dt, str) else dt
        kw["dtype"] = _choice(dt, DTYPES, "dtype")
    if "shard_size" in data:
        kw["shard_size"] = parse_size(data["shard_size"])
    if "overwrite" in data:
        kw["overwrite"] = _bool(data["overwrite"], "overwrite")
    if data.get("adapter_rank") is not None:
        r = data["adapter_rank"]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 65536:
            _fail("adapter_rank", f"must be an integer in [1, 65536], got {r!r}")
        if kw.get("output_format", "full") != "adapter":
            _fail("adapter_rank", "only applies with output_format: adapter")
        kw["adapter_rank"] = r
    spec = MergeSpec(**kw)
    _check_output_apart(spec, data["output"])
    return spec


def _check_output_apart(spec: MergeSpec, written: str) -> None:
    """The output may not be, contain or lie inside any input: a merge (and overwrite,
    which first clears the output) would alter the input. Compared canonically, so no
    spelling (``//``, a trailing ``/``, a symlink) makes the same place look like two."""
    inputs = ([("base_model", spec.base_model)] if spec.base_model else []) + \
             [(f"models[{i}].model", m.model) for i, m in enumerate(spec.models)]
    for param, location in inputs:
        how = locations.relation(spec.output, location)
        if how is not None:
            spelled = f" (written {written!r})" if written.rstrip("/") != spec.output.rstrip("/") else ""
            _fail("output", f"{spec.output}{spelled} {how} the input {param} {location}: the output may not "
                  "equal, contain or lie inside an input (inputs are never written to or cleared)")


def load_spec_file(path: str) -> MergeSpec:
    """Read a YAML or JSON spec file (any extension); relative paths resolve against its folder."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise MergeError("invalid_spec", f"spec file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError("invalid_spec", f"cannot read spec file {path}: {e}") from None
    return parse_spec(parse_spec_text(text, path), base_dir=os.path.dirname(os.path.abspath(path)))


def parse_spec_text(text: str, where: str = "spec") -> dict:
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeError("invalid_spec", f"{where} is neither valid JSON nor valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MergeError("invalid_spec", f"{where} must hold a mapping at the top level")
    return data

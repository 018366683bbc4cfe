"""PEFT LoRA adapters as merge inputs: config parsing, tensor-name mapping, validation.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, local or
S3) contributes, for every module it adapts, the delta ``scaling * B @ A`` (docs/DESIGN.md,
"LoRA inputs and the low-rank path"), with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) and
``r``/``alpha`` taken per module from ``rank_pattern``/``alpha_pattern`` the way PEFT
itself resolves them. Every module it does not touch has a zero delta for that task.

We only ever accept what we can merge exactly. Anything whose effect on the weights is
not ``B @ A`` on a 2-D weight (DoRA, trained biases, ``modules_to_save``, embedding
LoRA, convolution LoRA, LoRA variants, initialisations that rewrite the base weights)
is refused with an error naming the adapter and the module, never dropped silently.

The reader is lazy like ``CheckpointReader``: only the safetensors header is parsed up
front; ``read(name)`` fetches one module's two factors when the pipeline needs them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

import torch

from .checkpoint import DTYPES, Source, TensorInfo, parse_header
from .errors import MergeError, StopPoll
from .kernels.lowrank import LowRank
from .methods.base import COPY
from .patterns import Matcher, Pattern, compile_pattern, compile_patterns
from .plan import build_plan
from .storage import Storage

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
BASE_LAYER_SUFFIX = ".base_layer.weight"  # PEFT's save_embedding_layers: a full copy of an adapted layer
# Bounds on what a config may hold (a larger one is corrupt_checkpoint): PEFT writes a few
# hundred bytes, and a rank_pattern with one key per module of a 100-layer model ~50 KB.
# Each key is a regular expression matched against every module (patterns.py), so their
# number bounds planning time as well as memory.
MAX_ADAPTER_CONFIG_BYTES = 4 * 1024 * 1024
MAX_CONFIG_PATTERNS = 4096  # keys of rank_pattern, and of alpha_pattern
PATTERN_MAPPINGS = ("rank_pattern", "alpha_pattern")

# Config flags that change what the adapter does to the weights, with why we refuse them.
REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude vector, so its delta is not B @ A",
    "lora_bias": "lora_bias trains a bias on lora_B, which a weight delta cannot express",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before lora_A, so its delta is not B @ A",
    "modules_to_save": "modules_to_save replaces whole modules (e.g. a classifier head) with trained copies",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) retrain embedding rows",
    "layer_replication": "layer_replication changes the model's layer structure",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies the delta only after its invocation tokens",
    "arrow_config": "Arrow routing (arrow_config) mixes adapters per token",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "kasa_config": "KaSA (kasa_config) is not a plain B @ A delta",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}
# Keys that do not change the delta once the adapter is trained (or that we read).
KNOWN_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
    "bias", "init_lora_weights", "lora_dropout", "inference_mode", "base_model_name_or_path",
    "revision", "auto_mapping", "peft_version", "megatron_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "ensure_weight_tying",
} | set(REFUSED_FLAGS)
# Initialisations after which the adapter is relative to rewritten (or quantized) base weights.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def is_adapter_dir(storage: Storage) -> bool:
    """Adapters are recognized by their config file (docs/DESIGN.md, "The spec": one spec format)."""
    return ADAPTER_CONFIG in storage.list_files()


@dataclass(frozen=True)
class LoraModule:
    key: str  # PEFT module name, e.g. model.layers.0.self_attn.q_proj
    a: TensorInfo  # lora_A: (r, in)
    b: TensorInfo  # lora_B: (out, r)
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool  # GPT-2 Conv1D: the base stores (in, out); the delta is (B @ A)^T (set by bind)

    @property
    def delta_shape(self) -> tuple[int, int]:
        """Shape of the delta as the base checkpoint stores the weight."""
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)


def peft_key_regex(key: str) -> str:
    """What PEFT matches a ``rank_pattern``/``alpha_pattern`` key as (``re.match``)."""
    return rf"(.*\.)?({key})$"


def pattern_key(patterns, module_key: str, matcher: Matcher | None = None) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to a module, as PEFT picks
    it (``peft.utils.other.get_pattern_key``): the first key ``k`` in order for which
    ``(.*\\.)?(k)$`` matches the module name from its start.

    ``patterns`` are compiled keys (``Pattern``, see ``AdapterReader``) or key strings,
    which go through the same guarded compile; keys come from an input file, so each match
    is time-bounded (``matcher``) like the spec's select patterns."""
    matcher = matcher or Matcher()
    for p in patterns:
        if not isinstance(p, Pattern):
            p = compile_pattern(p, "rank_pattern/alpha_pattern key", code="corrupt_checkpoint", wrap=peft_key_regex)
        if matcher.match(p, module_key, "module names"):
            return p.text
    return None


class AdapterReader:
    """One PEFT LoRA adapter: validated config and factors, mapped onto base tensor names."""

    is_adapter = True

    def __init__(self, storage: Storage, label: str, param: str | None = None, poll=None):
        self.storage = storage
        self.label = label  # "models[1] (s3://bucket/lora-a/)", for messages
        self.param = param
        self.poll = poll or StopPoll()  # cancel and time limit, asked while planning
        self.patterns: dict[str, list[Pattern]] = {}  # rank_pattern/alpha_pattern, compiled by _check_config
        self.files = set(storage.list_files())
        self.config = self._read_config()
        if ADAPTER_WEIGHTS not in self.files:
            pickled = sorted(f for f in self.files if f.startswith("adapter_model."))
            what = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
            raise MergeError("input_not_found", f"{label}: adapter has no {ADAPTER_WEIGHTS}{what}", param=param)
        raw = parse_header(storage, ADAPTER_WEIGHTS, poll=self.poll)
        # Full copies of adapted layers (PEFT saves them for lm_head/embeddings in case the
        # vocabulary was resized): module key -> tensor. See check_base_layers().
        self.base_layers: dict[str, TensorInfo] = {}
        self.modules: dict[str, LoraModule] = self._modules(raw)
        self.by_name: dict[str, LoraModule] = {}  # base tensor name -> module, set by bind()
        self.layer_copies: dict[str, TensorInfo] = {}  # base tensor name -> differing layer copy

    # ------------------------------------------------------------------ config

    def _refuse(self, what: str, module: str | None = None, code: str = "invalid_spec"):
        where = f" (module {module})" if module else ""
        raise MergeError(code, f"{self.label}: {what}{where}; drmerge merges plain LoRA adapters only", param=self.param)

    def _read_config(self) -> dict:
        size = self.storage.size(ADAPTER_CONFIG)
        if size > MAX_ADAPTER_CONFIG_BYTES:
            raise MergeError("corrupt_checkpoint", f"{self.label}: {ADAPTER_CONFIG} is {size} bytes, more than an "
                             f"adapter config can be ({MAX_ADAPTER_CONFIG_BYTES})", param=self.param)
        try:
            cfg = json.loads(bytes(self.storage.read_range(ADAPTER_CONFIG, 0, size)))  # the size checked
        except (ValueError, UnicodeDecodeError) as e:
            raise MergeError("corrupt_checkpoint", f"{self.label}: {ADAPTER_CONFIG} is not valid JSON ({e})",
                             param=self.param) from None
        if not isinstance(cfg, dict):
            raise MergeError("corrupt_checkpoint", f"{self.label}: {ADAPTER_CONFIG} is not a JSON object", param=self.param)
        return cfg

    def _config_number(self, key: str, value, integer: bool = False):
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or (integer and value <= 0):
            raise MergeError("corrupt_checkpoint",
                             f"{self.label}: {ADAPTER_CONFIG} {key} must be a {'positive integer' if integer else 'number'}, "
                             f"got {value!r}", param=self.param)
        return value

    def _check_config(self, first_module: str | None) -> None:
        cfg = self.config
        peft_type = cfg.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            self._refuse(f"peft_type {peft_type!r} is not LoRA")
        for key, why in REFUSED_FLAGS.items():
            if cfg.get(key):
                module = first_module
                if key == "modules_to_save":
                    module = ", ".join(map(str, cfg[key])) if isinstance(cfg[key], list) else str(cfg[key])
                self._refuse(why, module)
        for key, value in cfg.items():  # variants PEFT may add later are named use_* or *_config
            if key not in KNOWN_KEYS and value and (key.startswith("use_") or key.endswith("_config")):
                self._refuse(f"{ADAPTER_CONFIG} sets {key}={value!r}, an option drmerge does not know "
                             "and cannot prove harmless", first_module)
        bias = cfg.get("bias", "none")
        if bias != "none":
            self._refuse(f"bias={bias!r} trains the base model's biases as well", first_module)
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            self._refuse(f"init_lora_weights={init!r} makes the adapter relative to rewritten base weights; "
                         "convert it to a plain LoRA first (PEFT save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...))", first_module)
        items = []
        for key in PATTERN_MAPPINGS:
            patterns = cfg.get(key) or {}
            if not isinstance(patterns, dict):
                raise MergeError("corrupt_checkpoint", f"{self.label}: {ADAPTER_CONFIG} {key} must be a mapping",
                                 param=self.param)
            if len(patterns) > MAX_CONFIG_PATTERNS:
                raise MergeError("corrupt_checkpoint", f"{self.label}: {ADAPTER_CONFIG} {key} has {len(patterns)} "
                                 f"keys, more than an adapter config may have ({MAX_CONFIG_PATTERNS})", param=self.param)
            items += [(k, f"{self.label}: {ADAPTER_CONFIG} {key} key", self.param) for k in patterns]
        compiled = iter(compile_patterns(items, code="corrupt_checkpoint", source=f"{self.label}: {ADAPTER_CONFIG}",
                                         wrap=peft_key_regex, poll=self.poll))
        for key in PATTERN_MAPPINGS:  # in the config's order: the first matching key wins
            self.patterns[key] = [next(compiled) for _ in cfg.get(key) or {}]

    # ------------------------------------------------------------------ tensors

    def _modules(self, raw: dict[str, TensorInfo]) -> dict[str, LoraModule]:
        factors: dict[str, dict[str, TensorInfo]] = {}
        others = []
        for name, info in raw.items():
            self.poll()
            key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            if key.endswith(A_SUFFIX):
                factors.setdefault(key[:-len(A_SUFFIX)], {})["A"] = info
            elif key.endswith(B_SUFFIX):
                factors.setdefault(key[:-len(B_SUFFIX)], {})["B"] = info
            elif key.endswith(BASE_LAYER_SUFFIX) and ".lora_" not in key:
                self.base_layers[key[:-len(BASE_LAYER_SUFFIX)]] = info
            else:
                others.append(key)
        self._check_tensors(others)
        orphans = [k for k in self.base_layers if k not in factors]
        if orphans:  # a saved layer copy with no LoRA on it: nothing we can merge exactly
            self._refuse(f"tensor {orphans[0]}{BASE_LAYER_SUFFIX} is a full layer copy without LoRA factors",
                         orphans[0])
        self._check_config(next(iter(sorted(factors)), None))
        if not factors:
            raise MergeError("corrupt_checkpoint", f"{self.label}: {ADAPTER_WEIGHTS} holds no LoRA factors", param=self.param)
        cfg = self.config
        r_default = self._config_number("r", cfg.get("r", 8), integer=True)
        alpha_default = self._config_number("lora_alpha", cfg.get("lora_alpha", 8))
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))  # provisional; bind() orients each module
        matcher = Matcher(poll=self.poll)
        modules = {}
        for key in sorted(factors):
            self.poll()
            pair = factors[key]
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "B" not in pair else "lora_A"
                raise MergeError("corrupt_checkpoint", f"{self.label}: module {key} has no {missing}.weight", param=self.param)
            a, b = pair["A"], pair["B"]
            if len(a.shape) != 2 or len(b.shape) != 2:
                self._refuse(f"LoRA factors of shape {list(b.shape)} and {list(a.shape)} (convolution LoRA) "
                             "are not supported", key)
            if not (a.is_float and b.is_float):
                raise MergeError("corrupt_checkpoint", f"{self.label}: module {key} has non-float factors "
                                 f"({b.dtype}, {a.dtype})", param=self.param)
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise MergeError("corrupt_checkpoint", f"{self.label}: module {key}: lora_B {list(b.shape)} and "
                                 f"lora_A {list(a.shape)} disagree on the rank", param=self.param)
            rkey = pattern_key(self.patterns["rank_pattern"], key, matcher)
            akey = pattern_key(self.patterns["alpha_pattern"], key, matcher)
            r_config = self._config_number(f"rank_pattern[{rkey!r}]", rank_pattern[rkey], integer=True) \
                if rkey is not None else r_default
            if r_config != rank:
                raise MergeError("corrupt_checkpoint", f"{self.label}: module {key}: {ADAPTER_CONFIG} gives r={r_config}"
                                 f"{f' (rank_pattern {rkey!r})' if rkey is not None else ''} but its factors have rank "
                                 f"{rank}", param=self.param)
            alpha = self._config_number(f"alpha_pattern[{akey!r}]", alpha_pattern[akey]) \
                if akey is not None else alpha_default
            scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
            modules[key] = LoraModule(key, a, b, rank, float(alpha), float(scaling), fifo)
        return modules

    def _check_tensors(self, others: list[str]) -> None:
        """Refuse tensors that are not LoRA weight factors, most specific reason first."""
        for key in others:
            if "lora_magnitude_vector" in key:
                self._refuse(REFUSED_FLAGS["use_dora"], key.split(".lora_magnitude_vector")[0])
        for key in others:
            if "lora_embedding_" in key:
                self._refuse("embedding LoRA (lora_embedding_A/B) is not supported", key.split(".lora_embedding_")[0])
        for key in others:
            if ".lora_A." in key or ".lora_B." in key:
                self._refuse(f"tensor {key} is not a LoRA weight factor (LoRA biases are not supported)",
                             re.split(r"\.lora_[AB]\.", key)[0])
        mts = self.config.get("modules_to_save")
        if mts:
            self._refuse(REFUSED_FLAGS["modules_to_save"], ", ".join(map(str, mts)) if isinstance(mts, list) else str(mts))
        if others:
            self._refuse(f"tensor {others[0]} is not a LoRA factor (modules_to_save, trained biases and "
                         "trainable tokens are not supported)", others[0].rsplit(".", 1)[0])

    # ------------------------------------------------------------------ mapping onto the base

    def bind(self, base_shapes: dict[str, tuple[int, ...]] | None) -> None:
        """Map every module onto a base tensor name, orient it, and check its shape.

        With a base, a module ``k`` maps to ``k.weight`` if the base holds it, else to the
        one base weight whose name and ``k.weight`` differ only by leading components (a
        base saved without the task head's ``model.`` prefix, or with an extra one).
        Without a base (adapter output), names are the module names themselves.

        Orientation: like PEFT, which decides ``fan_in_fan_out`` per layer from its type
        (``nn.Linear`` stores out x in, GPT-2's ``Conv1D`` in x out), we follow the base
        shape; a square weight follows the adapter's other modules if any of them is
        transposed, else the config's ``fan_in_fan_out``.
        """
        named = {}
        for key, mod in self.modules.items():
            self.poll()
            name = key + ".weight"
            if base_shapes is not None:
                name = self._match(name, base_shapes)
            if name in named:
                raise MergeError("incompatible_checkpoints", f"{self.label}: modules {named[name].key} and {key} "
                                 f"both map onto base tensor {name}", param=self.param)
            named[name] = mod
        oriented = {}
        if base_shapes is not None:
            for name, mod in named.items():
                shape = tuple(base_shapes[name])
                out, inp = mod.b.shape[0], mod.a.shape[1]
                if shape not in ((out, inp), (inp, out)):
                    raise MergeError("incompatible_checkpoints",
                                     f"{self.label}: module {mod.key}: lora_B {list(mod.b.shape)} @ lora_A "
                                     f"{list(mod.a.shape)} gives a {out}x{inp} delta, but base tensor {name} is "
                                     f"{'x'.join(map(str, shape)) or 'a scalar'}", param=self.param)
                if out != inp:
                    oriented[name] = shape == (inp, out)
        square = any(oriented.values()) or bool(self.config.get("fan_in_fan_out", False))
        self.by_name = {name: replace(mod, fan_in_fan_out=oriented.get(name, square)) for name, mod in named.items()}
        self.layer_copies = {name: self.base_layers[mod.key] for name, mod in named.items() if mod.key in self.base_layers}

    def check_base_layers(self, base, require_unchanged: bool) -> None:
        """Resolve the full layer copies the adapter carries against the base.

        A copy identical to the base weight (the usual case: PEFT saves lm_head whenever it
        is adapted) adds nothing and is dropped, so the module stays low rank. A differing
        copy is what PEFT loads instead of the base weight, so the task's weight there is
        ``copy + scaling * B @ A``: the full output merges it densely; an adapter output
        cannot express it (``require_unchanged``) and refuses it, as it refuses a copy it
        cannot compare for lack of a base.
        """
        for name, info in list(self.layer_copies.items()):
            self.poll()
            module = self.by_name[name].key
            if base is None:
                if require_unchanged:
                    self._refuse(f"the adapter carries a full copy of {module} (PEFT save_embedding_layers), which "
                                 "an adapter output can only drop after checking it against base_model; give "
                                 "base_model, or re-save the adapter with save_embedding_layers=False", module)
                continue
            ref = base.tensors[name]
            if tuple(info.shape) != tuple(ref.shape):
                raise MergeError("incompatible_checkpoints", f"{self.label}: its copy of {module} is "
                                 f"{'x'.join(map(str, info.shape))}, base tensor {name} is "
                                 f"{'x'.join(map(str, ref.shape))} (was the vocabulary resized?)", param=self.param)
            same = info.dtype == ref.dtype and bytes(self.storage.read_range(info.file, info.start, info.length)) \
                == bytes(base.storage.read_range(ref.file, ref.start, ref.length))
            if same:
                del self.layer_copies[name]
            elif require_unchanged:
                self._refuse(f"its copy of {module} differs from the base (retrained or resized layer): an adapter "
                             "output cannot carry it; use output_format: full", module)

    def _match(self, name: str, base_shapes) -> str:
        if name in base_shapes:
            return name
        found = []
        for n in base_shapes:  # one scan per module the base lacks by its own name: poll as it goes
            self.poll()
            if n.endswith("." + name) or name.endswith("." + n):
                found.append(n)
        if len(found) == 1:
            return found[0]
        module = name[:-len(".weight")]
        if not found:
            raise MergeError("incompatible_checkpoints", f"{self.label}: module {module} matches no tensor of the "
                             f"base model (looked for {name})", param=self.param)
        raise MergeError("incompatible_checkpoints", f"{self.label}: module {module} matches several base tensors: "
                         f"{', '.join(sorted(found)[:5])}", param=self.param)

    # ------------------------------------------------------------------ reading

    def read(self, name: str) -> LowRank | torch.Tensor | None:
        """The delta of base tensor ``name`` as factors (scaling folded into the left one),
        ``None`` if this adapter leaves it alone, or the task's full weights (a tensor) where
        the adapter carries a layer copy that differs from the base."""
        mod = self.by_name.get(name)
        if mod is None:
            return None
        a, b = self._tensor(mod.a), self._tensor(mod.b)
        a, b = a.to(torch.float32), b.to(torch.float32)
        if mod.fan_in_fan_out:  # delta = (B @ A)^T = A^T @ B^T
            delta = LowRank(a.T * mod.scaling, b.T)
        else:
            delta = LowRank(b * mod.scaling, a)
        copy = self.layer_copies.get(name)
        if copy is not None:  # full weights, like a full fine-tune's: the layer copy plus the LoRA delta
            return self._tensor(copy).to(torch.float32) + delta.dense(torch.float32)
        return delta

    def _tensor(self, info: TensorInfo) -> torch.Tensor:
        buf = self.storage.read_range(info.file, info.start, info.length)
        dtype = DTYPES[info.dtype][0]
        if info.length == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def fingerprint(self) -> str:
        """What this adapter's deltas depend on (for resume): its config and where each
        factor lives in its file."""
        factors = [[m.key, m.a.start, m.a.length, m.a.dtype, m.b.start, m.b.length, m.b.dtype]
                   for m in self.modules.values()]
        copies = [[n, i.start, i.length, i.dtype] for n, i in sorted(self.layer_copies.items())]
        return json.dumps([self.storage.uri, self.config, factors, copies], sort_keys=True, default=str)

    def source(self, name: str) -> Source:
        """How ``read(name)`` gives this tensor (set by ``bind`` and ``check_base_layers``)."""
        if name not in self.by_name:
            return Source.ABSENT
        return Source.LAYER if name in self.layer_copies else Source.FACTORED

    def nbytes(self, name: str) -> int:
        mod = self.by_name.get(name)
        copy = self.layer_copies.get(name)
        return (0 if mod is None else mod.a.length + mod.b.length) + (0 if copy is None else copy.length)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def dtype(self) -> str:
        return next(iter(self.modules.values())).a.dtype


def bind_adapters(adapters: list[AdapterReader], base_shapes: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, int]]:
    """Bind every adapter to the base (or, without one, to each other) and return the
    shape of every adapted tensor; adapters that disagree on a module's shape are refused."""
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, AdapterReader] = {}
    for ad in adapters:
        ad.bind(base_shapes)
        for name, mod in ad.by_name.items():
            if name in shapes and shapes[name] != mod.delta_shape:
                raise MergeError("incompatible_checkpoints",
                                 f"{ad.label}: module {mod.key} has a {'x'.join(map(str, mod.delta_shape))} delta, but "
                                 f"{owner[name].label} adapts it as {'x'.join(map(str, shapes[name]))}", param=ad.param)
            shapes.setdefault(name, mod.delta_shape)
            owner.setdefault(name, ad)
    return shapes


# ---------------------------------------------------------------------------- planning


class AdapterReference:
    """Stands in for the base checkpoint when an adapter output is made without one:
    the tensors are the adapted modules' weights, with the shapes the adapters imply."""

    storage = None

    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: str):
        self.tensors = {name: TensorInfo(name, dtype, shape, "", 0, 0) for name, shape in sorted(shapes.items())}
        self.files: set[str] = set()

    def names(self) -> list[str]:
        return list(self.tensors)

    def small_files(self) -> list[str]:
        return []


def plan_with_adapters(spec, base, models: list, uris: list[str], poll=None):
    """Validate a spec whose inputs include adapters (or whose output is an adapter) and
    return ``(reference, plan)`` for ``inputs.Inputs``.

    Full output needs the base (the adapters' deltas are added to it); the full models
    among the inputs are checked against it as usual. Adapter output needs every input to
    be an adapter, and the base only for its shapes: without one, the adapters must agree
    with each other, and only the modules they adapt are planned.
    """
    adapters = [m for m in models if isinstance(m, AdapterReader)]
    if spec.output_format == "adapter":
        full = [i for i, m in enumerate(models) if not isinstance(m, AdapterReader)]
        if full:
            i = full[0]
            raise MergeError("invalid_spec", f"output_format 'adapter' needs every model to be a LoRA adapter, but "
                             f"models[{i}] ({uris[i]}) is a full checkpoint; use output_format 'full'",
                             param=f"models[{i}].model")
    elif base is None:
        raise MergeError("invalid_spec", f"merging LoRA adapters ({adapters[0].label}) into a full model needs "
                         "base_model: the adapters only hold deltas", param="base_model")
    if base is not None:
        bind_adapters(adapters, {n: i.shape for n, i in base.tensors.items()})
        reference = base
    else:
        shapes = bind_adapters(adapters, None)
    for ad in adapters:
        ad.check_base_layers(base, require_unchanged=spec.output_format == "adapter")
    if base is None:
        dtypes = {a.dtype for a in adapters}
        reference = AdapterReference(shapes, dtypes.pop() if len(dtypes) == 1 else "F32")
    plan = build_plan(spec, reference, base, models, uris, poll)
    kinds = {tp.name: tp.kind for tp in plan.tensors}
    for ad in adapters:
        ignored = [n for n in ad.by_name if kinds.get(n) == COPY]
        if ignored:
            plan.warnings.append(f"{ad.label} adapts {len(ignored)} tensor(s) that select.ignore (or a non-float "
                                 f"dtype) keeps at the base value; their deltas are not merged: {', '.join(ignored[:5])}")
    return reference, plan

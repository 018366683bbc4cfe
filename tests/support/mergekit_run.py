"""Real mergekit beside drmerge, on the same checkpoints: the harness the side-by-side
tests use (tests/unit/test_vs_mergekit.py).

A ``Case`` names a method and its parameters the way a mergekit config does (mergekit's
method and parameter names: what users bring). ``TRANSLATIONS`` turns a case into both
tools' inputs: the mergekit config as written, and the drmerge spec that must give the
same tensors. A parameter a translation does not know, or a value it cannot express in
drmerge's spec, is an error here, never dropped: adding a method (or a parameter) to the
comparison means adding its translation.

mergekit runs in-process (``mergekit.merge.run_merge`` on the CPU, safetensors inputs, no
lazy unpickling, no tokenizer, no model card): ~0.1 s a merge, against ~15 s for a
``mergekit-yaml`` subprocess that imports torch and transformers again. Its loader cache is
a process-wide singleton keyed by path; ``run_mergekit`` drops the entries it created, so a
later run over a rewritten path reads the new files. Every input is a local folder that
exists, so mergekit never looks anything up on the Hugging Face hub (``HF_HUB_OFFLINE`` is
set as well, for when this module is imported before huggingface_hub).

Inputs are continuous random perturbations: mergekit keeps its top-k with an unstable
``argsort``, so entries of equal magnitude at the cut would be kept arbitrarily (drmerge
keeps the lowest index); random float32 deltas have no such ties.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Family:
    """A base checkpoint and fine-tune-like perturbations of it (local folders)."""
    base: str
    models: tuple[str, ...]


def tiny_llama_family(root: str, n_models: int = 3, seed: int = 0, relative_delta: float = 0.1) -> Family:
    """A random-init ``LlamaForCausalLM`` (float32, safetensors) and ``n_models`` copies of
    it, each tensor moved by ``relative_delta`` times its RMS times standard normal noise.

    Deltas proportional to each tensor's size keep the float32 rounding of every output
    (a norm weight of 1.0 holds a delta of 0.01 to only ~1e-5 of it) far below the 1e-5
    the comparison allows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA)
    base = LlamaForCausalLM(config)
    base_dir = os.path.join(root, "base")
    base.save_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed + 1)
    paths = []
    for i in range(n_models):
        state = {}
        for name, value in base.state_dict().items():
            rms = value.double().pow(2).mean().sqrt().float()
            state[name] = value + relative_delta * rms * torch.randn(value.shape, generator=g)
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        paths.append(os.path.join(root, f"ft{i}"))
        model.save_pretrained(paths[-1])
    return Family(base_dir, tuple(paths))


def opposed_pair_family(root: str, weights: tuple[float, float] = (1.0, 0.5), seed: int = 0) -> Family:
    """Two fine-tunes whose *weighted* deltas cancel exactly on the first half of every
    tensor (a weighted sum of exactly zero, where the elected sign is a convention) and add
    up negative on the rest (so a tensor-wide fallback would be -1).

    Every value lies on a dyadic grid (base rounded to 2^-16, deltas multiples of 2^-12,
    ``weights[0] / weights[1]`` a power of two), so every product and sum either tool forms
    is exact in float32. Its magnitudes repeat: use it without trimming (density 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ratio = weights[0] / weights[1]
    if ratio <= 0 or 2.0 ** round(torch.log2(torch.tensor(ratio)).item()) != ratio:
        raise ValueError("weights[0] / weights[1] must be a positive power of two")
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA)
    base = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed + 1)
    states: tuple[dict, dict, dict] = ({}, {}, {})
    for name, value in base.state_dict().items():
        w0 = torch.round(value * 2**16) / 2**16
        d = torch.randint(1, 257, value.shape, generator=g).float() * 2**-12
        d = d * torch.where(torch.rand(value.shape, generator=g) < 0.5, -1.0, 1.0)
        e = -ratio * d  # w_a d + w_b e = 0
        rest = e.reshape(-1)[e.numel() // 2:]
        rest.copy_(-2 * ratio * d.reshape(-1)[d.numel() // 2:].abs())  # w_a d + w_b e < 0
        for state, t in zip(states, (w0, w0 + d, w0 + e)):
            state[name] = t
    paths = []
    for state, name in zip(states, ("base", "ft0", "ft1")):
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        paths.append(os.path.join(root, name))
        model.save_pretrained(paths[-1])
    return Family(paths[0], tuple(paths[1:]))


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One merge in mergekit's terms. ``weights``: one per model; ``parameters``: the
    config's top-level ``parameters``; ``model_parameters``: per-model ``parameters`` other
    than ``weight`` (a mapping applied to every model, or a list of mappings, one per model);
    ``with_base``: whether the config names ``base_model``."""
    method: str
    weights: tuple[float, ...]
    parameters: dict = field(default_factory=dict)
    model_parameters: dict | tuple[dict, ...] = field(default_factory=dict)
    with_base: bool = True

    def per_model(self) -> list[dict]:
        if isinstance(self.model_parameters, dict):
            return [dict(self.model_parameters) for _ in self.weights]
        if len(self.model_parameters) != len(self.weights):
            raise ValueError("model_parameters needs one mapping per model")
        return [dict(p) for p in self.model_parameters]


class Untranslatable(ValueError):
    """The case uses a parameter (or value) the translation cannot give drmerge."""


@dataclass(frozen=True)
class Translation:
    """How one mergekit method maps onto drmerge.

    ``shared`` / ``per_model``: the parameters the translation understands, with mergekit's
    defaults. ``to_drmerge(shared, uniform_per_model, n_models)`` returns drmerge's
    ``(method, parameters)``. ``mergekit_base``: whether mergekit's config gets the case's
    base model (mergekit's linear has none: a base there would be one more input)."""
    drmerge_method: str
    shared: dict
    per_model: dict
    to_drmerge: Callable[[dict, dict, int], dict]
    mergekit_base: bool = True

    def resolve(self, case: Case) -> tuple[dict, dict]:
        """mergekit's effective shared and (uniform) per-model parameters of ``case``."""
        unknown = set(case.parameters) - set(self.shared)
        if unknown:
            raise Untranslatable(f"{case.method}: parameter(s) {sorted(unknown)} not translated")
        per = case.per_model()
        for p in per:
            unknown = set(p) - set(self.per_model)
            if unknown:
                raise Untranslatable(f"{case.method}: per-model parameter(s) {sorted(unknown)} not translated")
        effective = [dict(self.per_model, **p) for p in per]
        if any(e != effective[0] for e in effective):
            raise Untranslatable(f"{case.method}: per-model values differ ({effective}); drmerge's spec takes "
                                 "only weight per model so far")
        return dict(self.shared, **case.parameters), effective[0] if effective else dict(self.per_model)


def _fixed(name: str, value, got) -> None:
    if got != value:
        raise Untranslatable(f"{name}={got!r} has no drmerge equivalent yet (only {value!r})")


def _ties(shared: dict, per: dict, n: int) -> dict:
    _fixed("rescale", False, shared["rescale"])
    _fixed("int8_mask", False, shared["int8_mask"])
    params = {"density": per["density"], "sign_election": True, "scale": shared["lambda"]}
    if shared["normalize"]:  # divide by the sum of the kept weights: drmerge's disjoint_mean
        params["disjoint_mean"] = True
    else:  # mergekit's plain sum; drmerge's disjoint_mean: false divides it by T
        params.update(disjoint_mean=False, scale=shared["lambda"] * n)
    return params


def _task_arithmetic(shared: dict, per: dict, n: int) -> dict:
    _fixed("rescale", False, shared["rescale"])
    _fixed("int8_mask", False, shared["int8_mask"])
    _fixed("normalize", False, shared["normalize"])
    _fixed("density", 1.0, per["density"])  # mergekit ignores it for task_arithmetic; we do not pretend
    return {"scale": shared["lambda"]}


def _linear(shared: dict, per: dict, n: int) -> dict:
    _fixed("normalize", True, shared["normalize"])
    return {}


_GTA_SHARED = {"lambda": 1.0, "rescale": False, "int8_mask": False}

TRANSLATIONS: dict[str, Translation] = {
    "ties": Translation("ties", dict(_GTA_SHARED, normalize=True), {"density": 1.0}, _ties),
    "task_arithmetic": Translation("task_arithmetic", dict(_GTA_SHARED, normalize=False), {"density": 1.0},
                                   _task_arithmetic),
    "linear": Translation("linear", {"normalize": True}, {}, _linear, mergekit_base=False),
}


def mergekit_config(case: Case, family: Family) -> dict:
    """The mergekit YAML (as a mapping) of ``case``, float32 arithmetic and output."""
    tr = TRANSLATIONS[case.method]
    tr.resolve(case)  # refuse what the drmerge side could not express
    models = family.models[:len(case.weights)]
    cfg = {"merge_method": case.method, "dtype": "float32",
           "models": [{"model": m, "parameters": dict(p, weight=w)}
                      for m, w, p in zip(models, case.weights, case.per_model())]}
    if case.parameters:
        cfg["parameters"] = dict(case.parameters)
    if case.with_base and tr.mergekit_base:
        cfg["base_model"] = family.base
    return cfg


def drmerge_spec(case: Case, family: Family, output: str) -> dict:
    """The drmerge spec that must merge ``case`` to mergekit's tensors."""
    tr = TRANSLATIONS[case.method]
    shared, per = tr.resolve(case)
    spec = {"method": tr.drmerge_method, "output": output,
            "models": [{"model": m, "weight": w} for m, w in zip(family.models, case.weights)],
            "parameters": tr.to_drmerge(shared, per, len(case.weights))}
    if case.with_base:
        spec["base_model"] = family.base
    return spec


# ---------------------------------------------------------------------------- running


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def run_mergekit(config: dict, output: str) -> dict[str, torch.Tensor]:
    """Run mergekit 0.1.5 in this process on the CPU and return the merged tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = MergeConfiguration.model_validate(config)
    refs = list(merge_config.referenced_models())
    for ref in refs:
        if not os.path.isdir(ref.model.path):  # a missing path would be looked up on the hub
            raise FileNotFoundError(f"mergekit input {ref.model.path} is not a local folder")
    cache = LoaderCache()
    before = set(cache.loaders)
    try:
        run_merge(merge_config, output, MergeOptions(device="cpu", quiet=True, lazy_unpickle=False,
                                                     copy_tokenizer=False, write_model_card=False))
    finally:
        for ref in set(cache.loaders) - before:
            cache.loaders.pop(ref).flush()
    return load_tensors(output)


def run_drmerge(spec: dict) -> dict[str, torch.Tensor]:
    import drmerge

    drmerge.merge(spec, device="cpu")
    return load_tensors(spec["output"])


@dataclass
class Comparison:
    """Per tensor: ``||drmerge - mergekit|| / ||mergekit - base||`` (the relative error of
    the merged delta, float64), and the norm of mergekit's delta (a zero delta would make
    the comparison vacuous)."""
    errors: dict[str, float]
    delta_norms: dict[str, float]

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.errors, key=self.errors.get)
        return name, self.errors[name]


def compare(case: Case, family: Family, workdir: str) -> Comparison:
    """Merge ``case`` with both tools into ``workdir`` and compare every output tensor.
    The tensor names of the two outputs must be the same."""
    mk = run_mergekit(mergekit_config(case, family), os.path.join(workdir, "mergekit"))
    dr = run_drmerge(drmerge_spec(case, family, os.path.join(workdir, "drmerge")))
    if mk.keys() != dr.keys():
        raise AssertionError(f"tensor names differ: only mergekit {sorted(mk.keys() - dr.keys())}, "
                             f"only drmerge {sorted(dr.keys() - mk.keys())}")
    base = load_tensors(family.base)
    errors, norms = {}, {}
    for name, want in mk.items():
        ref = base[name].double()
        delta = want.double() - ref
        norm = float(delta.norm())
        errors[name] = float((dr[name].double() - want.double()).norm()) / (norm if norm > 0 else 1.0)
        norms[name] = norm
    return Comparison(errors, norms)

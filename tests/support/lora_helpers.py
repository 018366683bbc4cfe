"""Tiny models and real PEFT adapters for the LoRA tests (random init, saved to disk)."""

from __future__ import annotations

import json
import os

import torch

TINY_LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


def make_base(path: str, seed: int = 0, kind: str = "llama"):
    """A random tiny causal LM saved as model.safetensors + config.json."""
    quiet()
    torch.manual_seed(seed)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(path)
    return path


def load_model(path: str):
    from transformers import AutoModelForCausalLM

    quiet()
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


def make_adapter(base_dir: str, path: str, seed: int, scale: float = 0.05, **lora_kwargs) -> str:
    """A PEFT LoRA adapter on the base with random non-zero A and B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(base_dir), LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(path)
    return path


def peft_merged_state(base_dir: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    """PEFT's own merge of one adapter into the base (the reference for our reading)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_dir), adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_deltas(base_dir: str, adapter_dirs: list[str]) -> dict[str, list[torch.Tensor]]:
    """Materialised per-adapter deltas, computed by PEFT (float64)."""
    base = {k: v.double() for k, v in load_model(base_dir).state_dict().items()}
    per = [peft_merged_state(base_dir, a) for a in adapter_dirs]
    return {k: [p[k].double() - base[k] for p in per] for k in base}


def make_full_finetune(base_dir: str, path: str, seed: int, scale: float = 0.01, only: str = "") -> str:
    """A 'full fine-tune': every float tensor (matching ``only``) perturbed."""
    model = load_model(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(path)
    return path


def state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def edit_config(adapter_dir: str, **changes) -> None:
    p = os.path.join(adapter_dir, "adapter_config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


def engine_deltas(base_dir: str, adapter_dirs: list[str], dtype=torch.float64) -> dict[str, list[torch.Tensor]]:
    """Per-adapter deltas from drmerge's own reading (checked against PEFT's merge in
    test_lora_adapters), materialised as ``left @ right`` in ``dtype``.

    Merge tests compare against these rather than PEFT's float32 merge: DRM's pruning
    and sign election are discontinuous, so a 1e-7 difference in an input can flip an
    entry and move the result by ~1e-3 (docs/DESIGN.md, "Precision of the decomposition").
    """
    from drmerge.adapters import AdapterReader, bind_adapters
    from drmerge.checkpoint import CheckpointReader
    from drmerge.storage import LocalStorage

    ref = CheckpointReader(LocalStorage(base_dir))
    readers = [AdapterReader(LocalStorage(a), a) for a in adapter_dirs]
    bind_adapters(readers, {n: i.shape for n, i in ref.tensors.items()})
    for r in readers:
        r.check_base_layers(ref, require_unchanged=False)
    out = {}
    for name, info in ref.tensors.items():
        out[name] = []
        for r in readers:
            f = r.read(name)
            if f is None:
                out[name].append(torch.zeros(info.shape, dtype=dtype))
            elif isinstance(f, torch.Tensor):  # full weights (a differing layer copy + delta)
                out[name].append(f.to(dtype) - ref.read(name).to(dtype))
            else:
                out[name].append(f.left.to(dtype) @ f.right.to(dtype))
    return out

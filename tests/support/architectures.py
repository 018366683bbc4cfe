"""Tiny real transformers models of the architectures with fused projections (random init,
saved with save_pretrained), fine-tune-like perturbations of them, and, independently of
drmerge, the rows of the linear map (out x in) that each fused projection's parts occupy:
read off transformers' own split functions where it has one (Falcon, BLOOM: fed the row
numbers themselves), else written from its forward code (GPT-2, GPT-NeoX, Phi-3)."""

from __future__ import annotations

import os

import numpy as np
import torch

ARCHS = ("gpt2", "falcon_new", "falcon_mq", "falcon_mha", "bloom", "gpt_neox", "phi3")


def tiny_config(arch: str):
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                             eos_token_id=0)
    if arch.startswith("falcon"):
        kw = {"falcon_new": dict(new_decoder_architecture=True, num_kv_heads=2, bias=True),
              "falcon_mq": dict(multi_query=True), "falcon_mha": dict(multi_query=False)}[arch]
        return tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **kw)
    if arch == "bloom":
        return tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)
    if arch == "phi3":
        return tf.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                             bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def make_arch_family(root: str, arch: str, n_models: int = 3, seed: int = 0) -> tuple[str, list[str]]:
    """A base and ``n_models`` fine-tunes (matrices: low-rank + noise deltas; vectors: noise)."""
    from transformers import AutoModelForCausalLM

    from tests.support.lora_helpers import quiet

    quiet()
    torch.manual_seed(seed)
    config = tiny_config(arch)
    base = AutoModelForCausalLM.from_config(config)
    base_path = os.path.join(root, "base")
    base.save_pretrained(base_path)
    g = torch.Generator().manual_seed(seed + 1)
    paths = []
    for i in range(n_models):
        state = {}
        for name, value in base.state_dict().items():
            if value.dim() == 2:
                low = torch.randn(value.shape[0], 3, generator=g) @ torch.randn(3, value.shape[1], generator=g)
                state[name] = value + 0.02 * low + 0.004 * torch.randn(value.shape, generator=g)
            else:
                state[name] = value + 0.01 * torch.randn(value.shape, generator=g)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state, strict=False)
        path = os.path.join(root, f"ft{i}")
        model.save_pretrained(path)
        paths.append(path)
    return base_path, paths


def _probe(split, rows: int) -> list[list[int]]:
    """The row numbers each output of ``split`` holds when fed the fused output 0..rows-1."""
    fused = torch.arange(rows, dtype=torch.float32).reshape(1, 1, rows)
    return [sorted(set(int(v) for v in part.reshape(-1).tolist())) for part in split(fused)]


def fused_rows(arch: str) -> dict[str, dict[str, list[int]]]:
    """Layer-0 fused tensor (name suffix) -> part -> rows of the linear map, per transformers."""
    config = tiny_config(arch)
    hidden, nh = config.hidden_size, config.num_attention_heads
    hd = hidden // nh
    if arch == "gpt2":  # GPT2Attention: c_attn(x).split(split_size=hidden, dim=2) -> q, k, v
        return {"h.0.attn.c_attn.weight": {p: list(range(i * hidden, (i + 1) * hidden))
                                           for i, p in enumerate("qkv")}}
    if arch.startswith("falcon"):
        from transformers.models.falcon.modeling_falcon import FalconAttention

        att = FalconAttention(config, layer_idx=0)
        q, k, v = _probe(att._split_heads, att.query_key_value.weight.shape[0])
        return {"h.0.self_attention.query_key_value.weight": {"q": q, "k": k, "v": v}}
    if arch == "bloom":
        from transformers.models.bloom.modeling_bloom import BloomAttention

        att = BloomAttention(config, layer_idx=0)
        q, k, v = _probe(att._reshape, 3 * hidden)
        return {"h.0.self_attention.query_key_value.weight": {"q": q, "k": k, "v": v}}
    if arch == "gpt_neox":  # GPTNeoXAttention: view(..., -1, 3 * head_size).chunk(3, dim=-1)
        return {"layers.0.attention.query_key_value.weight": {
            p: [h * 3 * hd + i * hd + j for h in range(nh) for j in range(hd)] for i, p in enumerate("qkv")}}
    if arch == "phi3":  # Phi3Attention slices q, k, v; Phi3MLP: gate, up = gate_up_proj(x).chunk(2)
        nkv = config.num_key_value_heads
        q, kv, inter = nh * hd, nkv * hd, config.intermediate_size
        return {"layers.0.self_attn.qkv_proj.weight": {"q": list(range(q)), "k": list(range(q, q + kv)),
                                                       "v": list(range(q + kv, q + 2 * kv))},
                "layers.0.mlp.gate_up_proj.weight": {"gate": list(range(inter)), "up": list(range(inter, 2 * inter))}}
    raise ValueError(arch)


def rows_for(arch: str, name: str) -> dict[str, list[int]] | None:
    """The parts of any layer's fused tensor ``name`` (every layer has layer 0's layout)."""
    import re

    generic = re.sub(r"\.(\d+)\.", ".0.", name)
    for suffix, parts in fused_rows(arch).items():
        if generic.endswith(suffix):
            return parts
    return None


CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_conv1d(arch: str, name: str) -> bool:
    """GPT-2's Conv1D weights (stored in x out); checked against the modules in the tests."""
    return arch == "gpt2" and name.endswith(CONV1D_SUFFIXES)


def load_np(path: str) -> dict[str, np.ndarray]:
    from tests.support.factories import load_tensors

    return {k: v.numpy() for k, v in load_tensors(path).items()}

"""Real checkpoints for tests: tiny transformers models saved with save_pretrained, and
perturbed copies that stand in for fine-tunes (low-rank + noise deltas)."""

from __future__ import annotations

import json
import os
import struct

import torch


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=32, type_vocab_size=2)


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def save_model(model, path: str, shard_size: str | None = None, dtype: torch.dtype | None = None) -> str:
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_family(root: str, n_models: int = 3, arch: str = "bert", dtype: torch.dtype | None = None,
                shard_size: str | None = None, seed: int = 0) -> tuple[str, list[str]]:
    """A base checkpoint and ``n_models`` fine-tune-like perturbations of it."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = tiny_bert_config() if arch == "bert" else tiny_llama_config()
    base = AutoModel.from_config(config)
    base_path = save_model(base, os.path.join(root, "base"), shard_size, dtype)
    paths = []
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n_models):
        state = {}
        for name, value in base.state_dict().items():
            if value.is_floating_point():
                if value.dim() >= 2:
                    n, m = value.shape[0], value[0].numel()
                    low = torch.randn(n, 2, generator=g) @ torch.randn(2, m, generator=g)
                    delta = (0.02 * low + 0.002 * torch.randn(n, m, generator=g)).reshape(value.shape)
                else:
                    delta = 0.01 * torch.randn(value.shape, generator=g)
                state[name] = value + delta
            else:
                state[name] = value.clone()
        model = AutoModel.from_config(config)
        model.load_state_dict(state)
        paths.append(save_model(model, os.path.join(root, f"ft{i}"), shard_size, dtype))
    return base_path, paths


def write_raw_safetensors(path: str, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> str:
    """Write a safetensors-like file byte for byte, malformed on purpose when asked."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)
    return path


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dir (single or sharded) via the safetensors library."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out

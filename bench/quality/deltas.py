"""How big the task vectors are and how much they overlap: the reason merging is hard.

For every fine-tune (a full checkpoint or a LoRA adapter, whose delta is
``alpha / r * B @ A``) against the pretrained base, over the transformer's weight
matrices (``encoder.layer.*.weight``, 2-D; the frozen embeddings have no delta):

- ``relative_norm[t]`` = ||W_t - W0|| / ||W0|| (Frobenius over all those matrices);
- ``cosine[a][b]`` between the flattened task vectors;
- the same two per matrix kind (query, key, value, attention output, FFN in, FFN out).

One tensor is read at a time from every checkpoint, in float64, so memory stays at a few
matrices whatever the number of tasks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

MATRIX = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.weight")
KINDS = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attn_out", "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}


class _Full:
    def __init__(self, path: Path):
        self.f = safe_open(str(path / "model.safetensors"), "pt")

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.f.get_tensor(name).double() - base


class _Lora:
    def __init__(self, path: Path):
        cfg = json.loads((path / "adapter_config.json").read_text())
        if cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError(f"{path}: only plain LoRA (one r and alpha) is measured here")
        self.scaling = cfg["lora_alpha"] / cfg["r"]
        self.f = safe_open(str(path / "adapter_model.safetensors"), "pt")
        self.keys = set(self.f.keys())

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        stem = "base_model.model." + name[: -len(".weight")]
        a, b = stem + ".lora_A.weight", stem + ".lora_B.weight"
        if a not in self.keys:
            return torch.zeros_like(base)
        return self.scaling * (self.f.get_tensor(b).double() @ self.f.get_tensor(a).double())


def _reader(path: Path):
    return _Lora(path) if (path / "adapter_config.json").is_file() else _Full(path)


def _summary(gram: dict[tuple[str, str], float], w0_sq: float, tasks: list[str]) -> dict:
    """Norms and cosines from the upper triangle of the task vectors' Gram matrix."""
    dot = lambda a, b: gram[(a, b)] if (a, b) in gram else gram[(b, a)]  # noqa: E731
    sq = {t: dot(t, t) for t in tasks}
    return {"relative_norm": {t: math.sqrt(sq[t] / w0_sq) if w0_sq else 0.0 for t in tasks},
            "cosine": {a: {b: dot(a, b) / math.sqrt(sq[a] * sq[b]) if sq[a] and sq[b] else 0.0 for b in tasks}
                       for a in tasks}}


def delta_stats(base_dir: Path, ft_dirs: dict[str, Path]) -> dict:
    tasks = list(ft_dirs)
    readers = {t: _reader(Path(p)) for t, p in ft_dirs.items()}
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i:]]
    gram = dict.fromkeys(pairs, 0.0)
    kind_gram = {k: dict.fromkeys(pairs, 0.0) for k in KINDS.values()}
    w0, kind_w0 = 0.0, dict.fromkeys(KINDS.values(), 0.0)
    with safe_open(str(Path(base_dir) / "model.safetensors"), "pt") as f:
        names = [n for n in f.keys() if MATRIX.fullmatch(n) and len(f.get_slice(n).get_shape()) == 2]
        for name in names:
            base = f.get_tensor(name).double()
            kind = KINDS.get(MATRIX.fullmatch(name).group(2))
            flat = {t: readers[t].delta(name, base).flatten() for t in tasks}
            b2 = float(base.pow(2).sum())
            w0 += b2
            for a, b in pairs:
                dot = float(flat[a] @ flat[b])
                gram[(a, b)] += dot
                if kind:
                    kind_gram[kind][(a, b)] += dot
            if kind:
                kind_w0[kind] += b2
    out = _summary(gram, w0, tasks)
    out["per_kind"] = {k: _summary(kind_gram[k], kind_w0[k], tasks) for k in KINDS.values()}
    off = [out["cosine"][a][b] for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    out["cosine_offdiag"] = {"min": min(off), "max": max(off), "mean": sum(off) / len(off)} if off else {}
    out["matrices"] = len(names)
    return out

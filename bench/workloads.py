"""Bench workloads, generated locally (no downloads) under bench/_work/ (git-ignored).

- w1: BERT-base-shaped (12 layers, hidden 768, FFN 3072), base + 6 fine-tunes, float32.
- w2: a real Llama-architecture checkpoint made with transformers (hidden 1024, FFN 4096,
  16 layers, vocab 32000), bfloat16, sharded at 200 MB, base + 4 fine-tunes.
- big: w2's architecture in float32 (1.34 GB per checkpoint), base + 4 fine-tunes, for the
  "4 models of >= 1 GB under 1.5 GB peak RSS" check of issue #2.

Fine-tunes are ``base + delta`` with deltas from bench.synth (low-rank structure plus
noise). Each workload directory holds a ``manifest.json`` written last; an existing,
complete workload is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

from .synth import task_delta

WORK = os.environ.get("BENCH_WORK") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work")

SPECS = {
    "w1": dict(arch="bert", tasks=6, dtype="float32", scale=1e-3, shard=None),
    "w2": dict(arch="llama", tasks=4, dtype="bfloat16", scale=1e-3, shard="200MB"),
    "big": dict(arch="llama", tasks=4, dtype="float32", scale=1e-3, shard="2GB"),
}


def _model(arch: str, dtype: torch.dtype, layers: int | None = None):
    import transformers

    torch.manual_seed(0)
    if arch == "bert":
        cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=layers or 12, num_attention_heads=12,
                                      intermediate_size=3072, vocab_size=30522)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers or 16,
                                       num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                       tie_word_embeddings=False, max_position_embeddings=2048)
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def _save(model, state: dict, path: str, shard: str | None) -> None:
    model.load_state_dict(state, strict=True)
    kw = {"max_shard_size": shard} if shard else {"max_shard_size": "5GB"}
    model.save_pretrained(path, safe_serialization=True, **kw)


def build(name: str, layers: int | None = None, root: str = WORK, log=print) -> dict:
    """Generate workload ``name`` (if not already there) and return its manifest."""
    spec = dict(SPECS[name])
    tag = name if layers is None else f"{name}-l{layers}"
    top = os.path.join(root, tag)
    manifest_path = os.path.join(top, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)
    shutil.rmtree(top, ignore_errors=True)
    os.makedirs(top)
    t0 = time.perf_counter()
    dtype = getattr(torch, spec["dtype"])
    model = _model(spec["arch"], dtype, layers)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _save(model, base, os.path.join(top, "base"), spec["shard"])
    names = sorted(base)
    models = []
    for t in range(spec["tasks"]):
        state = {}
        for i, k in enumerate(names):
            w0 = base[k]
            if not w0.is_floating_point():
                state[k] = w0
                continue
            d = task_delta(tuple(w0.shape), seed=i + 1, task=t, scale=spec["scale"])
            state[k] = (w0.float() + d).to(dtype)
        path = os.path.join(top, f"ft{t}")
        _save(model, state, path, spec["shard"])
        models.append(path)
        log(f"  {tag}: fine-tune {t + 1}/{spec['tasks']} written ({time.perf_counter() - t0:.0f}s)")
    sizes = {p: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p)) for p in [os.path.join(top, "base")] + models}
    manifest = {"name": tag, **spec, "layers": layers, "base": os.path.join(top, "base"), "models": models,
                "bytes_per_model": max(sizes.values()), "generated_s": round(time.perf_counter() - t0, 1)}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest

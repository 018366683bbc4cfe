"""GPU end-to-end: generate a Llama-3.1-8B-shaped set (hidden 4096, FFN 14336, 8 of the 32
layers, vocab 128256, base + 5 fine-tunes, bf16, synthetic) on this machine and merge it
with DRM on one CUDA device, printing per-stage times, GPU memory and the extrapolated
time for all 32 layers. One command, no network:

    python -m bench.gpu                      # the real thing (needs CUDA; ~34 GB of disk)
    python -m bench.gpu --small --device cpu # same code path, tiny shapes, proves it runs

Checkpoints are written as HF-style sharded safetensors (config.json + index), the way
real fine-tunes arrive; the merge goes through drmerge.pipeline.run_merge like any job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import save_file

FULL = dict(hidden=4096, ffn=14336, layers=8, total_layers=32, vocab=128256, heads=32, kv_heads=8, tasks=5)
SMALL = dict(hidden=256, ffn=896, layers=2, total_layers=32, vocab=2048, heads=8, kv_heads=2, tasks=5)


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, f, kv = c["hidden"], c["ffn"], c["hidden"] // c["heads"] * c["kv_heads"]
    out = {"model.embed_tokens.weight": (c["vocab"], h)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (c["vocab"], h)})
    return out


def synth(shape, seed: int, task: int | None, dev) -> torch.Tensor:
    """Base weights (task None) or a fine-tune's delta: shared + task low-rank + noise."""
    g = torch.Generator(device=dev).manual_seed(seed * 131 + (task if task is not None else 999))
    if task is None:
        return (torch.ones(shape, device=dev) if len(shape) == 1 else torch.randn(shape, generator=g, device=dev) * 0.02)
    if len(shape) == 1:
        return torch.randn(shape, generator=g, device=dev) * 1e-3
    n, m = shape
    gs = torch.Generator(device=dev).manual_seed(seed)
    shared = torch.randn(n, 8, generator=gs, device=dev) @ torch.randn(8, m, generator=gs, device=dev)
    own = torch.randn(n, 32, generator=g, device=dev) @ torch.randn(32, m, generator=g, device=dev)
    d = shared * (0.5 + task / 5) + own + torch.randn(n, m, generator=g, device=dev) * 2.0
    return d * (1e-3 / d.std())


def write_checkpoint(path: str, c: dict, task: int | None, dev, shard_bytes: int = 5 * 10**9) -> None:
    os.makedirs(path, exist_ok=True)
    names = shapes(c)
    shards, cur, size = [], {}, 0
    for i, (name, shape) in enumerate(names.items()):
        w = synth(shape, i + 1, None, dev)
        if task is not None:
            w = w + synth(shape, i + 1, task, dev)
        t = w.to(torch.bfloat16).cpu()
        if cur and size + t.numel() * 2 > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c["hidden"],
           "intermediate_size": c["ffn"], "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
           "num_key_value_heads": c["kv_heads"], "vocab_size": c["vocab"], "torch_dtype": "bfloat16",
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def main(argv=None) -> None:
    from drmerge.pipeline import run_merge
    from drmerge.spec import parse_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test of the same code path)")
    ap.add_argument("--layers", type=int, help="layers to generate (default 8, or 2 with --small)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work", "gpu"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    a = ap.parse_args(argv)
    c = dict(SMALL if a.small else FULL)
    if a.layers:
        c["layers"] = a.layers
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --small --device cpu to check the code path")
    shutil.rmtree(a.dir, ignore_errors=True)
    t0 = time.perf_counter()
    paths = [os.path.join(a.dir, "base")] + [os.path.join(a.dir, f"ft{t}") for t in range(c["tasks"])]
    for t, p in enumerate(paths):
        write_checkpoint(p, c, None if t == 0 else t - 1, dev)
    gen_s = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(p, f)) for p in paths for f in os.listdir(p))
    print(f"generate: {gen_s:.1f}s, {len(paths)} checkpoints, {disk / 1e9:.1f} GB on disk", flush=True)
    spec = parse_spec({"base_model": paths[0], "models": [{"model": p} for p in paths[1:]], "method": "drm",
                       "parameters": {"direction": "vertical"}, "output": os.path.join(a.dir, "merged"),
                       "overwrite": True})
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r = run_merge(spec, device=a.device)
    t = r.timings
    print(f"merge: {r.seconds:.1f}s on {r.device}  (read wait {t['read_wait_s']:.1f}s, compute {t['compute_s']:.1f}s, "
          f"write {t['write_s']:.1f}s; {r.bytes_read / 1e9:.1f} GB read, {r.bytes_written / 1e9:.1f} GB written)")
    if dev.type == "cuda":
        print(f"GPU memory: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
              f"peak reserved {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB of "
              f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    per_layer = r.seconds / c["layers"]  # embeddings/head are cheap next to the layers' DRM
    print(f"total (generate + merge): {gen_s + r.seconds:.1f}s (target < 480 s for the full set)")
    print(f"extrapolated merge time for {c['total_layers']} layers: {per_layer * c['total_layers']:.0f}s")
    print(json.dumps({"config": c, "generate_s": round(gen_s, 1), "merge_s": round(r.seconds, 1), "timings": t,
                      "device": r.device, "extrapolated_32_layers_s": round(per_layer * c["total_layers"], 1)}))
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

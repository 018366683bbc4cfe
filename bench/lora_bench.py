"""LoRA benchmark: low-rank DRM vs dense DRM on Llama-3.1-8B projection shapes.

Five rank-16 adapters with synthetic factors (no base weights: ``output_format: adapter``
needs only shapes). Two parts:

  sample   per matrix, one matrix of each distinct shape: the low-rank path (factors ->
           merged factors -> truncated adapter factors), the low-rank path with a dense
           output (what ``output_format: full`` adds: one n x m product), and the dense
           path (materialise the 5 deltas, dense DRM). Each measurement runs in a fresh
           subprocess so its peak RSS is its own.
  full     writes five real adapter directories (bf16, 32 layers x q/k/v/o/gate/up/down)
           and runs ``drmerge merge`` with ``output_format: adapter`` end to end.

    python bench/lora_bench.py sample            # ~5 min on 2 cores (the dense path is the slow part)
    python bench/lora_bench.py full --layers 32  # ~2 min
    python bench/lora_bench.py all
    ... --threads 1                              # torch threads in the measured processes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HIDDEN, FFN, KV = 4096, 14336, 1024
# module -> (out, in) as nn.Linear stores it
SHAPES = {
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN),
}
SAMPLE = ["q_proj", "k_proj", "gate_proj", "down_proj"]  # one of each distinct shape
T, RANK, ALPHA = 5, 16, 32


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """Process CPU time (user + system, all threads): on a shared machine it moves far
    less with other people's load than wall time does."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def synthetic_factors(shape, seed: int):
    """Per adapter: lora_B (out, r) and lora_A (r, in) as a trained adapter might hold them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out, inp = shape
    fs = []
    for _ in range(T):
        b = (torch.randn(out, RANK, generator=g) * 0.01).to(torch.bfloat16)
        a = (torch.randn(RANK, inp, generator=g) / inp ** 0.5).to(torch.bfloat16)
        fs.append((b, a))
    return fs


def one(path: str, module: str, repeats: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from drmerge.kernels.lowrank import LowRank, truncated
    from drmerge.methods.drm import DrmParams, drm_lowrank_delta, drm_matrix_delta

    shape = SHAPES[module]
    raw = synthetic_factors(shape, seed=hash(module) % 1000)
    weights = torch.ones(T)
    p = DrmParams()
    scaling = ALPHA / RANK

    def lowrank():
        fs = [LowRank(b.float() * scaling, a.float()) for b, a in raw]
        merged = drm_lowrank_delta(fs, shape, weights, p)
        if path == "lowrank_dense":
            return merged.dense(torch.float32)
        return truncated(merged, 64)

    def dense():
        stack = torch.stack([(b.float() * scaling) @ a.float() for b, a in raw])
        return drm_matrix_delta(stack, weights, p)

    fn = dense if path == "dense" else lowrank
    before_rss = _rss_mb()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_s()
        result = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
        del result
    return {"path": path, "module": module, "shape": list(shape), "seconds": statistics.median(times),
            "cpu_s": round(statistics.median(cpu), 3), "runs": len(times), "load1": round(os.getloadavg()[0], 1), "peak_extra_mb": round(max(0.0, _peak_mb() - before_rss), 1),
            "threads": torch.get_num_threads()}


def sample(args) -> list[dict]:
    rows = []
    for module in args.modules:
        for path, repeats in (("lowrank", 5), ("lowrank_dense", 3), ("dense", 1)):
            if path == "dense" and args.no_dense:
                continue
            cmd = [sys.executable, __file__, "_one", path, module, str(repeats), str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=_root())
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{module:<10} {str(tuple(row['shape'])):<14} {path:<14} {row['seconds']:9.3f} s  "
                  f"cpu {row['cpu_s']:9.3f} s  peak +{row['peak_extra_mb']:8.1f} MB  load {row['load1']}", flush=True)
    by = {(r["module"], r["path"]): r for r in rows}
    for module in args.modules:
        if (module, "dense") in by:
            speed = by[(module, "dense")]["seconds"] / by[(module, "lowrank")]["seconds"]
            speed_d = by[(module, "dense")]["seconds"] / by[(module, "lowrank_dense")]["seconds"]
            print(f"{module:<10} speedup: {speed:7.1f}x (adapter output), {speed_d:6.1f}x (with dense n x m output)")
    return rows


def write_adapters(workdir: str, layers: int) -> list[str]:
    import torch
    from safetensors.torch import save_file

    dirs = []
    for t in range(T):
        d = os.path.join(workdir, f"adapter{t}")
        os.makedirs(d, exist_ok=True)
        g = torch.Generator().manual_seed(100 + t)
        tensors = {}
        for layer in range(layers):
            for module, (out, inp) in SHAPES.items():
                part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{module}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, inp, generator=g) / inp ** 0.5).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(out, RANK, generator=g) * 0.01).to(torch.bfloat16)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
                       "target_modules": list(SHAPES), "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
                       "bias": "none", "use_rslora": False, "fan_in_fan_out": False}, f)
        dirs.append(d)
    return dirs


def full_child(workdir: str, layers: int, rank: int | None) -> dict:
    from drmerge import merge

    dirs = [os.path.join(workdir, f"adapter{t}") for t in range(T)]
    out = os.path.join(workdir, f"merged-r{rank or 'default'}")
    shutil.rmtree(out, ignore_errors=True)
    spec = {"models": dirs, "output": out, "output_format": "adapter"}
    if rank:
        spec["adapter_rank"] = rank
    before = _rss_mb()
    t0, c0 = time.perf_counter(), _cpu_s()
    result = merge(spec, device="cpu")
    seconds = time.perf_counter() - t0
    cpu = _cpu_s() - c0
    with open(os.path.join(out, "drmerge.json")) as f:
        adapter = json.load(f)["adapter"]
    return {"layers": layers, "modules": result.tensors // 2, "rank": adapter["rank"], "seconds": round(seconds, 2),
            "cpu_s": round(cpu, 1), "load1": round(os.getloadavg()[0], 1),
            "timings": result.timings, "energy_kept": adapter["energy_kept"],
            "min_module_energy_kept": min(m["energy_kept"] for m in adapter["modules"].values()),
            "peak_rss_mb": round(_peak_mb(), 1), "rss_before_mb": round(before, 1),
            "bytes_read": result.bytes_read, "bytes_written": result.bytes_written}


def full(args) -> list[dict]:
    t0 = time.perf_counter()
    write_adapters(args.workdir, args.layers)
    print(f"wrote {T} synthetic rank-{RANK} adapters ({args.layers} layers, bf16) in {time.perf_counter() - t0:.1f}s")
    rows = []
    for rank in args.ranks:
        cmd = [sys.executable, __file__, "_full", args.workdir, str(args.layers), str(rank), str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=_root())
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row))
    return rows


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_one", "_full"):
        sys.path.insert(0, _root())
        threads = int(sys.argv[-1])
        if threads:
            import torch

            torch.set_num_threads(threads)
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        print(json.dumps(one(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_full":
        rank = int(sys.argv[4])
        print(json.dumps(full_child(sys.argv[2], int(sys.argv[3]), rank or None)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("sample", "full", "all"))
    ap.add_argument("--modules", nargs="+", default=SAMPLE, choices=list(SHAPES))
    ap.add_argument("--no-dense", action="store_true", help="skip the (slow) dense path")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 80], help="adapter_rank values (0: the default)")
    ap.add_argument("--workdir", default="/tmp/drmerge-lora-bench")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the measuring processes (0: torch's default)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rows = {}
    if args.what in ("sample", "all"):
        rows["sample"] = sample(args)
    if args.what in ("full", "all"):
        rows["full"] = full(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

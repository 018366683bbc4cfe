"""Peak RSS of a DRM merge of 4 fine-tunes of a >= 1 GB checkpoint (issue #2's memory bound).

Generates a base of 1024 float32 matrices of 512 x 512 (1.07 GB) and 4 fine-tunes with
low-rank + noise deltas, then runs ``drmerge merge`` in a child process and reads its
peak RSS (VmHWM) from the kernel. The authors' script holds all five models in memory
(> 5 GB); the streaming engine holds a few tensors per model.

    python bench/memory_1gb.py [--workdir bench/_work/mem1gb] [--method drm]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

N_TENSORS, SIDE, N_MODELS = 1024, 512, 4


def generate(root: str) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(SIDE, SIDE, generator=g) * 0.02 for i in range(N_TENSORS)}
    os.makedirs(f"{root}/base", exist_ok=True)
    save_file(base, f"{root}/base/model.safetensors")
    for t in range(N_MODELS):
        ft = {}
        for name, w in base.items():
            low = torch.randn(SIDE, 4, generator=g) @ torch.randn(4, SIDE, generator=g)
            ft[name] = w + 1e-3 * low + 1e-4 * torch.randn(SIDE, SIDE, generator=g)
        os.makedirs(f"{root}/ft{t}", exist_ok=True)
        save_file(ft, f"{root}/ft{t}/model.safetensors")
        del ft


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="bench/_work/mem1gb")
    ap.add_argument("--method", default="drm")
    args = ap.parse_args()
    root = os.path.abspath(args.workdir)
    if not os.path.exists(f"{root}/ft{N_MODELS - 1}/model.safetensors"):
        generate(root)
    sizes = {d: os.path.getsize(f"{root}/{d}/model.safetensors") for d in ["base"] + [f"ft{t}" for t in range(N_MODELS)]}
    spec = {"base_model": f"{root}/base", "models": [f"{root}/ft{t}" for t in range(N_MODELS)],
            "method": args.method, "output": f"{root}/out", "overwrite": True, "shard_size": "2GB"}
    with open(f"{root}/spec.json", "w") as f:
        json.dump(spec, f)
    t0 = time.perf_counter()
    # A child process: its peak RSS is the merge's alone, not this generator's.
    res = subprocess.run([sys.executable, "-m", "drmerge", "merge", f"{root}/spec.json", "--json", "--device", "cpu"],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summary = json.loads(res.stdout)
    print(json.dumps({"models_bytes": sizes, "method": args.method, "peak_rss_bytes": peak,
                      "peak_rss_gb": round(peak / 1e9, 3), "wall_s": round(wall, 1),
                      "engine_timings": summary["timings"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

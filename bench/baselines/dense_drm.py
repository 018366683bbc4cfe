"""The dense approach, as the method's research code does it: load every checkpoint whole
into memory, stack each matrix's deltas, ``torch.linalg.svd`` in float32, save.

Same math as docs/DESIGN.md, "DRM, step by step" (and the same tensor selection), written
plainly and independently of the engine, so the bench compares drmerge against the way
the method is usually run. Usage:

    python -m bench.baselines.dense_drm --base DIR --models DIR [DIR ...] --out DIR \
        [--direction vertical|horizontal] [--json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

LINEAR = [r".*weight$"]
EXCLUDE = [r".*embed.*", r".*lm_head.*", r".*wte.*", r".*wpe.*", r"(.*\.)?shared\.weight"]


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update(load_file(f))
    return state


def is_matrix(name: str, t: torch.Tensor) -> bool:
    return (t.dim() >= 2 and any(re.fullmatch(p, name) for p in LINEAR)
            and not any(re.fullmatch(p, name) for p in EXCLUDE))


def elect_and_mean(stack: torch.Tensor) -> torch.Tensor:
    """Steps 6-8 with weights 1: sign election then disjoint mean over dim 0."""
    total = stack.sum(0)
    sigma = torch.sign(total)
    fallback = torch.sign(sigma.sum())
    sigma = torch.where(total == 0, fallback if fallback != 0 else torch.ones(()), sigma)
    kept = torch.where(torch.sign(stack) == sigma, stack, torch.zeros(()))
    return kept.sum(0) / (kept != 0).sum(0).clamp_min(1)


def drm_dense(deltas: torch.Tensor, direction: str = "vertical", drop_rate: float = 0.8,
              rank_threshold: float = 0.01) -> torch.Tensor:
    """Merged delta of a (T, n, m) float32 stack via one float32 SVD of the stacked deltas."""
    t, n, m = deltas.shape
    if direction == "vertical":
        u, s, vh = torch.linalg.svd(deltas.reshape(t * n, m), full_matrices=False)
    else:
        u, s, vh = torch.linalg.svd(deltas.permute(1, 0, 2).reshape(n, t * m), full_matrices=False)
    if s[0] <= 0:
        return torch.zeros(n, m)
    keep = s > rank_threshold * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    blocks = u.reshape(t, n, -1) if direction == "vertical" else vh.reshape(-1, t, m).permute(1, 2, 0)
    norms = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)
    vectors = torch.where(norms > 0, blocks / norms.clamp_min(1e-38), torch.zeros(()))
    spectrum = s * norms
    mags = vectors.abs().reshape(-1)
    k = mags.numel() - round(mags.numel() * (1.0 - drop_rate))
    if k > 0:
        threshold = torch.kthvalue(mags, k).values
        vectors = torch.where(vectors.abs() < threshold, torch.zeros(()), vectors)
    merged = elect_and_mean(vectors * spectrum)
    return merged @ vh if direction == "vertical" else u @ merged.T


def merge(base_dir: str, model_dirs: list[str], out_dir: str, direction: str) -> dict:
    t0 = time.perf_counter()
    base = load_checkpoint(base_dir)
    models = [load_checkpoint(d) for d in model_dirs]  # every checkpoint, whole
    t1 = time.perf_counter()
    out = {}
    for name, w0 in base.items():
        if not w0.is_floating_point():
            out[name] = w0
            continue
        deltas = torch.stack([m[name].float() - w0.float() for m in models])
        if is_matrix(name, w0):
            d = drm_dense(deltas.reshape(len(models), w0.shape[0], -1), direction).reshape(w0.shape)
        else:
            d = elect_and_mean(deltas)
        out[name] = (w0.float() + d).to(w0.dtype)
    t2 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(base_dir):
        if f.endswith(".json") and not f.endswith("index.json"):
            shutil.copy(os.path.join(base_dir, f), out_dir)
    t3 = time.perf_counter()
    return {"load_s": round(t1 - t0, 3), "compute_s": round(t2 - t1, 3), "save_s": round(t3 - t2, 3),
            "total_s": round(t3 - t0, 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--direction", default="vertical", choices=("vertical", "horizontal"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    result = merge(a.base, a.models, a.out, a.direction)
    print(json.dumps(result) if a.json else result)


if __name__ == "__main__":
    main()

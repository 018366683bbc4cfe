"""Why the methods rank as they do: the task deltas' geometry and what each merge keeps.

    python -m bench.quality.analysis [--seed 0] [--merges]

Reads the fine-tuned checkpoints of one seed from the benchmark's work folder and writes
``analysis.json`` and ``spectra.png`` next to RESULTS.md:
- size of every task's delta relative to the pretrained weights, and the pairwise
  cosine similarity of the task vectors (encoder matrices only);
- singular spectra of single-task deltas and of the vertical / horizontal stacks for a
  few matrices, and the share of the stack's energy in its top components;
- with ``--merges``: each chosen merge (from results.json; the checkpoint run.py left
  on disk, else merged again through the engine) is compared with every task's delta: the fraction of task t's delta the merged delta
  carries (projection coefficient <D, D_t> / |D_t|^2) and their cosine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
MATRIX = re.compile(r"encoder\.layer\.\d+\..*weight$")
SHOWN = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight",
         "encoder.layer.5.output.dense.weight")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).double() for k in f.keys()}


def _is_matrix(name: str, t: torch.Tensor) -> bool:
    return t.ndim == 2 and bool(MATRIX.fullmatch(name)) and "LayerNorm" not in name


def task_deltas(work: Path, seed: int, tasks: list[str]):
    base = _tensors(work / "base")
    deltas = {}
    for t in tasks:
        ft = _tensors(work / f"seed{seed}" / "ft" / t)
        deltas[t] = {k: ft[k] - base[k] for k in base if k in ft and base[k].is_floating_point()}
    return base, deltas


def geometry(base, deltas, tasks):
    names = [k for k in base if _is_matrix(k, base[k])]
    flat = {t: torch.cat([deltas[t][k].flatten() for k in names]) for t in tasks}
    w0 = torch.cat([base[k].flatten() for k in names]).norm()
    emb = "embeddings.word_embeddings.weight"
    out = {"relative_delta_norm": {t: float(flat[t].norm() / w0) for t in tasks},
           "relative_embedding_delta_norm": {t: float(deltas[t][emb].norm() / base[emb].norm()) for t in tasks},
           "cosine": {a: {b: float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm())) for b in tasks}
                      for a in tasks}}
    spectra = {}
    for k in SHOWN:
        d = torch.stack([deltas[t][k] for t in tasks])  # (T, n, m)
        single = {t: torch.linalg.svdvals(deltas[t][k]) for t in tasks}
        v = torch.linalg.svdvals(d.reshape(-1, d.shape[2]))                 # vertical stack  (T n x m)
        h = torch.linalg.svdvals(d.permute(1, 0, 2).reshape(d.shape[1], -1))  # horizontal stack (n x T m)

        def energy(s, frac):
            e = (s ** 2).cumsum(0) / (s ** 2).sum()
            return int((e < frac).sum()) + 1

        spectra[k] = {
            "shape": list(d.shape[1:]),
            "rank90_single": {t: energy(s, 0.9) for t, s in single.items()},
            "rank90_vertical": energy(v, 0.9), "rank90_horizontal": energy(h, 0.9),
            "kept_components_vertical": int((v > 0.01 * v[0]).sum()),
            "kept_components_horizontal": int((h > 0.01 * h[0]).sum()),
            "single": {t: s.tolist() for t, s in single.items()}, "vertical": v.tolist(), "horizontal": h.tolist(),
        }
    out["spectra"] = spectra
    return out


def merge_retention(work: Path, seed: int, tasks: list[str], base, deltas, results: dict) -> dict:
    """For each chosen merge (reused from disk or merged again), how much of every task's delta it keeps."""
    import drmerge

    from .run import MERGE_ROWS

    names = [k for k in base if _is_matrix(k, base[k])]
    flat = {t: torch.cat([deltas[t][k].flatten() for k in names]) for t in tasks}
    rows = next(s for s in results["seeds"] if s["seed"] == seed)["rows"]
    out = {}
    for row in MERGE_ROWS:
        params = rows[row]["params"]
        method = "linear" if row == "linear" else "task_arithmetic" if row == "task_arithmetic" else \
            "ties" if row == "ties" else "drm"
        spec = {"models": [{"model": str(work / f"seed{seed}" / "ft" / t)} for t in tasks], "method": method,
                "output": "", "dtype": "float32", "overwrite": True}
        if params:
            spec["parameters"] = params
        if method != "linear":
            spec["base_model"] = str(work / "base")
        # run.py keeps each seed's merges (in merged/, or kept/ when they were set aside);
        # reuse the one with this exact spec, else merge again through the engine.
        from .run import config_key

        tag = hashlib.sha1(config_key(method, params).encode()).hexdigest()[:12]
        dest = None
        for folder in ("merged", "kept"):
            cand = work / f"seed{seed}" / folder / tag
            if (cand / "drmerge.json").is_file() and (cand / "bench-config.json").is_file():
                stamped = json.loads((cand / "bench-config.json").read_text())
                if stamped.get("parameters", {}) == spec.get("parameters", {}) and stamped["method"] == method:
                    dest = cand
                    break
        fresh = dest is None
        if fresh:
            dest = work / "analysis-merge"
            spec["output"] = str(dest)
            drmerge.merge(spec, device="cpu")
        merged = _tensors(dest)
        d = torch.cat([(merged[k] - base[k]).flatten() for k in names])
        out[row] = {"params": params, "relative_norm": float(d.norm() / torch.cat([base[k].flatten() for k in names]).norm()),
                    "projection": {t: float(d @ flat[t] / (flat[t] @ flat[t])) for t in tasks},
                    "cosine": {t: float(d @ flat[t] / (d.norm() * flat[t].norm())) for t in tasks}}
        if fresh:
            shutil.rmtree(dest, ignore_errors=True)
        print(row, json.dumps({k: {t: round(v, 3) for t, v in out[row][k].items()} for k in ("projection", "cosine")}),
              flush=True)
    return out


def plot(geo: dict, tasks: list[str], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHOWN), figsize=(5 * len(SHOWN), 4))
    for ax, k in zip(axes, SHOWN):
        sp = geo["spectra"][k]
        for t in tasks:
            s = torch.tensor(sp["single"][t])
            ax.semilogy(s / s[0], lw=0.8, alpha=0.7, label=t)
        for name, color in (("vertical", "k"), ("horizontal", "0.5")):
            s = torch.tensor(sp[name])
            ax.semilogy(s / s[0], color=color, lw=1.8, ls="--", label=f"{name} stack")
        ax.axhline(0.01, color="r", lw=0.6, ls=":")
        ax.set_title(f"{k.replace('encoder.layer.', 'L').replace('.weight', '')} {tuple(sp['shape'])}", fontsize=9)
        ax.set_xlabel("component")
        ax.set_ylabel("s_i / s_1")
    axes[0].legend(fontsize=6)
    fig.suptitle("Singular spectra of task deltas and of their stacks (red: DRM's rank threshold 0.01)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=HERE / "_work")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--merges", action="store_true", help="re-run the chosen merges and measure retention")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    if results is None and args.merges:
        ap.error(f"--merges needs {results_path} (run bench.quality.run first)")
    from .run import FULL

    tasks = results["tasks"] if results else list(FULL.tasks)
    base, deltas = task_deltas(args.work, args.seed, tasks)
    geo = geometry(base, deltas, tasks)
    plot(geo, tasks, args.out / "spectra.png")
    summary = {k: v for k, v in geo.items() if k != "spectra"}
    summary["spectra"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("single", "vertical", "horizontal")}
                          for k, v in geo["spectra"].items()}
    if args.merges:
        summary["merge_retention"] = merge_retention(args.work, args.seed, tasks, base, deltas, results)
    summary["seed"] = args.seed
    (args.out / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "merge_retention"}, indent=1))


if __name__ == "__main__":
    main()

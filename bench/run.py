"""The bench suite: ``python -m bench.run --workload w1|w2|w3|big|scaling|overlap [--repeats N]``.

Every comparison runs the baseline and drmerge side by side in the same invocation,
alternating their order across repeats, each in a fresh process (see measure.py), and
records ratios. Results go to bench/results/<workload>.json; bench/README.md quotes them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys

import torch

from . import measure
from .workloads import WORK, build

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.environ.get("BENCH_RESULTS") or os.path.join(HERE, "results")
PY = sys.executable


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ commands


def drmerge_cmd(manifest: dict, method: str, out: str, **params) -> list[str]:
    spec = {"base_model": manifest["base"], "models": [{"model": m} for m in manifest["models"]],
            "method": method, "parameters": params, "output": out, "overwrite": True}
    path = out.rstrip("/") + ".spec.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(spec, f, indent=2)
    return [PY, "-m", "drmerge", "merge", path, "--json", "--device", "cpu"]


def dense_cmd(manifest: dict, out: str, direction: str) -> list[str]:
    return [PY, "-m", "bench.baselines.dense_drm", "--base", manifest["base"], "--models", *manifest["models"],
            "--out", out, "--direction", direction, "--json"]


def mergekit_cmd(manifest: dict, method: str, out: str) -> list[str]:
    """mergekit with parameters aligned to drmerge's: weights 1, lambda 1, magnitude
    top-k density 0.2 (ties), no rescale, normalize (divide by the kept weights) for
    ties only, float32 arithmetic, output in the base's dtype."""
    per_model = {"weight": 1.0} | ({"density": 0.2} if method == "ties" else {})
    cfg = {"merge_method": method, "base_model": manifest["base"],
           "models": [{"model": m, "parameters": per_model} for m in manifest["models"]],
           "parameters": {"normalize": method == "ties", "rescale": False, "int8_mask": False, "lambda": 1.0},
           "dtype": "float32", "out_dtype": manifest["dtype"]}
    path = out.rstrip("/") + ".mergekit.json"  # JSON is valid YAML
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    exe = os.path.join(os.path.dirname(PY), "mergekit-yaml")
    return [exe, path, out, "--no-cuda", "--quiet", "--allow-crimes"]


# ------------------------------------------------------------------ tensors


def read_tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, "pt") as sf:
            for n in names:
                if n in sf.keys():
                    out[n] = sf.get_tensor(n)
    missing = set(names) - set(out)
    if missing:
        raise KeyError(f"{path} lacks {sorted(missing)}")
    return out


def compare_outputs(a: str, b: str) -> dict:
    """Max |difference| over every tensor of two merged checkpoints (in float32)."""
    from safetensors import safe_open

    def index(path):
        idx = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():
                    idx[k] = f
        return idx

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return {"error": f"tensor names differ: {sorted(set(ia) ^ set(ib))[:5]}"}
    worst, worst_name, differing, total, max_rel = 0.0, None, 0, 0, 0.0
    for name in sorted(ia):
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        d = (x - y).abs()
        m = float(d.max()) if d.numel() else 0.0
        differing += int((d > 0).sum())
        total += d.numel()
        if m > worst:
            worst, worst_name = m, name
        scale = float(y.abs().max()) if y.numel() else 0.0
        if scale > 0:
            max_rel = max(max_rel, m / scale)
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "max_diff_over_tensor_max": max_rel,
            "differing_elements": differing, "elements": total}


def sample_errors(manifest: dict, names: list[str], direction: str, outputs: dict[str, str]) -> list[dict]:
    """Relative Frobenius error of the merged delta against a float64 reference, for a
    sample of matrices: in-process for the two algorithms (engine vs dense float32 SVD),
    and from the written outputs (which adds the output dtype's rounding)."""
    from drmerge.methods.drm import DrmParams, drm_matrix_delta

    from .baselines.dense_drm import drm_dense
    from .reference import drm_reference

    base = read_tensors(manifest["base"], names)
    models = [read_tensors(m, names) for m in manifest["models"]]
    files = {k: read_tensors(v, names) for k, v in outputs.items()}
    p = DrmParams(direction=direction)
    rows = []
    for n in names:
        w0 = base[n].float()
        deltas = torch.stack([m[n].float() - w0 for m in models])
        ref = drm_reference(deltas, direction=direction)

        def err(x):
            return float((x.double() - ref).norm() / ref.norm())

        row = {"tensor": n, "shape": list(w0.shape),
               "engine_vs_f64": err(drm_matrix_delta(deltas, torch.ones(len(models)), p)),
               "dense_f32_svd_vs_f64": err(drm_dense(deltas, direction))}
        for k, f in files.items():
            row[f"{k}_output_file_vs_f64"] = err(f[n].float() - w0)
        rows.append(row)
        log(f"    error {n}: engine {row['engine_vs_f64']:.2e}  dense f32 SVD {row['dense_f32_svd_vs_f64']:.2e}")
    return rows


# ------------------------------------------------------------------ suites


def summarize(runs: list[dict], key: str = "wall_s") -> float:
    return statistics.median(r[key] for r in runs)


def pairwise(label_a: str, cmd_a, label_b: str, cmd_b, repeats: int) -> dict:
    """Run two commands ``repeats`` times each, alternating order; return runs and ratios (b / a)."""
    runs = {label_a: [], label_b: []}
    for i in range(repeats):
        order = [(label_a, cmd_a), (label_b, cmd_b)] if i % 2 == 0 else [(label_b, cmd_b), (label_a, cmd_a)]
        for label, cmd in order:
            runs[label].append(measure.run(cmd, f"{label} #{i + 1}", log=log))
    out = {"runs": runs}
    for key in ("wall_s", "cpu_s", "peak_rss_mb"):
        a, b = summarize(runs[label_a], key), summarize(runs[label_b], key)
        out[f"median_{key}"] = {label_a: a, label_b: b, "ratio": round(b / a, 3) if a else None}
    inner_a = [r["stdout_json"].get("total_s") or r["stdout_json"].get("seconds") for r in runs[label_a] if r["stdout_json"]]
    inner_b = [r["stdout_json"].get("seconds") or r["stdout_json"].get("total_s") for r in runs[label_b] if r["stdout_json"]]
    if inner_a and inner_b:
        a, b = statistics.median(inner_a), statistics.median(inner_b)
        out["median_engine_s"] = {label_a: a, label_b: b, "ratio": round(b / a, 3)}
    return out


def drm_vs_dense(manifest: dict, direction: str, repeats: int, sample: list[str]) -> dict:
    wdir = os.path.join(WORK, "out", manifest["name"])
    dense_out, drm_out = os.path.join(wdir, f"dense-{direction}"), os.path.join(wdir, f"drmerge-drm-{direction}")
    log(f"  DRM {direction}: dense baseline vs drmerge")
    res = pairwise("dense", dense_cmd(manifest, dense_out, direction),
                   "drmerge", drmerge_cmd(manifest, "drm", drm_out, direction=direction), repeats)
    res["stages"] = [r["stdout_json"]["timings"] for r in res["runs"]["drmerge"]]
    res["dense_stages"] = [r["stdout_json"] for r in res["runs"]["dense"]]
    res["errors"] = sample_errors(manifest, sample, direction, {"dense": dense_out, "drmerge": drm_out})
    return res


def vs_mergekit(manifest: dict, method: str, repeats: int) -> dict:
    wdir = os.path.join(WORK, "out", manifest["name"])
    mk_out, drm_out = os.path.join(wdir, f"mergekit-{method}"), os.path.join(wdir, f"drmerge-{method}")
    log(f"  {method}: mergekit vs drmerge")
    shutil.rmtree(mk_out, ignore_errors=True)
    res = pairwise("mergekit", mergekit_cmd(manifest, method, mk_out), "drmerge",
                   drmerge_cmd(manifest, method, drm_out, **({"density": 0.2} if method == "ties" else {})), repeats)
    res["stages"] = [r["stdout_json"]["timings"] for r in res["runs"]["drmerge"]]
    res["agreement"] = compare_outputs(drm_out, mk_out)
    log(f"    agreement: {res['agreement']}")
    return res


SAMPLES = {
    "w1": ["encoder.layer.5.attention.self.query.weight", "encoder.layer.5.intermediate.dense.weight",
           "encoder.layer.5.output.dense.weight"],
    "w2": ["model.layers.7.self_attn.q_proj.weight", "model.layers.7.mlp.gate_proj.weight",
           "model.layers.7.mlp.down_proj.weight"],
}


def save(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    log(f"wrote {path}")
    return path


def suite_w1(args) -> None:
    m = build("w1", log=log)
    data = {"machine": measure.machine(), "workload": m}
    for direction in args.directions:
        data[f"drm_{direction}"] = drm_vs_dense(m, direction, args.repeats, SAMPLES["w1"])
        save("w1", data)


def suite_w2(args) -> None:
    m = build("w2", log=log)
    data = {"machine": measure.machine(), "workload": m}
    if "drm" in args.methods:
        data["drm_vertical"] = drm_vs_dense(m, "vertical", args.repeats, SAMPLES["w2"])
        save("w2", data)
    for method in ("ties", "task_arithmetic"):
        if method in args.methods:
            data[method] = vs_mergekit(m, method, args.repeats)
            save("w2", data)


def suite_big(args) -> None:
    m = build("big", log=log)
    out = os.path.join(WORK, "out", "big", f"drmerge-{args.big_method}")
    cmd = drmerge_cmd(m, args.big_method, out)
    log(f"  big: drmerge {args.big_method}, base + {len(m['models'])} models of {m['bytes_per_model'] / 1e9:.2f} GB")
    r = measure.run(cmd, "drmerge", log=log)
    save(f"big-{args.big_method}", {"machine": measure.machine(), "workload": m, "run": r,
                                    "limit_mb": 1500, "ok": r["peak_rss_mb"] < 1500})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="drmerge bench suite")
    ap.add_argument("--workload", required=True, choices=("w1", "w2", "w3", "big", "scaling", "overlap"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--directions", nargs="+", default=["vertical", "horizontal"])
    ap.add_argument("--methods", nargs="+", default=["drm", "ties", "task_arithmetic"])
    ap.add_argument("--big-method", default="drm")
    ap.add_argument("--target", default="w1", help="overlap: which workload (w1, or w3 for S3)")
    ap.add_argument("--layers", type=int, default=None, help="overlap/w3: a W1 variant with fewer layers")
    args = ap.parse_args(argv)
    if args.workload in ("scaling", "overlap", "w3"):
        from . import overlap, scaling

        {"scaling": scaling.main, "overlap": overlap.main, "w3": overlap.main_w3}[args.workload](args)
        return
    {"w1": suite_w1, "w2": suite_w2, "big": suite_big}[args.workload](args)


if __name__ == "__main__":
    main()

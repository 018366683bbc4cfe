"""Overlap of reading, computing and writing: ``python -m bench.run --workload overlap
[--target w1|w3] [--methods task_arithmetic drm] [--layers N]``.

For one workload and method it measures, in one process and one run:
  - I/O alone: the real pipeline (prefetching readers, background shard writer) with the
    merge replaced by a pass-through, so every input tensor is read and an output of the
    same size is written;
  - compute alone: every tensor is read first (untimed), then merged (timed);
  - end to end: the real merge.
Target (issue #4): end to end <= 1.25 x max(I/O alone, compute alone).
W3 is W1 uploaded to a local SeaweedFS server (drmerge_ops.devservers) and merged from and
to s3:// URIs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from drmerge import execute, pipeline
from drmerge.inputs import Inputs, LazyTensor
from drmerge.checkpoint import DTYPES
from drmerge.spec import parse_spec

from . import measure
from .workloads import WORK, build


def log(msg: str) -> None:
    print(msg, flush=True)


def _spec(base: str, models: list[str], out: str, method: str, **params):
    return parse_spec({"base_model": base, "models": [{"model": m} for m in models], "method": method,
                       "parameters": params, "output": out, "overwrite": True})


def _passthrough(inputs, tp, base, tensors, device):
    """No merge: the output is the base; lazily read inputs are still read, chunk by chunk."""
    first = base if base is not None else tensors[0]
    if isinstance(first, LazyTensor):
        from drmerge.kernels.elementwise import CHUNK_ELEMENTS

        for t in ([base] if base is not None else []) + list(tensors):
            for a in range(0, t.numel(), CHUNK_ELEMENTS):
                t[a:min(t.numel(), a + CHUNK_ELEMENTS)]
        return first.to(DTYPES[tp.out.dtype][0]).reshape(first.shape)
    return first.to(DTYPES[tp.out.dtype][0])


def io_alone(spec, s3_options=None) -> dict:
    original = execute.merge_one
    execute.merge_one = _passthrough
    try:
        r = pipeline.run_merge(spec, device="cpu", s3_options=s3_options)
    finally:
        execute.merge_one = original
    return {"seconds": r.seconds, "timings": r.timings, "bytes_read": r.bytes_read, "bytes_written": r.bytes_written}


def compute_alone(spec, s3_options=None) -> dict:
    inputs = Inputs(spec, s3_options)
    total = 0.0
    try:
        for tp in inputs.plan.tensors:
            base, tensors = inputs.read(tp.name)
            t0 = time.perf_counter()
            execute.merge_one(inputs, tp, base, tensors, torch.device("cpu"))
            total += time.perf_counter() - t0
    finally:
        inputs.close()
    return {"seconds": total}


def end_to_end(spec, s3_options=None) -> dict:
    r = pipeline.run_merge(spec, device="cpu", s3_options=s3_options)
    return {"seconds": r.seconds, "timings": r.timings}


def one(base, models, out, method, params, s3_options=None) -> dict:
    spec = _spec(base, models, out, method, **params)
    log(f"  overlap {method}: I/O alone ...")
    io = io_alone(spec, s3_options)
    log(f"    {io['seconds']:.1f}s ({io['bytes_read'] / 1e9:.2f} GB read, {io['bytes_written'] / 1e9:.2f} GB written)")
    log("    compute alone ...")
    comp = compute_alone(spec, s3_options)
    log(f"    {comp['seconds']:.1f}s")
    log("    end to end ...")
    e2e = end_to_end(spec, s3_options)
    ratio = e2e["seconds"] / max(io["seconds"], comp["seconds"])
    log(f"    {e2e['seconds']:.1f}s  stages {e2e['timings']}  -> ratio {ratio:.2f}")
    return {"method": method, "params": params, "io_alone": io, "compute_alone": comp, "end_to_end": e2e,
            "ratio_e2e_over_max": round(ratio, 3), "target": 1.25}


def _methods(args) -> list[tuple[str, dict]]:
    chosen = getattr(args, "methods", None) or ["task_arithmetic", "drm"]
    return [(m, {"direction": "vertical"} if m == "drm" else {}) for m in chosen
            if m in ("task_arithmetic", "ties", "drm")]


def main(args) -> None:
    from .run import save

    if args.target == "w3":
        return main_w3(args)
    m = build("w1", layers=args.layers, log=log)
    data = {"machine": measure.machine(), "workload": m, "storage": "local", "results": []}
    for method, params in _methods(args):
        out = os.path.join(WORK, "out", m["name"], f"overlap-{method}")
        data["results"].append(one(m["base"], m["models"], out, method, params))
        save(f"overlap-{m['name']}", data)


def main_w3(args) -> None:
    """W3: W1 through a local S3 server (SeaweedFS)."""
    from drmerge_ops.devservers import start_seaweedfs

    from .run import save

    m = build("w1", layers=args.layers, log=log)
    tmp = tempfile.mkdtemp(prefix="w3-s3-", dir=WORK)
    srv = start_seaweedfs(tmp, memory_limit_mb=None)
    try:
        client = srv.client()
        client.create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        uris = {}
        for path in [m["base"]] + m["models"]:
            prefix = f"{m['name']}/{os.path.basename(path)}/"
            for f in sorted(os.listdir(path)):
                client.upload_file(os.path.join(path, f), "bench", prefix + f)
            uris[path] = f"s3://bench/{prefix}"
        log(f"  W3: uploaded {len(uris)} checkpoints to SeaweedFS in {time.perf_counter() - t0:.0f}s")
        data = {"machine": measure.machine(), "workload": m, "storage": "s3 (SeaweedFS, loopback)", "results": []}
        for method, params in _methods(args):
            out = f"s3://bench/out/{m['name']}-{method}/"
            data["results"].append(one(uris[m["base"]], [uris[p] for p in m["models"]], out, method, params,
                                       s3_options=srv.s3_options()))
            save(f"overlap-w3-{m['name']}", data)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

"""Small checkpoints to merge, on local disk and in S3, and ways to look at what a merge
left there: objects, their fingerprints, pending multipart uploads, a local reference
merge of the same spec."""

from __future__ import annotations

import hashlib
import json
import os

from tests.support.servers import FaultyS3Proxy


def write_checkpoint(folder, tensors: dict, config: dict | None = None) -> str:
    """An HF-style folder: model.safetensors (+ config.json)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(json.dumps(config or {"model_type": "toy"}))
    return str(folder)


def write_many_shards(folder, n_shards: int, seed: int = 0) -> str:
    """A checkpoint of ``n_shards`` files of one 4x4 weight each, plus its index: planning
    reads one header per shard, so over a slow S3 it takes a while (``n_shards`` x 3
    requests) while the merge itself is trivial."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({f"layers.{i}.proj.weight": torch.randn(4, 4, generator=g)}, os.path.join(folder, shard))
        weight_map[f"layers.{i}.proj.weight"] = shard
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 64 * n_shards}, "weight_map": weight_map}, f)
    return str(folder)


def make_family(root, *, n_models: int = 3, n_layers: int = 2, dim: int = 16, seed: int = 0) -> dict:
    """A base and ``n_models`` fine-tunes (low-rank matrix deltas, noisy biases):
    name -> local folder. ``n_layers`` scales the tensor count (3 per layer)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = {}
    for i in range(n_layers):
        base[f"layers.{i}.proj.weight"] = torch.randn(dim, dim, generator=g)
        base[f"layers.{i}.proj.bias"] = torch.randn(dim, generator=g)
        base[f"layers.{i}.norm.weight"] = torch.ones(dim)
    base["embed.weight"] = torch.randn(32, dim, generator=g)
    folders = {"base": write_checkpoint(os.path.join(root, "base"), base)}
    for t in range(n_models):
        ft = {}
        for k, v in base.items():
            if v.ndim == 2:
                ft[k] = v + 0.1 * torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
            else:
                ft[k] = v + 0.01 * torch.randn(v.shape, generator=g)
        folders[f"ft-{t + 1}"] = write_checkpoint(os.path.join(root, f"ft-{t + 1}"), ft)
    return folders


def upload_folder(client, folder, bucket: str, prefix: str) -> str:
    for name in sorted(os.listdir(folder)):
        client.upload_file(os.path.join(folder, name), bucket, prefix.rstrip("/") + "/" + name)
    return f"s3://{bucket}/{prefix.rstrip('/')}/"


def list_keys(client, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", ())]
    return sorted(keys)


class _Family:
    def __init__(self, bucket: str, local: dict, uris: dict):
        self.bucket, self.local, self.uris = bucket, local, uris

    def spec(self, output: str = "merged/", **overrides) -> dict:
        names = sorted(n for n in self.uris if n != "base")
        spec = {"base_model": self.uris["base"], "models": [{"model": self.uris[n]} for n in names],
                "method": "drm", "output": f"s3://{self.bucket}/{output}"}
        spec.update(overrides)
        return spec


def _family(tmp_path, s3_client, bucket, prefix: str = "", **kw) -> _Family:
    local = make_family(os.path.join(tmp_path, "ckpt" + prefix.replace("/", "-")), **kw)
    uris = {name: upload_folder(s3_client, folder, bucket, f"{prefix}{name}") for name, folder in local.items()}
    return _Family(bucket, local, uris)


def object_fingerprints(s3_client, bucket: str, prefix: str = "") -> dict[str, tuple[str, str]]:
    """key -> (ETag, sha256 of the bytes): to show objects were not written to."""
    out = {}
    for key in list_keys(s3_client, bucket, prefix):
        obj = s3_client.get_object(Bucket=bucket, Key=key)
        out[key] = (obj["ETag"], hashlib.sha256(obj["Body"].read()).hexdigest())
    return out


def output_files(s3_client, job: dict) -> dict[str, bytes]:
    bucket, _, prefix = job["spec"]["output"][len("s3://"):].partition("/")
    return {k[len(prefix):]: s3_client.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in list_keys(s3_client, bucket, prefix)}


def local_merge(spec: dict, family, out_dir) -> dict[str, bytes]:
    """The same merge from local disk with the engine itself: name -> bytes (no drmerge.json)."""
    from drmerge.pipeline import run_merge
    from drmerge.spec import parse_spec

    local = json.loads(json.dumps(spec))
    by_uri = {uri: family.local[name] for name, uri in family.uris.items()}
    if local.get("base_model"):
        local["base_model"] = by_uri[local["base_model"]]
    for m in local["models"]:
        m["model"] = by_uri[m["model"]]
    local["output"] = str(out_dir)
    result = run_merge(parse_spec(local), device="cpu")
    return {f["name"]: open(os.path.join(out_dir, f["name"]), "rb").read() for f in result.files}


def pending_uploads(s3_client, bucket: str) -> list[str]:
    return [u["Key"] for u in s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", ())]


SLOW_PLAN_SHARDS = 40  # x 3 requests per shard header x 0.2 s: ~25 s per checkpoint to plan


def slow_plan_spec(s3_client, s3_bucket, tmp_path, proxy: FaultyS3Proxy, output: str) -> dict:
    """Base and fine-tune of SLOW_PLAN_SHARDS one-tensor shards each, behind a proxy that
    answers their reads 0.2 s late: planning takes ~50 s, merging next to nothing."""
    uris = {label: upload_folder(s3_client, write_many_shards(tmp_path / label, SLOW_PLAN_SHARDS, seed=i),
                                 s3_bucket, f"slowplan/{label}") for i, label in enumerate(("base", "ft"))}
    proxy.add("delay", lambda m, p, q: m in ("GET", "HEAD") and "/slowplan/" in p, seconds=0.2)
    return {"base_model": uris["base"], "models": [uris["ft"]], "method": "task_arithmetic",
            "output": f"s3://{s3_bucket}/{output}"}


def shard_headers_read(proxy: FaultyS3Proxy) -> set[str]:
    return {p for m, p, q, _ in list(proxy.log) if m == "GET" and "/slowplan/" in p and p.endswith(".safetensors")}

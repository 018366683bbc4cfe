"""Shared fixtures: real Redis and a real S3 server (SeaweedFS), one of each per session.

Servers are started on free loopback ports and change no global state (no environment
variables): a test that wants them passes ``s3_server.s3_options()`` or
``redis_server.url`` explicitly, or applies ``s3_server.env()`` with monkeypatch.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.servers import BucketSupply, start_redis, start_seaweedfs


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop(timeout=3)  # its data is throwaway: do not wait long for a clean exit


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop(timeout=3)  # its data is throwaway: do not wait long for a clean exit


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A boto3 S3 client for ``s3_server``, for arranging and inspecting test data."""
    client = s3_server.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def _bucket_supply(s3_client):
    supply = BucketSupply(s3_client)
    yield supply
    supply.close()


@pytest.fixture
def s3_bucket(_bucket_supply):
    """The name of a fresh, empty bucket on ``s3_server``, deleted with its contents
    after the test."""
    bucket = _bucket_supply.take()
    yield bucket
    _bucket_supply.release(bucket)


# ----------------------------------------------------------------- service fixtures
# (service branch) Real API (uvicorn) and Celery worker processes on the session's Redis
# and S3, plus small checkpoints to merge. Each stack has its own Redis key prefix and
# queue, so stacks (and test sessions) never see each other's jobs.

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from service.jobs.status import TERMINAL  # noqa: E402
from tests.support.servers import free_port  # noqa: E402

# Short intervals so tests see progress, heartbeats and webhook retries in well under a second.
SERVICE_TEST_SETTINGS = dict(
    progress_interval_s=0.05, worker_heartbeat_s=0.5, worker_heartbeat_ttl_s=5.0, worker_device="cpu",
    webhook_backoff_base_s=0.2, webhook_backoff_max_s=1.0, webhook_poll_s=0.1, webhook_max_attempts=4,
    webhook_timeout_s=5.0,
)


@dataclass
class ServiceStack:
    api_url: str
    env: dict
    settings: object  # service.settings.Settings of the processes
    store: object  # service.jobs.store.JobStore on the same Redis/prefix, for inspection
    http: object  # httpx.Client with base_url=api_url, authenticated with api_key
    log_dir: str
    worker_name: str | None = None
    keys: object = None  # service.keys.KeyStore of the stack (create and revoke keys)
    api_key: str | None = None  # a key of tenant `tenant` that may use any S3 location
    tenant: str = "tests"

    def client(self, key: str | None = None, **kw):
        """Another httpx client for this API: with ``key`` as bearer token, or none."""
        import httpx

        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.api_url, timeout=30, headers=headers, **kw)

    def new_key(self, tenant: str, allow=("*",), allow_read=()) -> str:
        key, _ = self.keys.create(tenant, allow=allow, allow_read=allow_read)
        return key

    def submit(self, spec: dict, headers: dict | None = None, **body) -> dict:
        r = self.http.post("/v1/merges", json={"spec": spec, **body}, headers=headers or {})
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/merges/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_for(self, job_id: str, pred, timeout: float = 60.0, interval: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if pred(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {job_id}: {job}\n--- worker log ---\n{self.log_tail()}")
            time.sleep(interval)

    def wait(self, job_id: str, timeout: float = 60.0) -> dict:
        return self.wait_for(job_id, lambda j: j["status"] in TERMINAL, timeout)

    def log_tail(self, n: int = 4000) -> str:
        path = os.path.join(self.log_dir, "worker.log")
        if not os.path.exists(path):
            return "(no worker)"
        with open(path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")


@pytest.fixture
def store(redis_server):
    """A JobStore on the session's Redis under a fresh key prefix, emptied afterwards."""
    from service.jobs.store import JobStore

    s = JobStore.from_url(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield s
    for key in s.r.scan_iter(f"{s.p}:*"):
        s.r.delete(key)
    s.r.close()


@pytest.fixture
def aws_env(monkeypatch, s3_server):
    """Credentials reach the engine the way they do on a real worker: AWS_* variables."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


def _make_stack(redis_server, s3_server, log_dir, *, with_worker: bool, **overrides):
    import httpx

    from drmerge_ops.processes import service_env, start_api, start_worker
    from service.jobs.store import JobStore
    from service.settings import Settings

    from service.keys import KeyStore

    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings_kw = dict(SERVICE_TEST_SETTINGS, key_prefix=prefix, queue=f"{prefix}-merges",
                       api_key_pepper=f"pepper-{uuid.uuid4().hex}", **overrides)
    env = service_env(redis_server.url, s3_server.env(), **settings_kw)
    # One BLAS/OpenMP thread: on a busy 2-core CI box, spinning OpenMP threads make tiny
    # merges ten times slower, and these tests are about the service, not throughput.
    env["OMP_NUM_THREADS"] = "1"
    settings = Settings(redis_url=redis_server.url, s3_endpoint_url=s3_server.endpoint_url, **settings_kw)
    port = free_port()
    procs = [start_api(env, port, os.path.join(log_dir, "api.log"))]
    worker_name = None
    try:
        if with_worker:
            worker_name = f"{prefix}@test"
            procs.append(start_worker(env, worker_name, os.path.join(log_dir, "worker.log")))
    except BaseException:
        _stop_all(procs)
        raise
    store = JobStore.from_url(redis_server.url, prefix=prefix)
    keys = KeyStore.from_settings(settings)
    api_key, _ = keys.create("tests", allow=["*"])
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                        headers={"authorization": f"Bearer {api_key}"})
    return ServiceStack(f"http://127.0.0.1:{port}", env, settings, store, http, str(log_dir), worker_name,
                        keys=keys, api_key=api_key), procs


def _stop_all(procs) -> None:
    from drmerge_ops.processes import stop_process

    for p in reversed(procs):
        stop_process(p, 20)


@pytest.fixture(scope="session")
def service_stack(redis_server, s3_server, tmp_path_factory):
    """API + one Celery worker (``drmerge worker``, solo pool) as real processes. Its
    webhook tests use a loopback http receiver, which the operator setting allows here."""
    stack, procs = _make_stack(redis_server, s3_server, tmp_path_factory.mktemp("stack"), with_worker=True,
                               webhook_allow_http_loopback=True)
    yield stack
    stack.http.close()
    _stop_all(procs)


@pytest.fixture(scope="session")
def idle_stack(redis_server, s3_server, tmp_path_factory):
    """An API whose queue no worker consumes: jobs stay queued (listing, idempotency,
    validation, cancelling queued jobs)."""
    stack, procs = _make_stack(redis_server, s3_server, tmp_path_factory.mktemp("idle"), with_worker=False,
                               webhook_secret="whsec_" + "c2VjcmV0LWZvci10ZXN0cw==", webhook_allow_http_loopback=True)
    yield stack
    stack.http.close()
    _stop_all(procs)


STRICT_LIMITS = dict(max_body_bytes=65536, max_models=4, max_spec_string_length=300, max_queued_per_tenant=3)


@pytest.fixture(scope="session")
def strict_stack(redis_server, s3_server, tmp_path_factory):
    """An API (no worker) with production webhook rules (https to public addresses only),
    small limits (``STRICT_LIMITS``) and a local root (``stack.local_root``) that keys
    allowed any location may use. Tests here make a fresh tenant each, so queue quotas
    never collide."""
    root = tmp_path_factory.mktemp("local-root")
    stack, procs = _make_stack(redis_server, s3_server, tmp_path_factory.mktemp("strict"), with_worker=False,
                               allow_local_root=str(root), webhook_secret="strict-stack-signing-secret",
                               **STRICT_LIMITS)
    stack.local_root = str(root)
    yield stack
    stack.http.close()
    _stop_all(procs)


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


@pytest.fixture
def family(tmp_path, s3_client, s3_bucket):
    """A small model family uploaded to ``s3_bucket``: ``family.uris[name]``,
    ``family.local[name]``, ``family.spec(**overrides)`` (a DRM spec over all of it)."""
    return _family(tmp_path, s3_client, s3_bucket)


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


@pytest.fixture
def slow_family(tmp_path, s3_client, s3_bucket):
    """Many small tensors: a merge that runs for seconds (reads dominate), long enough to
    cancel or time out in the middle."""
    return _family(tmp_path, s3_client, s3_bucket, prefix="slow/", n_layers=80, dim=8)

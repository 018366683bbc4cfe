"""A service stack for reliability tests: the real API and worker processes
(``drmerge api``, ``drmerge worker``) on a Redis and an S3 endpoint of the test's choosing
(its own Redis to restart, a fault-injecting proxy in front of S3), with workers that can
be started, SIGKILLed and SIGTERMed one by one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid

from service.jobs.status import TERMINAL
from tests.conftest import SERVICE_TEST_SETTINGS, list_keys
from tests.support.servers import FaultyS3Proxy, free_port

# Fast failure detection: a job whose worker is gone is re-queued ~3 s later.
FAST_RECOVERY = dict(worker_heartbeat_s=0.3, worker_heartbeat_ttl_s=2.0, job_heartbeat_timeout_s=3.0,
                     reaper_interval_s=0.3)


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Stack:
    def __init__(self, redis_url: str, s3_server, log_dir, *, s3_endpoint_url: str | None = None,
                 api: bool = True, **overrides):
        import httpx

        from drmerge_ops.processes import service_env
        from service.jobs.store import JobStore
        from service.settings import Settings

        self.prefix = f"r{uuid.uuid4().hex[:10]}"
        self.log_dir = str(log_dir)
        kw = dict(SERVICE_TEST_SETTINGS, key_prefix=self.prefix, queue=f"{self.prefix}-merges",
                  api_key_pepper=f"pepper-{uuid.uuid4().hex}")
        kw.update(overrides)
        endpoint = s3_endpoint_url or s3_server.endpoint_url
        self.env = service_env(redis_url, s3_server.env(), **kw)
        self.env["DRMERGE_S3_ENDPOINT_URL"] = endpoint
        self.env["OMP_NUM_THREADS"] = "1"
        self.settings = Settings(redis_url=redis_url, s3_endpoint_url=endpoint, **kw)
        self.store = JobStore.from_url(redis_url, prefix=self.prefix)
        self.workers: dict[str, subprocess.Popen] = {}
        self.api_proc = None
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        from service.keys import KeyStore

        self.keys = KeyStore.from_settings(self.settings)
        self.api_key, _ = self.keys.create("reliability", allow=["*"])
        self.http = httpx.Client(base_url=self.api_url, timeout=30,
                                 headers={"authorization": f"Bearer {self.api_key}"})
        if api:
            self.start_api()

    # -- processes --------------------------------------------------------------------------
    def start_api(self) -> subprocess.Popen:
        from drmerge_ops.processes import start_api

        self.api_proc = start_api(self.env, self.port, os.path.join(self.log_dir, "api.log"))
        return self.api_proc

    def start_worker(self, name: str, env: dict | None = None) -> subprocess.Popen:
        from drmerge_ops.processes import start_worker

        full = f"{self.prefix}-{name}@test"
        proc = start_worker(dict(self.env, **(env or {})), full, os.path.join(self.log_dir, f"worker-{name}.log"))
        self.workers[name] = proc
        return proc

    def worker_name(self, name: str) -> str:
        return f"{self.prefix}-{name}@test"

    def kill_worker(self, name: str) -> None:
        """SIGKILL: no handler runs, nothing is cleaned up, nothing is acknowledged."""
        proc = self.workers[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        from drmerge_ops.processes import stop_process

        for proc in self.workers.values():
            stop_process(proc, 20)
        if self.api_proc is not None:
            stop_process(self.api_proc, 20)
        self.http.close()
        try:
            for key in self.store.r.scan_iter(f"{self.prefix}:*"):
                self.store.r.delete(key)
        except Exception:
            pass
        self.store.r.close()
        self.keys.r.close()

    def log_tail(self, n: int = 6000) -> str:
        out = []
        for name in sorted(os.listdir(self.log_dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.log_dir, name), "rb") as f:
                    out.append(f"--- {name} ---\n" + f.read()[-n:].decode("utf-8", "replace"))
        return "\n".join(out)

    # -- the API ----------------------------------------------------------------------------
    def submit(self, spec: dict, **body) -> dict:
        r = self.http.post("/v1/merges", json={"spec": spec, **body})
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/merges/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, job_id: str) -> list[dict]:
        return self.http.get(f"/v1/merges/{job_id}/events", params={"limit": 1000}).json()["data"]

    def wait_for(self, job_id: str, pred, timeout: float = 120.0, what: str = "a job state") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if pred(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what} of {job_id}: {job}\n{self.log_tail()}")
            time.sleep(0.05)

    def wait(self, job_id: str, timeout: float = 120.0) -> dict:
        return self.wait_for(job_id, lambda j: j["status"] in TERMINAL, timeout, "the end")


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
    from tests.conftest import upload_folder, write_many_shards

    uris = {label: upload_folder(s3_client, write_many_shards(tmp_path / label, SLOW_PLAN_SHARDS, seed=i),
                                 s3_bucket, f"slowplan/{label}") for i, label in enumerate(("base", "ft"))}
    proxy.add("delay", lambda m, p, q: m in ("GET", "HEAD") and "/slowplan/" in p, seconds=0.2)
    return {"base_model": uris["base"], "models": [uris["ft"]], "method": "task_arithmetic",
            "output": f"s3://{s3_bucket}/{output}"}


def shard_headers_read(proxy: FaultyS3Proxy) -> set[str]:
    return {p for m, p, q, _ in list(proxy.log) if m == "GET" and "/slowplan/" in p and p.endswith(".safetensors")}

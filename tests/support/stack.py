"""The service stack of the tests: the real API and Celery worker processes
(``drmerge api``, ``drmerge worker``) on a Redis and an S3 endpoint of the test's choosing.

One harness for two uses. The session stacks of tests/conftest.py (``service_stack``,
``idle_stack``, ``strict_stack``) are one API with one worker or none, shared by many
tests. The reliability tests make their own per test: their own Redis to restart, a
fault-injecting proxy in front of S3, several workers started, SIGKILLed and SIGTERMed
one by one. Each stack has its own Redis key prefix and queue, so stacks (and test
sessions) never see each other's jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

from service.jobs.status import TERMINAL
from tests.support.servers import free_port

# Short intervals so tests see progress, heartbeats and webhook retries in well under a second.
SERVICE_TEST_SETTINGS = dict(
    progress_interval_s=0.05, worker_heartbeat_s=0.5, worker_heartbeat_ttl_s=5.0, worker_device="cpu",
    webhook_backoff_base_s=0.2, webhook_backoff_max_s=1.0, webhook_poll_s=0.1, webhook_max_attempts=4,
    webhook_timeout_s=5.0,
)

# The limits of ``strict_stack``.
STRICT_LIMITS = dict(max_body_bytes=65536, max_models=4, max_spec_string_length=300, max_queued_per_tenant=3)

# Fast failure detection: a job whose worker is gone is re-queued ~3 s later.
FAST_RECOVERY = dict(worker_heartbeat_s=0.3, worker_heartbeat_ttl_s=2.0, job_heartbeat_timeout_s=3.0,
                     reaper_interval_s=0.3)


def wait_until(pred, timeout: float, what: str, interval: float = 0.05, detail=None):
    """Poll ``pred`` until it returns something truthy, and return that; after
    ``timeout`` seconds fail naming ``what`` (and ``detail()``, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {detail()}" if detail else ""))
        time.sleep(interval)


class Stack:
    """The API (started at once unless ``api=False``) and the workers a test starts, on
    ``redis_url`` and ``s3_server`` (or ``s3_endpoint_url``, e.g. a proxy in front of it).
    ``overrides`` are Settings fields on top of SERVICE_TEST_SETTINGS; ``timeout`` is the
    default of ``wait``/``wait_for``. ``http`` is a client authenticated with ``api_key``,
    a key of ``tenant`` that may use any location. ``stop()`` ends it all."""

    def __init__(self, redis_url: str, s3_server, log_dir, *, s3_endpoint_url: str | None = None,
                 api: bool = True, tenant: str = "tests", timeout: float = 120.0, **overrides):
        import httpx

        from drmerge_ops.processes import service_env
        from service.jobs.store import JobStore
        from service.keys import KeyStore
        from service.settings import Settings

        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.log_dir = str(log_dir)
        self.tenant = tenant
        self.timeout = timeout
        kw = dict(SERVICE_TEST_SETTINGS, key_prefix=self.prefix, queue=f"{self.prefix}-merges",
                  api_key_pepper=f"pepper-{uuid.uuid4().hex}")
        kw.update(overrides)
        endpoint = s3_endpoint_url or s3_server.endpoint_url
        self.env = service_env(redis_url, s3_server.env(), **kw)
        self.env["DRMERGE_S3_ENDPOINT_URL"] = endpoint
        # One BLAS/OpenMP thread: on a busy 2-core CI box, spinning OpenMP threads make tiny
        # merges ten times slower, and these tests are about the service, not throughput.
        self.env["OMP_NUM_THREADS"] = "1"
        self.settings = Settings(redis_url=redis_url, s3_endpoint_url=endpoint, **kw)
        self.store = JobStore.from_url(redis_url, prefix=self.prefix)  # the same Redis/prefix, for inspection
        self.keys = KeyStore.from_settings(self.settings)
        self.api_key, _ = self.keys.create(tenant, allow=["*"])
        self.workers: dict[str | None, subprocess.Popen] = {}
        self.api_proc = None
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.api_url, timeout=30,
                                 headers={"authorization": f"Bearer {self.api_key}"})
        if api:
            self.start_api()

    # -- processes --------------------------------------------------------------------------
    def start_api(self) -> subprocess.Popen:
        from drmerge_ops.processes import start_api

        self.api_proc = start_api(self.env, self.port, os.path.join(self.log_dir, "api.log"))
        return self.api_proc

    def start_worker(self, name: str | None = None, env: dict | None = None) -> subprocess.Popen:
        """A worker process (``env`` on top of the stack's); ``name`` tells several apart,
        none is the stack's one worker (log ``worker.log``)."""
        from drmerge_ops.processes import start_worker

        log = f"worker-{name}.log" if name else "worker.log"
        proc = start_worker(dict(self.env, **(env or {})), self.worker_name(name), os.path.join(self.log_dir, log))
        self.workers[name] = proc
        return proc

    def worker_name(self, name: str | None = None) -> str:
        """The Celery node name of worker ``name`` (as jobs and the registry record it)."""
        return f"{self.prefix}-{name}@test" if name else f"{self.prefix}@test"

    def kill_worker(self, name: str | None = None) -> None:
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
        return "\n".join(out) or "(no logs)"

    # -- the API ----------------------------------------------------------------------------
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

    def events(self, job_id: str) -> list[dict]:
        return self.http.get(f"/v1/merges/{job_id}/events", params={"limit": 1000}).json()["data"]

    def wait_for(self, job_id: str, pred, timeout: float | None = None, what: str = "a job state",
                 interval: float = 0.05) -> dict:
        """The job, once ``pred(job)`` holds."""
        seen = {}

        def check():
            seen["job"] = job = self.job(job_id)
            return job if pred(job) else None

        return wait_until(check, self.timeout if timeout is None else timeout, f"{what} of {job_id}", interval,
                          detail=lambda: f"{seen.get('job')}\n{self.log_tail()}")

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        return self.wait_for(job_id, lambda j: j["status"] in TERMINAL, timeout, "the end")

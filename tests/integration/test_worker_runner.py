"""The worker's job rules (worker.runner) in-process, on a real Redis and a real S3:
which deliveries run, redelivery after a lost worker, attempt limits, the time limit."""

from __future__ import annotations

import time
import uuid

import pytest

from service.jobs.store import JobStore
from service.settings import Settings
from worker.runner import JobRunner
from tests.support.checkpoints import list_keys

# Credentials reach the engine the way they do on a real worker: AWS_* variables.
pytestmark = pytest.mark.usefixtures("aws_env")


def settings(s3_server, **kw) -> Settings:
    return Settings(s3_endpoint_url=s3_server.endpoint_url, worker_device="cpu", progress_interval_s=0.01,
                    worker_heartbeat_ttl_s=5, **kw)


def queued(store, spec=None) -> str:
    job, _ = store.create(spec or {"method": "drm"}, f"s3://bkt/{uuid.uuid4().hex}/")
    return job.id


def test_a_queued_job_is_claimed_once(store, s3_server):
    job_id = queued(store)
    a = JobRunner(store, settings(s3_server), "worker-a")
    b = JobRunner(store, settings(s3_server), "worker-b")
    assert a.claim(job_id) == 1
    store.workers.heartbeat("worker-a", {}, ttl_s=5)
    assert b.claim(job_id) is None  # a duplicate delivery while worker-a is alive
    job = store.require(job_id)
    assert job.status == "running" and job.worker == "worker-a" and job.attempts == 1 and job.started_at


def test_a_job_whose_worker_died_is_claimed_again(store, s3_server):
    job_id = queued(store)
    assert JobRunner(store, settings(s3_server), "worker-a").claim(job_id) == 1
    first_start = store.require(job_id).started_at
    # worker-a never sent a heartbeat (or it expired): its message comes back to worker-b
    assert JobRunner(store, settings(s3_server), "worker-b").claim(job_id) == 2
    job = store.require(job_id)
    assert job.worker == "worker-b" and job.attempts == 2 and job.started_at == first_start
    assert any("worker-a was lost" in e["message"] for e in store.events(job_id))
    # the lost attempt can no longer write
    assert not store.write_progress(job_id, 1, {"stage": "zombie"})


def test_a_job_that_keeps_killing_workers_fails(store, s3_server):
    job_id = queued(store)
    s = settings(s3_server, job_max_attempts=2)
    assert JobRunner(store, s, "w1").claim(job_id) == 1
    assert JobRunner(store, s, "w2").claim(job_id) == 2
    assert JobRunner(store, s, "w3").claim(job_id) is None
    job = store.require(job_id)
    assert job.status == "failed" and job.error["code"] == "internal_error" and "lost 2 workers" in job.error["message"]


def test_cancelled_finished_and_unknown_jobs_never_run(store, s3_server):
    runner = JobRunner(store, settings(s3_server), "w")
    cancelled = queued(store)
    store.request_cancel(cancelled)
    assert runner.run(cancelled) is None
    assert store.require(cancelled).started_at is None
    cancelling = queued(store)
    runner.claim(cancelling)
    store.request_cancel(cancelling)  # then the worker died before it saw the cancel
    assert JobRunner(store, settings(s3_server), "w2").run(cancelling) is None
    assert store.require(cancelling).status == "cancelled"
    assert runner.run("mrg_01zzzzzzzzzzzzzzzzzzzzzzzz") is None


def test_time_limit_fails_the_job_with_timeout_and_leaves_no_output(store, s3_server, s3_client, family):
    spec = family.spec("merged/too-slow/")
    from drmerge.spec import parse_spec

    job_id = queued(store, parse_spec(spec).to_dict())
    runner = JobRunner(store, settings(s3_server, job_time_limit_s=0), "w")
    assert runner.run(job_id) == "failed"
    job = store.require(job_id)
    assert job.error["code"] == "timeout" and "0s limit" in job.error["message"]
    assert list_keys(s3_client, family.bucket, "merged/too-slow/") == []


def test_engine_errors_are_recorded_with_their_code(store, s3_server, family, s3_bucket):
    from drmerge.spec import parse_spec

    spec = family.spec("merged/x/")
    spec["models"][0] = {"model": f"s3://{s3_bucket}/nothing-here/"}
    job_id = queued(store, parse_spec(spec).to_dict())
    t0 = time.monotonic()
    assert JobRunner(store, settings(s3_server), "w").run(job_id) == "failed"
    assert time.monotonic() - t0 < 120
    job = store.require(job_id)
    assert job.error["code"] == "input_not_found" and job.result is None and job.finished_at


def test_the_outcome_survives_a_redis_restart(tmp_path, s3_server):
    """A merge's result is written even if Redis is away for a moment when it ends."""
    import threading

    from tests.support.servers import start_redis

    server = start_redis(tmp_path / "redis", appendonly=True)
    port = server.port
    store = JobStore.from_url(server.url, prefix="restart")
    store.r.config_set("appendfsync", "always")  # every write is on disk before the reply: no sleep
    holder: dict = {}
    try:
        job_id = queued(store)
        runner = JobRunner(store, settings(s3_server), "w")
        attempt = runner.claim(job_id)
        server.stop()

        def restart():
            time.sleep(1.0)
            holder["server"] = start_redis(tmp_path / "redis", port=port, appendonly=True)

        t = threading.Thread(target=restart)
        t.start()
        status = runner._finish(job_id, "succeeded", attempt, from_={"running"}, message="succeeded",
                                result={"output": "s3://bkt/o/", "files": []})
        t.join()
        assert status == "succeeded"
        assert store.require(job_id).status == "succeeded"
    finally:
        store.r.close()
        server.stop()
        if "server" in holder:
            holder["server"].stop()


def test_the_time_limit_applies_while_planning(store, s3_server, s3_client, s3_bucket, tmp_path):
    """The deadline is checked inside planning too (it rides on the engine's cancel hook):
    a plan that reads 80 shard headers over a slow S3 (~50 s) is stopped at the limit."""
    from drmerge.spec import parse_spec
    from tests.support.servers import FaultyS3Proxy
    from tests.support.checkpoints import SLOW_PLAN_SHARDS, shard_headers_read, slow_plan_spec

    with FaultyS3Proxy(s3_server.endpoint_url) as proxy:
        spec = parse_spec(slow_plan_spec(s3_client, s3_bucket, tmp_path, proxy, "merged/slow-plan/")).to_dict()
        s = Settings(s3_endpoint_url=proxy.url, worker_device="cpu", progress_interval_s=0.01,
                     worker_heartbeat_ttl_s=5, job_time_limit_s=2)
        job_id = queued(store, spec)
        t0 = time.monotonic()
        assert JobRunner(store, s, "w").run(job_id) == "failed"
        assert time.monotonic() - t0 < 30  # the whole plan would take ~50 s
        assert len(shard_headers_read(proxy)) < 2 * SLOW_PLAN_SHARDS
    job = store.require(job_id)
    assert job.error["code"] == "timeout" and "2s limit" in job.error["message"], job.error
    assert job.progress["tensors_done"] == 0
    assert list_keys(s3_client, s3_bucket, "merged/slow-plan/") == []

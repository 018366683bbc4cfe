"""Stuck jobs and hand-backs, in-process on a real Redis (and a real S3 where output is
involved): job heartbeats, the reaper's decisions and their fencing with several replicas,
the shutdown hand-back and the resume that follows it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from service.reaper import Reaper
from service.settings import Settings
from tests.support.checkpoints import list_keys
from worker.runner import JobRunner

# Credentials reach the engine the way they do on a real worker: AWS_* variables.
pytestmark = pytest.mark.usefixtures("aws_env")


def settings(s3_server, **kw) -> Settings:
    base = dict(s3_endpoint_url=s3_server.endpoint_url, worker_device="cpu", progress_interval_s=0.01,
                worker_heartbeat_s=0.2, worker_heartbeat_ttl_s=5, job_heartbeat_timeout_s=0.6,
                reaper_interval_s=0.1, job_max_attempts=3)
    base.update(kw)
    return Settings(**base)


class Sent(list):
    """The reaper's enqueue callable: records the job ids it was asked to send (and, in
    ``queues``, the queue each went to)."""

    def __init__(self):
        super().__init__()
        self.queues: list[str] = []

    def __call__(self, job_id, queue):
        self.append(job_id)
        self.queues.append(queue)


JOB_QUEUE = "pool-a"  # the queue the test jobs were submitted to; the settings' default differs


def queued(store, spec=None, output=None) -> str:
    job, _ = store.create(spec or {"method": "drm"}, output or f"s3://bkt/{uuid.uuid4().hex}/", queue=JOB_QUEUE)
    return job.id


def claimed(store, s, worker="w-a", spec=None, output=None) -> tuple[str, JobRunner]:
    job_id = queued(store, spec, output)
    runner = JobRunner(store, s, worker)
    assert runner.claim(job_id) is not None
    store.job_heartbeat(job_id, store.require(job_id).attempts)
    return job_id, runner


def wait_until_stale(store, job_id: str, s: Settings, timeout=10.0) -> None:
    """Poll until the job's heartbeat is older than the timeout by the Redis clock (the
    reaper's own test), instead of sleeping a guessed interval."""
    deadline = time.monotonic() + timeout
    while True:
        hb, updated = store.r.hmget(store.keys.job(job_id), "heartbeat_at", "updated_at")
        if store.server_time() - float(hb or updated or 0) >= s.job_heartbeat_timeout_s:
            return
        assert time.monotonic() < deadline, "the heartbeat never went stale"
        time.sleep(0.02)


def sweep_until(reaper: Reaper, pred, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done = reaper.sweep(force=True)
        if pred(done):
            return done
        assert time.monotonic() < deadline, "the reaper never acted"
        time.sleep(0.05)


def test_a_job_with_a_fresh_heartbeat_is_left_alone(store, s3_server):
    s = settings(s3_server)
    job_id, runner = claimed(store, s)
    reaper = Reaper(store, s, Sent())
    stop = time.monotonic() + 2 * s.job_heartbeat_timeout_s
    while time.monotonic() < stop:  # the owner keeps stamping its heartbeat
        runner.current_job, runner.current_attempt = job_id, 1
        runner.heartbeat_job()
        assert reaper.sweep(force=True)["requeued"] == []
        time.sleep(0.05)
    assert store.require(job_id).status == "running" and not runner._lost.is_set()


def test_a_vanished_worker_s_job_is_requeued_once_even_with_several_reapers(store, s3_server):
    s = settings(s3_server)
    job_id, runner = claimed(store, s)
    sent = Sent()
    reapers = [Reaper(store, s, sent, name=f"r{i}") for i in range(4)]
    results: list[dict] = []
    barrier = threading.Barrier(len(reapers))
    wait_until_stale(store, job_id, s)

    def go(r):
        barrier.wait()
        results.append(r.sweep(force=True))  # force: no lease, the Lua fencing alone must hold

    threads = [threading.Thread(target=go, args=(r,)) for r in reapers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r["requeued"]) for r in results) == 1 and sent == [job_id]
    job = store.require(job_id)
    assert job.status == "queued" and job.worker is None and job.enqueued_at and job.attempts == 1
    events = [e for e in store.events(job_id) if e["type"] == "status"]
    assert [e["to"] for e in events] == ["queued", "running", "queued"]
    assert "w-a vanished" in events[-1]["message"] and "re-queued" in events[-1]["message"]
    # the old attempt learns it lost the job at its next heartbeat
    runner.current_job, runner.current_attempt = job_id, 1
    runner.heartbeat_job()
    assert runner._lost.is_set()
    assert not store.write_progress(job_id, 1, {"stage": "zombie"})
    # the next claim resumes it as attempt 2
    assert JobRunner(store, s, "w-b").claim(job_id) == 2


def test_one_reaper_sweeps_at_a_time_and_waits_after_reconnecting(store, s3_server):
    s = settings(s3_server, worker_heartbeat_s=0.3)
    job_id, _ = claimed(store, s)
    wait_until_stale(store, job_id, s)
    a, b = Reaper(store, s, Sent(), name="a"), Reaper(store, s, Sent(), name="b")
    assert a.sweep()["requeued"] == []  # first contact: give workers two heartbeats first
    assert b.sweep()["requeued"] == []  # a holds the lease
    deadline = time.monotonic() + 10
    while not (done := a.sweep())["requeued"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done["requeued"] == [job_id]
    a.stop()  # gives the lease up
    assert store.r.get(a.lease_key) is None


def test_a_job_that_lost_too_many_workers_fails_with_internal_error_and_is_cleaned(store, s3_server, s3_client, family):
    from drmerge.spec import parse_spec

    s = settings(s3_server, job_max_attempts=2)
    spec = parse_spec(family.spec("merged/abandoned/")).to_dict()
    job_id = queued(store, spec, spec["output"])
    reaper = Reaper(store, s, Sent())
    for attempt, worker in ((1, "w1"), (2, "w2")):
        assert JobRunner(store, s, worker).claim(job_id) == attempt
        store.job_heartbeat(job_id, attempt)
        if attempt == 1:
            sweep_until(reaper, lambda d: d["requeued"])
    # attempt 2 committed a shard and left an upload behind, then vanished too
    s3_client.put_object(Bucket=family.bucket, Key="merged/abandoned/model.safetensors", Body=b"x" * 100)
    store.record_shard(job_id, 2, {"name": "model.safetensors", "size": 100, "sha256": "0" * 64, "plan": "p"})
    s3_client.create_multipart_upload(Bucket=family.bucket, Key="merged/abandoned/model.safetensors")
    sent = Sent()
    reaper.enqueue = sent
    sweep_until(reaper, lambda d: d["failed"] == [job_id])
    job = store.require(job_id)
    assert job.status == "failed" and job.error["code"] == "internal_error" and "lost 2 workers" in job.error["message"]
    assert job.cleanup == "pending" and sent == [job_id]  # a message for a worker to clean up
    assert store.r.hget(store.keys.outputs, spec["output"]) == job_id  # reserved until it is clean
    # the worker that receives it removes the partial output and drops the message
    assert JobRunner(store, s, "w3").run(job_id) is None
    assert list_keys(s3_client, family.bucket, "merged/abandoned/") == []
    assert not s3_client.list_multipart_uploads(Bucket=family.bucket).get("Uploads")
    assert store.require(job_id).cleanup is None
    assert store.r.hget(store.keys.outputs, spec["output"]) is None
    assert store.r.zscore(store.keys.cleanup_due, job_id) is None
    assert any(e["type"] == "cleanup" for e in store.events(job_id))


def test_a_stale_cancelling_job_is_cancelled(store, s3_server):
    s = settings(s3_server)
    job_id, _ = claimed(store, s)
    store.request_cancel(job_id)
    sweep_until(Reaper(store, s, Sent()), lambda d: d["cancelled"] == [job_id])
    job = store.require(job_id)
    assert job.status == "cancelled" and job.cleanup == "pending"


def test_a_queued_job_whose_message_was_never_sent_is_sent(store, s3_server):
    s = settings(s3_server, job_heartbeat_timeout_s=0.3)
    job_id = queued(store)  # the API stored it and died before publishing
    sent = Sent()
    sweep_until(Reaper(store, s, sent), lambda d: d["sent"] == [job_id])
    assert sent == [job_id] and store.require(job_id).enqueued_at
    assert Reaper(store, s, sent).sweep(force=True)["sent"] == []  # once


def test_shutdown_hands_the_job_back_and_the_next_attempt_resumes(store, s3_server, s3_client, s3_bucket,
                                                                  tmp_path):
    """What SIGTERM does to a running merge, in-process: stop at the next tensor, keep the
    committed shards, back to the queue with a fresh message; then another worker verifies
    the shards, merges the rest, and the output equals a clean run."""
    from drmerge.pipeline import run_merge
    from drmerge.spec import parse_spec
    from tests.support.checkpoints import _family

    fam = _family(tmp_path, s3_client, s3_bucket, n_layers=12, dim=48)
    spec = parse_spec(fam.spec("merged/handback/", shard_size="20KB")).to_dict()
    s = settings(s3_server)
    job_id = queued(store, spec, spec["output"])
    sent = Sent()
    first = JobRunner(store, s, "w-a", enqueue=sent)
    shards_seen = threading.Event()

    def watch():
        while not shards_seen.is_set():
            if len(store.require(job_id).shards) >= 2:
                first.shutting_down.set()  # what the worker's SIGTERM hook does
                shards_seen.set()
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert first.run(job_id) == "queued"
    shards_seen.set()
    job = store.require(job_id)
    assert job.status == "queued" and job.handoffs == 1 and job.lost == 0 and sent == [job_id]
    kept = [e["name"] for e in job.shards]
    assert len(kept) >= 2
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # the open shard was aborted
    events = [e for e in store.events(job_id) if e["type"] == "status"]
    assert "shutting down" in events[-1]["message"] and "kept" in events[-1]["message"]
    second = JobRunner(store, s, "w-b", enqueue=sent)
    assert second.run(job_id) == "succeeded"
    job = store.require(job_id)
    assert job.attempts == 2 and job.result["resumed"]["shards_kept"] >= len(kept)
    assert "resumed" in [e for e in store.events(job_id) if e["type"] == "status"][-1]["message"]
    assert any(e["type"] == "resume" for e in store.events(job_id))
    clean = run_merge(parse_spec(fam.spec("clean/", shard_size="20KB")), device="cpu")
    assert job.result["files"] == clean.files


def test_a_zombie_attempt_never_deletes_the_newer_attempt_s_shards(store, s3_server, s3_client, s3_bucket, tmp_path):
    """A worker whose job was re-queued while it still ran (its heartbeats stalled) and
    then fails must not clean up: the output belongs to the newer attempt, which keeps
    the shards already committed."""
    from drmerge.spec import parse_spec
    from tests.support.checkpoints import _family

    fam = _family(tmp_path, s3_client, s3_bucket, n_layers=12, dim=48)
    spec = parse_spec(fam.spec("merged/zombie/", shard_size="20KB")).to_dict()
    s = settings(s3_server)
    job_id = queued(store, spec, spec["output"])
    zombie = JobRunner(store, s, "w-zombie")  # in-process: no heartbeat thread tells it anything

    def take_over():
        deadline = time.monotonic() + 60
        while len(store.require(job_id).shards) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        store.transition(job_id, "queued", from_={"running"}, attempt=1, fields={"worker": ""},
                         message="re-queued (test: the reaper found its heartbeat stale)")
        assert JobRunner(store, s, "w-new").claim(job_id) == 2
        s3_client.delete_object(Bucket=s3_bucket, Key="ft-1/model.safetensors")  # the zombie will fail

    t = threading.Thread(target=take_over)
    t.start()
    assert zombie.run(job_id) is None  # neither failed nor handed back: it just stopped
    t.join()
    job = store.require(job_id)
    assert job.status == "running" and job.attempts == 2 and job.worker == "w-new" and job.error is None
    keys = list_keys(s3_client, s3_bucket, "merged/zombie/")
    assert {f"merged/zombie/{e['name']}" for e in job.shards} <= set(keys)
    assert zombie._lost.is_set()


def test_every_resend_goes_to_the_job_s_own_queue(store, s3_server):
    """A reaper serves pools on several queues: the re-queue, the unsent re-send, the
    cleanup request and a worker's hand-back all go to the queue the job was submitted to,
    never to the sending process's own DRMERGE_QUEUE (issue 18: a poison job re-queued
    to the reaper's default queue reached a worker pool it was never sent to)."""
    s = settings(s3_server, queue="pool-b", job_max_attempts=2)
    assert s.queue != JOB_QUEUE
    sent = Sent()
    reaper = Reaper(store, s, sent)
    requeued, _ = claimed(store, s)
    sweep_until(reaper, lambda d: d["requeued"] == [requeued])
    unsent = queued(store)
    sweep_until(reaper, lambda d: d["sent"] == [unsent])
    # a job that lost its second worker too: failed, and a cleanup request is sent
    assert JobRunner(store, s, "w-b").claim(requeued) == 2
    store.job_heartbeat(requeued, 2)
    sweep_until(reaper, lambda d: d["failed"] == [requeued])
    assert sent == [requeued, unsent, requeued] and sent.queues == [JOB_QUEUE] * 3
    # a worker handing a job back on shutdown sends it to the job's queue too
    handback = Sent()
    runner = JobRunner(store, s, "w-c", enqueue=handback)
    job_id = queued(store)
    attempt = runner.claim(job_id)
    runner._hand_back(job_id, attempt, {}, None)
    assert handback == [job_id] and handback.queues == [JOB_QUEUE]
    assert store.require(job_id).queue == JOB_QUEUE
    # a record made before jobs had a queue falls back to the sender's own
    legacy = queued(store)
    store.r.hdel(store.keys.job(legacy), "queue")
    sweep_until(reaper, lambda d: d["sent"] == [legacy])
    assert sent.queues[-1] == "pool-b"


def test_a_cleanup_that_cannot_reach_s3_is_retried_with_backoff_then_given_up(store, s3_server):
    """A merge whose own cleanup failed (S3 unreachable) ends with its real error and
    ``cleanup: pending``; its output stays reserved; the reaper sends it to a worker again
    with exponential backoff, and after DRMERGE_CLEANUP_MAX_ATTEMPTS gives up, says what
    is left and releases the output."""
    from drmerge.errors import MergeError
    from drmerge.spec import parse_spec
    from service.jobs.errors import OutputBusy

    s = settings(s3_server, cleanup_backoff_base_s=10.0, cleanup_backoff_max_s=15.0, cleanup_max_attempts=2)
    spec = parse_spec({"base_model": "s3://bkt/base/", "models": ["s3://bkt/ft/"],
                       "output": f"s3://bkt/{uuid.uuid4().hex}/"}).to_dict()

    def failing_merge(*_, **__):
        e = MergeError("storage_error", "S3 failed to write s3://bkt/o/model-00002-of-00002.safetensors")
        e.cleanup_pending = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        raise e

    job_id = queued(store, spec, spec["output"])
    t0 = time.time()
    assert JobRunner(store, s, "w-a", run_merge=failing_merge).run(job_id) == "failed"
    job = store.require(job_id)
    assert job.error["code"] == "storage_error" and "write" in job.error["message"]  # the merge's own error
    assert job.cleanup == "pending" and job.cleanup_files == ["model-00001-of-00002.safetensors",
                                                              "model-00002-of-00002.safetensors"]
    assert "removal is retried" in [e for e in store.events(job_id) if e["type"] == "status"][-1]["message"]
    due = store.r.zscore(store.keys.cleanup_due, job_id)
    assert t0 + 10.0 - 0.01 <= due <= time.time() + 10.0 + 0.01  # (stored to the millisecond)
    with pytest.raises(OutputBusy):  # nobody writes there before it is clean
        store.create(spec, spec["output"])

    sent = Sent()
    reaper = Reaper(store, s, sent)
    assert reaper.sweep(force=True)["cleanup"] == []  # not due yet
    for attempt, delay in ((1, 10.0), (2, 15.0)):  # base, then 2 x base capped at the max
        store.r.zadd(store.keys.cleanup_due, {job_id: time.time() - 1})  # (instead of waiting for it)
        before = time.time()
        assert reaper.sweep(force=True)["cleanup"] == [job_id]
        assert before + delay - 0.01 <= store.r.zscore(store.keys.cleanup_due, job_id) <= time.time() + delay + 0.01
        assert int(store.r.hget(store.keys.job(job_id), "cleanup_attempts")) == attempt
    assert sent == [job_id, job_id] and sent.queues == [JOB_QUEUE] * 2  # a worker gets the job's id each time

    store.r.zadd(store.keys.cleanup_due, {job_id: time.time() - 1})
    assert reaper.sweep(force=True)["cleanup_given_up"] == [job_id]
    job = store.require(job_id)
    assert job.cleanup == "failed" and job.status == "failed" and job.error["code"] == "storage_error"
    assert store.r.zscore(store.keys.cleanup_due, job_id) is None
    last = store.events(job_id)[-1]
    assert last["type"] == "cleanup" and last["outcome"] == "failed"
    assert "model-00001-of-00002.safetensors" in last["message"] and "by hand" in last["message"]
    store.create(spec, spec["output"])  # the output is released
    assert JobRunner(store, s, "w-b").run(job_id) is None  # a late message changes nothing
    assert store.require(job_id).cleanup == "failed"

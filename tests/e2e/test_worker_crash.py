"""A worker SIGKILLed in the middle of a merge, as real processes: the reaper notices the
job's heartbeat stopped and re-queues it, another worker aborts the upload the dead one
left open, verifies the shard it committed and merges the rest; the output equals an
uninterrupted local merge byte for byte."""

from __future__ import annotations

import pytest

from tests.support.checkpoints import _family, local_merge, object_fingerprints, output_files, pending_uploads
from tests.support.servers import FaultyS3Proxy
from tests.support.stack import FAST_RECOVERY, Stack, wait_until

pytestmark = pytest.mark.slow


def tensor_names(shard: bytes) -> list[str]:
    import json
    import struct

    (n,) = struct.unpack("<Q", shard[:8])
    return [k for k in json.loads(shard[8:8 + n]) if k != "__metadata__"]


def statuses(events) -> list[str]:
    return [e["to"] for e in events if e["type"] == "status"]


def test_kill_9_mid_merge_the_job_is_resumed_by_another_worker(redis_server, s3_server, s3_client, s3_bucket,
                                                               tmp_path):
    # Two multipart shards (> 8 MiB each). The proxy holds the second shard's completion,
    # so the worker is killed with that upload's parts sent and the upload still open:
    # exactly what SIGKILL leaves behind on S3.
    fam = _family(tmp_path, s3_client, s3_bucket, n_models=1, n_layers=4, dim=1024)
    spec = fam.spec("merged/crash/", method="task_arithmetic", shard_size="9MB")
    inputs_before = object_fingerprints(s3_client, s3_bucket)
    completion = lambda m, p, q: m == "POST" and "uploadId=" in q  # noqa: E731
    proxy = FaultyS3Proxy(s3_server.endpoint_url)
    proxy.add("pass", completion, count=1)
    proxy.add("hold", completion, count=1)
    stack = Stack(redis_server.url, s3_server, tmp_path / "logs", s3_endpoint_url=proxy.url, **FAST_RECOVERY)
    try:
        stack.start_worker("a")
        job = stack.submit(spec)
        wait_until(proxy.held.is_set, 150, "the second shard's upload to be in flight")
        journal = stack.store.require(job["id"]).shards
        assert [e["name"] for e in journal] == ["model-00001-of-00002.safetensors"]
        assert pending_uploads(s3_client, s3_bucket) == ["merged/crash/model-00002-of-00002.safetensors"]

        stack.kill_worker("a")
        proxy.release()  # the held request is dropped: its worker is gone anyway
        assert stack.job(job["id"])["status"] == "running"  # nobody has noticed yet
        stack.start_worker("b")
        done = stack.wait(job["id"], timeout=150)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        resumed = done["result"]["resumed"]
        assert resumed["shards_kept"] == 1 and 0 < resumed["tensors_skipped"] < done["result"]["tensors"]

        events = stack.events(job["id"])
        assert statuses(events) == ["queued", "running", "queued", "running", "succeeded"]
        messages = [e["message"] for e in events if e["type"] == "status"]
        assert "vanished" in messages[2] and "re-queued" in messages[2] and stack.worker_name("a") in messages[2]
        assert stack.worker_name("b") in messages[3] and "resuming" in messages[3]
        assert "resumed: 1 shard(s) verified and kept" in messages[4]
        assert any(e["type"] == "resume" for e in events)

        # the output: exactly a clean merge, no leftovers, no pending upload, inputs untouched
        expected = local_merge(spec, fam, tmp_path / "local")
        got = output_files(s3_client, done)
        assert sorted(got) == sorted(list(expected) + ["drmerge.json"])
        for name, data in expected.items():
            assert got[name] == data, name
        assert resumed["tensors_skipped"] == len(tensor_names(got["model-00001-of-00002.safetensors"]))
        assert pending_uploads(s3_client, s3_bucket) == []
        assert {k: v for k, v in object_fingerprints(s3_client, s3_bucket).items()
                if not k.startswith("merged/")} == inputs_before
    finally:
        stack.stop()
        proxy.stop()


def test_a_requeued_job_goes_back_to_its_own_queue(redis_server, s3_server, s3_client, s3_bucket, tmp_path):
    """Two worker pools on two queues. The job's worker is SIGKILLed and the one reaper
    left sweeping belongs to the other pool: the job is re-queued to the queue it was
    submitted to, so the other pool never sees it (issue 18: a poison job re-queued to the
    reaper's own default queue reached a pool it was never sent to), and a worker of its
    own pool resumes it."""
    import os

    import redis

    from drmerge_ops.processes import start_api

    fam = _family(tmp_path, s3_client, s3_bucket, prefix="slow/", n_layers=80, dim=8)  # seconds of reading
    spec = fam.spec("merged/own-queue/", method="task_arithmetic", shard_size="8KB")
    stack = Stack(redis_server.url, s3_server, tmp_path / "logs", api=False, **FAST_RECOVERY)
    broker = redis.Redis.from_url(redis_server.url)
    no_reaper = {"DRMERGE_REAPER_INTERVAL_S": "0"}
    try:
        stack.api_proc = start_api(dict(stack.env, **no_reaper), stack.port, os.path.join(stack.log_dir, "api.log"))
        other_queue = f"{stack.prefix}-other-pool"
        stack.start_worker("other", env={"DRMERGE_QUEUE": other_queue})  # the only reaper
        stack.start_worker("a", env=no_reaper)
        job = stack.submit(spec)
        stack.wait_for(job["id"], lambda j: j["status"] == "running" and j["progress"]["tensors_done"] > 0,
                       60, "the merge to be under way")
        stack.kill_worker("a")
        stack.wait_for(job["id"], lambda j: j["status"] == "queued", 60, "the re-queue")
        assert "re-queued" in [e for e in stack.events(job["id"]) if e["type"] == "status"][-1]["message"]
        # its message waits in its own queue on the broker; the other pool's queue is empty
        wait_until(lambda: broker.llen(stack.settings.queue) == 1, 10, "the message in the job's own queue")
        assert broker.llen(other_queue) == 0
        assert stack.store.require(job["id"]).queue == stack.settings.queue

        stack.start_worker("b")
        done = stack.wait(job["id"], timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        assert stack.store.require(job["id"]).worker == stack.worker_name("b")
        assert not any(stack.worker_name("other") in e["message"] for e in stack.events(job["id"]))
        assert stack.workers["other"].poll() is None  # alive, and it never ran the job
    finally:
        broker.close()
        stack.stop()

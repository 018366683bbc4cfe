"""A worker SIGKILLed in the middle of a merge, as real processes: the reaper notices the
job's heartbeat stopped and re-queues it, another worker aborts the upload the dead one
left open, verifies the shard it committed and merges the rest; the output equals an
uninterrupted local merge byte for byte."""

from __future__ import annotations

import pytest

from tests.conftest import _family
from tests.reliability_stack import (FAST_RECOVERY, Stack, local_merge, object_fingerprints, output_files,
                                     pending_uploads, wait_until)
from tests.servers import FaultyS3Proxy

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

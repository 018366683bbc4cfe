"""A worker stopped with SIGTERM in the middle of a merge, as real processes: it answers
health-check pings while it merges (threads pool), stops at the next tensor, hands the job
back with its committed shards, and exits 0; the next worker resumes and the output
equals an uninterrupted local merge byte for byte."""

from __future__ import annotations

import signal

import pytest

from tests.support.checkpoints import _family, list_keys, local_merge, output_files, pending_uploads
from tests.support.stack import FAST_RECOVERY, Stack, wait_until

pytestmark = pytest.mark.slow


def statuses(events) -> list[str]:
    return [e["to"] for e in events if e["type"] == "status"]


def test_sigterm_hands_the_job_back_and_the_worker_answers_pings_while_merging(redis_server, s3_server, s3_client,
                                                                                s3_bucket, tmp_path):
    from celery import Celery

    slow_family = _family(tmp_path, s3_client, s3_bucket, n_layers=40, dim=8)  # many small tensors and shards

    spec = slow_family.spec("merged/sigterm/", shard_size="2KB")
    stack = Stack(redis_server.url, s3_server, tmp_path / "logs", **FAST_RECOVERY)
    control = Celery("probe", broker=redis_server.url)
    try:
        proc = stack.start_worker("c")
        job = stack.submit(spec)
        wait_until(lambda: len(stack.store.require(job["id"]).shards) >= 3, 120, "three committed shards")
        # the threads pool keeps the main thread free: the node answers a broadcast ping mid-merge
        replies = control.control.ping(destination=[stack.worker_name("c")], timeout=10)
        assert replies and stack.worker_name("c") in replies[0]
        assert stack.job(job["id"])["status"] == "running"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        handed = stack.job(job["id"])
        assert handed["status"] == "queued", handed
        assert handed["progress"]["tensors_done"] < handed["progress"]["tensors_total"]
        message = [e for e in stack.events(job["id"]) if e["type"] == "status"][-1]["message"]
        assert "shutting down" in message and "handed back" in message
        kept = stack.store.require(job["id"]).shards
        assert len(kept) >= 3 and stack.store.require(job["id"]).handoffs == 1

        stack.start_worker("d")
        done = stack.wait(job["id"], timeout=150)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2 and done["result"]["resumed"]["shards_kept"] >= len(kept)
        assert statuses(stack.events(job["id"])) == ["queued", "running", "queued", "running", "succeeded"]
        expected = local_merge(spec, slow_family, tmp_path / "local")
        got = output_files(s3_client, done)
        assert sorted(got) == sorted(list(expected) + ["drmerge.json"])
        assert all(got[n] == expected[n] for n in expected)
        assert list_keys(s3_client, slow_family.bucket, "merged/sigterm/") and \
            pending_uploads(s3_client, slow_family.bucket) == []
    finally:
        control.close()
        stack.stop()

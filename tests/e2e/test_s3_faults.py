"""S3 misbehaving under a merge, through the whole service: the worker talks to S3 through
a proxy that answers 503 SlowDown and 500, drops connections and cuts responses in half.
Transient faults are retried with backoff and the merge equals a clean one byte for byte;
a permanent fault fails the job with ``storage_error`` and removes its partial output.
Inputs are never written to, whatever happens."""

from __future__ import annotations

import itertools
import threading

import pytest

from tests.support.checkpoints import (SLOW_PLAN_SHARDS, _family, list_keys, local_merge, object_fingerprints,
                                       output_files, pending_uploads, shard_headers_read, slow_plan_spec)
from tests.support.servers import FaultyS3Proxy
from tests.support.stack import Stack, wait_until

pytestmark = pytest.mark.slow


# The reaper sweeps often and retries cleanups quickly, so the outage test sees them.
FAST_CLEANUP = dict(reaper_interval_s=0.3, cleanup_backoff_base_s=0.5, cleanup_backoff_max_s=4.0)


@pytest.fixture(scope="module")
def faulty(redis_server, s3_server, tmp_path_factory):
    proxy = FaultyS3Proxy(s3_server.endpoint_url)
    stack = Stack(redis_server.url, s3_server, tmp_path_factory.mktemp("s3faults"), s3_endpoint_url=proxy.url,
                  **FAST_CLEANUP)
    stack.start_worker("a")
    yield stack, proxy
    stack.stop()
    proxy.stop()


def every(n: int, method: str, query_has: str | None = None, path_has: str | None = None):
    """Matches every n-th request of ``method`` (and the query/path filters)."""
    count = itertools.count(1)
    lock = threading.Lock()

    def match(m, p, q):
        if m != method or (query_has is not None and query_has not in q) or (path_has and path_has not in p):
            return False
        with lock:
            return next(count) % n == 0

    return match


def writes_outside(proxy: FaultyS3Proxy, bucket: str, output_prefix: str) -> list:
    return [w for w in proxy.writes() if not w[1].startswith(f"/{bucket}/{output_prefix}")]


def test_transient_faults_are_retried_and_the_merge_is_exact(faulty, s3_client, s3_bucket, tmp_path):
    stack, proxy = faulty
    # one shard larger than a multipart part (8 MiB), so uploads, parts and completion are hit too
    fam = _family(tmp_path, s3_client, s3_bucket, n_models=1, n_layers=2, dim=1024)
    spec = fam.spec("merged/transient/", method="task_arithmetic", shard_size="20MB")
    inputs_before = object_fingerprints(s3_client, s3_bucket)
    proxy.clear()
    rules = {
        "SlowDown on reads": proxy.add("fail", every(4, "GET"), count=6, status=503, code="SlowDown"),
        "500 on a part upload": proxy.add("fail", every(1, "PUT", "partNumber="), count=2, status=500,
                                          code="InternalError"),
        "503 on the completion": proxy.add("fail", every(1, "POST", "uploadId="), count=1, status=503,
                                           code="ServiceUnavailable"),
        "dropped HEAD": proxy.add("drop", every(2, "HEAD"), count=2),
        "read cut in half": proxy.add("cut", every(3, "GET"), count=4),
        "dropped small write": proxy.add("drop", every(1, "PUT", path_has="config.json"), count=1),
    }
    job = stack.submit(spec)
    done = stack.wait(job["id"], timeout=150)
    assert done["status"] == "succeeded", done
    for what, rule in rules.items():
        assert rule["hits"] >= 1, f"{what} never happened"
    expected = local_merge(spec, fam, tmp_path / "local")
    got = output_files(s3_client, done)
    assert sorted(got) == sorted([*expected, "drmerge.json"])
    assert all(got[n] == expected[n] for n in expected)
    assert pending_uploads(s3_client, s3_bucket) == []
    assert writes_outside(proxy, s3_bucket, "merged/transient/") == []
    assert {k: v for k, v in object_fingerprints(s3_client, s3_bucket).items()
            if not k.startswith("merged/")} == inputs_before


def test_a_permanent_fault_fails_with_storage_error_and_cleans_up(faulty, s3_client, s3_bucket, tmp_path):
    stack, proxy = faulty
    fam = _family(tmp_path, s3_client, s3_bucket, n_layers=6, dim=16)
    spec = fam.spec("merged/permanent/", shard_size="2KB")
    inputs_before = object_fingerprints(s3_client, s3_bucket)
    proxy.clear()
    broken = proxy.add("fail", lambda m, p, q: m == "PUT" and "model-00003-of" in p, status=500,
                       code="InternalError")
    job = stack.submit(spec)
    done = stack.wait(job["id"], timeout=150)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "storage_error" and "model-00003-of" in done["error"]["message"]
    assert broken["hits"] >= 5  # retried with backoff before giving up
    committed = [w for w in proxy.log if w[0] == "PUT" and "model-0000" in w[1] and w[3] == "forward"]
    assert committed, "earlier shards were written"
    assert output_files(s3_client, done) == {}  # ...and removed again
    assert pending_uploads(s3_client, s3_bucket) == []
    assert writes_outside(proxy, s3_bucket, "merged/permanent/") == []
    assert object_fingerprints(s3_client, s3_bucket) == inputs_before
    proxy.clear()
    # the worker is fine: the same merge goes through once S3 is healthy again
    again = stack.wait(stack.submit(spec)["id"], timeout=150)
    assert again["status"] == "succeeded", again


# ---------------------------------------------------------------- an S3 outage mid-upload (issue 18, item 5)

def outage_from_second_shard(proxy: FaultyS3Proxy) -> threading.Event:
    """From the first part upload of the second shard on, every request fails with 503:
    S3 went away with one shard committed and the next one's multipart upload open.
    Clear the returned event (and the proxy's rules) to bring it back."""
    down = threading.Event()

    def match(m, p, q):
        if not down.is_set() and m == "PUT" and "model-00002-of" in p and "partNumber=" in q:
            down.set()
        return down.is_set()

    proxy.add("fail", match, status=503, code="ServiceUnavailable")
    return down


def two_multipart_shards(tmp_path, s3_client, s3_bucket, output: str):
    fam = _family(tmp_path, s3_client, s3_bucket, n_models=1, n_layers=4, dim=1024)  # 2 shards > 8 MiB each
    return fam, fam.spec(output, method="task_arithmetic", shard_size="9MB")


def test_an_outage_during_the_upload_fails_the_job_with_its_error_and_the_output_is_cleaned_once_s3_is_back(
        faulty, s3_client, s3_bucket, tmp_path):
    """Through the service: the job fails with the upload's storage_error, stays
    ``cleanup: pending`` with its output reserved while S3 is down (the reaper's retries
    fail and back off), and once S3 returns a worker empties the prefix: no shards, no
    marker, no pending multipart upload. The worker then takes the same merge again."""
    stack, proxy = faulty
    fam, spec = two_multipart_shards(tmp_path, s3_client, s3_bucket, "merged/outage/")
    inputs_before = object_fingerprints(s3_client, s3_bucket)
    proxy.clear()
    down = outage_from_second_shard(proxy)
    job = stack.submit(spec)
    done = stack.wait(job["id"], timeout=150)
    assert down.is_set()
    assert done["status"] == "failed" and done["error"]["code"] == "storage_error", done
    assert "delete" not in done["error"]["message"] and "abort" not in done["error"]["message"], done["error"]
    record = stack.store.require(job["id"])
    assert record.cleanup == "pending" and "model-00001-of-00002.safetensors" in record.cleanup_files
    assert list_keys(s3_client, s3_bucket, "merged/outage/") == ["merged/outage/model-00001-of-00002.safetensors"]
    assert pending_uploads(s3_client, s3_bucket) == ["merged/outage/model-00002-of-00002.safetensors"]
    # the output stays reserved: a new job there would mix its files with the leftovers
    busy = stack.http.post("/v1/merges", json={"spec": spec})
    assert busy.status_code == 409 and busy.json()["code"] == "output_busy", busy.text
    assert "still being removed" in busy.json()["detail"]
    # while S3 is down, the retries fail (and are retried)
    wait_until(lambda: any(e["type"] == "cleanup" and e.get("outcome") == "retry" for e in stack.events(job["id"])),
               90, "a failed cleanup retry")

    down.clear()
    proxy.clear()  # S3 is back
    wait_until(lambda: stack.store.require(job["id"]).cleanup is None, 90, "the cleanup to succeed")
    assert list_keys(s3_client, s3_bucket, "merged/outage/") == []
    assert pending_uploads(s3_client, s3_bucket) == []
    assert object_fingerprints(s3_client, s3_bucket) == inputs_before
    after = stack.job(job["id"])
    assert after["status"] == "failed" and after["error"] == done["error"]  # the job keeps its real error
    assert any(e["type"] == "cleanup" and e.get("outcome") == "done" for e in stack.events(job["id"]))
    again = stack.wait(stack.submit(spec)["id"], timeout=150)  # the output is free, the worker fine
    assert again["status"] == "succeeded", again


# ---------------------------------------------------------------- cancel while planning (issue 18, item 4)

def test_a_cancel_takes_effect_while_a_slow_plan_reads_headers(faulty, s3_client, s3_bucket, tmp_path):
    """Planning asks the cancel hook between reads: a job cancelled while its plan reads
    80 shard headers over a slow S3 stops after the header in hand, not ~50 s later."""
    stack, proxy = faulty
    proxy.clear()
    spec = slow_plan_spec(s3_client, s3_bucket, tmp_path, proxy, "merged/slowplan/")
    job = stack.submit(spec)
    wait_until(lambda: len(shard_headers_read(proxy)) >= 3, 60, "planning to read shard headers")
    assert stack.job(job["id"])["progress"]["stage"] == "planning"
    r = stack.http.post(f"/v1/merges/{job['id']}/cancel")
    assert r.status_code == 202, r.text
    read_at_cancel = len(shard_headers_read(proxy))
    done = stack.wait(job["id"], timeout=30)  # well under the ~50 s the whole plan takes
    assert done["status"] == "cancelled", done
    assert len(shard_headers_read(proxy)) <= read_at_cancel + 2 < 2 * SLOW_PLAN_SHARDS  # stopped inside planning
    assert done["progress"]["tensors_done"] == 0
    assert list_keys(s3_client, s3_bucket, "merged/slowplan/") == []

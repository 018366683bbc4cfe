"""S3 misbehaving under a merge, through the whole service: the worker talks to S3 through
a proxy that answers 503 SlowDown and 500, drops connections and cuts responses in half.
Transient faults are retried with backoff and the merge equals a clean one byte for byte;
a permanent fault fails the job with ``storage_error`` and removes its partial output.
Inputs are never written to, whatever happens."""

from __future__ import annotations

import itertools
import threading

import pytest

from tests.conftest import _family
from tests.reliability_stack import Stack, local_merge, object_fingerprints, output_files, pending_uploads
from tests.servers import FaultyS3Proxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def faulty(redis_server, s3_server, tmp_path_factory):
    proxy = FaultyS3Proxy(s3_server.endpoint_url)
    stack = Stack(redis_server.url, s3_server, tmp_path_factory.mktemp("s3faults"), s3_endpoint_url=proxy.url)
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

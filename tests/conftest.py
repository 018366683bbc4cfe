"""Shared fixtures, for every layer: real Redis and a real S3 server (SeaweedFS), one of
each per session, started only when a test asks for them; the session service stacks;
small model families in S3. The code behind them lives in tests/support.

Servers are started on free loopback ports and change no global state (no environment
variables): a test that wants them passes ``s3_server.s3_options()`` or
``redis_server.url`` explicitly, or applies ``s3_server.env()`` with monkeypatch.

Every test is marked with its layer, the folder it lives in (``pytest -m unit``,
``-m integration``, ``-m e2e``); a test file outside those folders is an error.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest

from tests.support.checkpoints import _family
from tests.support.servers import BucketSupply, start_redis, start_seaweedfs
from tests.support.stack import STRICT_LIMITS, Stack

LAYERS = ("unit", "integration", "e2e")
_TESTS = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = item.path.relative_to(_TESTS).parts[0] if item.path.is_relative_to(_TESTS) else None
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: test files live in tests/unit, tests/integration or tests/e2e")
        item.add_marker(getattr(pytest.mark, layer))


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


# ----------------------------------------------------------------- service stacks
# Real API (uvicorn) and Celery worker processes on the session's Redis and S3
# (tests/support/stack.py), shared by the tests of a session.

@contextlib.contextmanager
def _session_stack(redis_server, s3_server, log_dir, *, worker: bool, **overrides):
    stack = Stack(redis_server.url, s3_server, log_dir, timeout=60.0, **overrides)
    try:
        if worker:
            stack.start_worker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def service_stack(redis_server, s3_server, tmp_path_factory):
    """API + one Celery worker (``drmerge worker``, solo pool) as real processes. Its
    webhook tests use a loopback http receiver, which the operator setting allows here."""
    with _session_stack(redis_server, s3_server, tmp_path_factory.mktemp("stack"), worker=True,
                        webhook_allow_http_loopback=True) as stack:
        yield stack


@pytest.fixture(scope="session")
def idle_stack(redis_server, s3_server, tmp_path_factory):
    """An API whose queue no worker consumes: jobs stay queued (listing, idempotency,
    validation, cancelling queued jobs)."""
    with _session_stack(redis_server, s3_server, tmp_path_factory.mktemp("idle"), worker=False,
                        webhook_secret="whsec_" + "c2VjcmV0LWZvci10ZXN0cw==",
                        webhook_allow_http_loopback=True) as stack:
        yield stack


@pytest.fixture(scope="session")
def strict_stack(redis_server, s3_server, tmp_path_factory):
    """An API (no worker) with production webhook rules (https to public addresses only),
    small limits (``STRICT_LIMITS``) and a local root (``stack.local_root``) that keys
    allowed any location may use. Tests here make a fresh tenant each, so queue quotas
    never collide."""
    root = tmp_path_factory.mktemp("local-root")
    with _session_stack(redis_server, s3_server, tmp_path_factory.mktemp("strict"), worker=False,
                        allow_local_root=str(root), webhook_secret="strict-stack-signing-secret",
                        **STRICT_LIMITS) as stack:
        stack.local_root = str(root)
        yield stack


# ----------------------------------------------------------------- model families in S3

@pytest.fixture
def family(tmp_path, s3_client, s3_bucket):
    """A small model family uploaded to ``s3_bucket``: ``family.uris[name]``,
    ``family.local[name]``, ``family.spec(**overrides)`` (a DRM spec over all of it)."""
    return _family(tmp_path, s3_client, s3_bucket)


@pytest.fixture
def slow_family(tmp_path, s3_client, s3_bucket):
    """Many small tensors: a merge that runs for seconds (reads dominate), long enough to
    cancel or time out in the middle."""
    return _family(tmp_path, s3_client, s3_bucket, prefix="slow/", n_layers=80, dim=8)

"""Shared fixtures: real Redis and a real S3 server (SeaweedFS), one of each per session.

Servers are started on free loopback ports and change no global state (no environment
variables): a test that wants them passes ``s3_server.s3_options()`` or
``redis_server.url`` explicitly, or applies ``s3_server.env()`` with monkeypatch.
"""

from __future__ import annotations

import pytest

from tests.servers import BucketSupply, start_redis, start_seaweedfs


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

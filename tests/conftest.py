"""Shared fixtures: real Redis and a real S3 server (SeaweedFS), one of each per session.

Servers are started on free loopback ports and change no global state (no environment
variables): a test that wants them passes ``s3_server.s3_options()`` or
``redis_server.url`` explicitly, or sets ``monkeypatch.setenv(**s3_server.env())``.
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.servers import start_redis, start_seaweedfs


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A boto3 S3 client for ``s3_server``, for arranging and inspecting test data."""
    client = s3_server.client()
    yield client
    client.close()


@pytest.fixture
def s3_bucket(request, s3_server, s3_client):
    """A fresh, empty bucket named after the test; removed (with its contents) afterwards.
    SeaweedFS gives each bucket a volume, so removing them keeps long runs in bounds."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    empty_and_delete_bucket(s3_client, name)


def empty_and_delete_bucket(client, bucket: str) -> None:
    """Delete a bucket whatever it holds (SeaweedFS does that in one call; AWS and MinIO
    need it emptied first)."""
    try:
        client.delete_bucket(Bucket=bucket)
        return
    except client.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") != "BucketNotEmpty":
            raise
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", ()):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)

"""Resume at engine level on a real S3 server: a later run given the kept shards aborts
the multipart uploads a killed run left under its output (local disk:
tests/unit/test_resume.py)."""

from __future__ import annotations

import pytest

from drmerge.pipeline import run_merge
from drmerge.spec import parse_spec
from tests.support.checkpoints import _family, list_keys
from tests.unit.test_resume import interrupted_run


# ---------------------------------------------------------------------------- S3


@pytest.fixture
def s3_env(monkeypatch, s3_server):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)


def test_resume_on_s3_aborts_the_uploads_a_killed_run_left(s3_env, s3_server, s3_client, s3_bucket, tmp_path):
    fam = _family(tmp_path, s3_client, s3_bucket, n_layers=6, dim=64)
    spec = fam.spec("merged/", shard_size="20KB")
    journal, _ = interrupted_run(spec, after_tensors=12)
    assert journal
    # what SIGKILL leaves: a multipart upload in progress, right under the output prefix
    up = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="merged/model-00004-of-00005.safetensors")
    s3_client.upload_part(Bucket=s3_bucket, Key="merged/model-00004-of-00005.safetensors",
                          UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1024)
    # someone else's upload one level down is not ours to abort
    other = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="merged/sub/other.bin")
    result = run_merge(parse_spec(spec), device="cpu", completed_shards=journal)
    assert result.resumed["shards_kept"] == len(journal)
    pending = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in pending] == [("merged/sub/other.bin", other["UploadId"])]
    s3_client.abort_multipart_upload(Bucket=s3_bucket, Key="merged/sub/other.bin", UploadId=other["UploadId"])
    clean = run_merge(parse_spec(fam.spec("clean/", shard_size="20KB")), device="cpu")
    assert result.files == clean.files
    names = sorted(k.split("/", 1)[1] for k in list_keys(s3_client, s3_bucket, "merged/"))
    assert names == sorted([f["name"] for f in result.files] + ["drmerge.json"])

"""An S3 outage mid-upload at engine level (issue 18, item 5): S3 goes away through a
proxy with one shard committed and the next one's multipart upload open. Through the
whole service, and the other faults: tests/e2e/test_s3_faults.py."""

from __future__ import annotations

import pytest

from tests.e2e.test_s3_faults import outage_from_second_shard, two_multipart_shards
from tests.support.checkpoints import list_keys, object_fingerprints, pending_uploads
from tests.support.servers import FaultyS3Proxy

pytestmark = pytest.mark.slow


def test_an_outage_during_the_upload_keeps_the_error_and_reports_what_remains(aws_env, s3_server, s3_client, s3_bucket,
                                                                               tmp_path):
    """Engine level: the failed run's cleanup cannot reach S3 either. Its error is the
    upload's (not the cleanup's), it says what may remain, and once S3 is back
    discard_partial_output removes exactly that: no shard, no marker, no pending upload."""
    from drmerge.errors import MergeError
    from drmerge.pipeline import discard_partial_output, run_merge
    from drmerge.spec import parse_spec

    fam, spec = two_multipart_shards(tmp_path, s3_client, s3_bucket, "merged/outage-engine/")
    inputs_before = object_fingerprints(s3_client, s3_bucket)
    with FaultyS3Proxy(s3_server.endpoint_url) as proxy:
        options = {"endpoint_url": proxy.url, "region": "us-east-1"}
        down = outage_from_second_shard(proxy)
        with pytest.raises(MergeError) as err:
            run_merge(parse_spec(spec), device="cpu", s3_options=options)
        e = err.value
        assert down.is_set() and e.code == "storage_error", e
        assert "delete" not in e.message and "abort" not in e.message, e.message  # the upload's error, not the cleanup's
        assert "model-00001-of-00002.safetensors" in e.cleanup_pending, e.cleanup_pending
        left = list_keys(s3_client, s3_bucket, "merged/outage-engine/")
        assert left == ["merged/outage-engine/model-00001-of-00002.safetensors"]  # what the outage left behind
        assert pending_uploads(s3_client, s3_bucket) == ["merged/outage-engine/model-00002-of-00002.safetensors"]
        with pytest.raises(MergeError) as again:  # still down: the later cleanup fails loudly, to be retried
            discard_partial_output(parse_spec(spec), [{"name": n} for n in e.cleanup_pending], options)
        assert again.value.code == "storage_error"

        proxy.clear()  # S3 is back
        removed = discard_partial_output(parse_spec(spec), [{"name": n} for n in e.cleanup_pending], options)
    assert "model-00001-of-00002.safetensors" in removed
    assert list_keys(s3_client, s3_bucket, "merged/outage-engine/") == []
    assert pending_uploads(s3_client, s3_bucket) == []
    assert object_fingerprints(s3_client, s3_bucket) == inputs_before

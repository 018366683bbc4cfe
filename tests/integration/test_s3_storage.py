"""S3Storage against a real S3 server (SeaweedFS): ranged reads, listing, multipart
writes, error codes, and recovery from (and giving up on) a failing network."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import pytest

from drmerge.errors import MergeError
from drmerge.s3 import S3Storage, multipart_etag, parse_s3_uri
from drmerge.storage import open_storage
from tests.support.servers import DroppingProxy, start_seaweedfs

MiB = 1 << 20


@pytest.fixture
def storage(s3_server, s3_bucket):
    st = S3Storage(f"s3://{s3_bucket}/models/base/", **s3_server.s3_options())
    yield st
    st.close()


def pending_uploads(client, bucket) -> list:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# ------------------------------------------------------------------ URIs and describe


def test_uri_is_a_directory_with_normalized_prefix(s3_server):
    assert parse_s3_uri("s3://b/a/b") == ("b", "a/b/")
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b/")
    assert parse_s3_uri("s3://b") == ("b", "")
    assert parse_s3_uri("s3://b/") == ("b", "")
    st = S3Storage("s3://bucket-x/run/42", **s3_server.s3_options())
    assert st.uri == "s3://bucket-x/run/42/"
    assert st.describe("model.safetensors") == "s3://bucket-x/run/42/model.safetensors"
    with pytest.raises(MergeError) as e:
        S3Storage("s3:///prefix", **s3_server.s3_options())
    assert e.value.code == "invalid_spec"


def test_open_storage_picks_s3_and_env_configures_it(s3_server, s3_bucket, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    st = open_storage(f"s3://{s3_bucket}/x/")
    assert isinstance(st, S3Storage)
    st.write_bytes("a.txt", b"hello")
    assert st.read_bytes("a.txt") == b"hello"


# ------------------------------------------------------------------------ reading


def test_ranged_reads_hit_exact_bytes_including_the_last(storage, s3_client, s3_bucket):
    data = os.urandom(3 * MiB + 17)
    s3_client.put_object(Bucket=s3_bucket, Key="models/base/blob.bin", Body=data)
    assert storage.size("blob.bin") == len(data)
    assert storage.exists("blob.bin") and not storage.exists("other.bin")
    for start, length in [(0, 1), (0, 8), (5, 1000), (len(data) - 1, 1), (len(data) - 100, 100), (0, len(data))]:
        got = storage.read_range("blob.bin", start, length)
        assert isinstance(got, bytearray)
        assert got == data[start : start + length], (start, length)
    assert storage.read_range("blob.bin", 10, 0) == bytearray()
    assert storage.read_bytes("blob.bin") == data


def test_large_ranges_are_split_and_reassembled_across_part_boundaries(s3_server, s3_client, s3_bucket):
    data = os.urandom(5 * MiB + 3)
    s3_client.put_object(Bucket=s3_bucket, Key="blob.bin", Body=data)
    st = S3Storage(f"s3://{s3_bucket}/", read_part_size=MiB, max_concurrency=4, **s3_server.s3_options())
    for start, length in [
        (0, len(data)),  # 6 parts, the last 3 bytes
        (MiB - 1, 2),  # straddles the first boundary inside one small read
        (MiB - 5, 2 * MiB + 10),  # starts before one boundary, ends past the next
        (1, 3 * MiB),  # every part boundary shifted by one
        (len(data) - MiB - 1, MiB + 1),  # ends on the last byte, two parts
    ]:
        assert st.read_range("blob.bin", start, length) == data[start : start + length], (start, length)
    st.close()


def test_reading_past_the_end_is_a_corrupt_checkpoint(storage, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="models/base/short.bin", Body=b"x" * 100)
    for start, length in [(90, 20), (100, 1), (500, 10)]:
        with pytest.raises(MergeError) as e:
            storage.read_range("short.bin", start, length)
        assert e.value.code == "corrupt_checkpoint"
        assert f"s3://{s3_bucket}/models/base/short.bin" in e.value.message


def test_safetensors_written_to_s3_read_back_tensor_by_tensor(storage):
    # numpy rather than torch keeps this file fast; the storage layer only sees bytes.
    np = pytest.importorskip("numpy")
    from safetensors.numpy import load, save

    rng = np.random.default_rng(0)
    tensors = {
        "layer.0.weight": rng.standard_normal((300, 700), dtype=np.float32),
        "layer.0.bias": rng.standard_normal(300).astype(np.float16),
        "embed.weight": rng.standard_normal((1000, 64)).astype(np.float64),
        "step": np.array([7], dtype=np.int64),
    }
    blob = save(tensors, metadata={"format": "pt"})
    writer = storage.open_writer("model.safetensors")
    for i in range(0, len(blob), 999_983):  # odd chunks
        writer.write(memoryview(blob)[i : i + 999_983])
    writer.commit()

    (header_len,) = struct.unpack("<Q", storage.read_range("model.safetensors", 0, 8))
    header = json.loads(storage.read_range("model.safetensors", 8, header_len))
    assert header["__metadata__"] == {"format": "pt"}
    base = 8 + header_len
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}
    for name, expected in tensors.items():
        info = header[name]
        start, end = info["data_offsets"]
        raw = storage.read_range("model.safetensors", base + start, end - start)
        got = np.frombuffer(raw, dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # and the whole object is what safetensors itself reads back
    loaded = load(storage.read_bytes("model.safetensors"))
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())


# ------------------------------------------------------------------------ listing


def test_list_files_returns_only_direct_children(storage, s3_client, s3_bucket):
    for key in [
        "models/base/config.json",
        "models/base/model.safetensors",
        "models/base/sub/inner.json",  # deeper: not listed
        "models/base2/other.json",  # sibling prefix sharing a name prefix: not listed
        "models/top.json",  # parent: not listed
    ]:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"{}")
    assert storage.list_files() == ["config.json", "model.safetensors"]


def test_list_files_pages_through_many_objects(s3_server, s3_client, s3_bucket):
    names = [f"shard-{i:02d}.bin" for i in range(25)]
    for name in names + ["sub/a.bin", "sub/b.bin"]:
        s3_client.put_object(Bucket=s3_bucket, Key=f"many/{name}", Body=b"")
    st = S3Storage(f"s3://{s3_bucket}/many", list_page_size=4, **s3_server.s3_options())
    assert st.list_files() == names  # 7+ pages, sub/ collapsed away on whichever page


def test_list_files_at_bucket_root_and_of_an_empty_prefix(s3_server, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="root.txt", Body=b"1")
    s3_client.put_object(Bucket=s3_bucket, Key="dir/nested.txt", Body=b"2")
    assert S3Storage(f"s3://{s3_bucket}", **s3_server.s3_options()).list_files() == ["root.txt"]
    assert S3Storage(f"s3://{s3_bucket}/nothing-here/", **s3_server.s3_options()).list_files() == []


# ------------------------------------------------------------------------ writing


def test_multipart_write_in_odd_chunks_round_trips_bit_for_bit(storage, s3_client, s3_bucket):
    data = os.urandom(20 * MiB + 12345)
    writer = storage.open_writer("model.safetensors")
    chunk_sizes = [1, 7, 4093, 3 * MiB + 1, 5, 8 * MiB - 3, 1_234_567]
    pos = i = 0
    while pos < len(data):
        n = chunk_sizes[i % len(chunk_sizes)]
        writer.write(data[pos : pos + n])
        pos += n
        i += 1
        if i == 5:  # nothing is visible before commit, even with parts uploaded
            assert not storage.exists("model.safetensors")
    assert not storage.exists("model.safetensors")
    writer.commit()
    head = s3_client.head_object(Bucket=s3_bucket, Key="models/base/model.safetensors")
    assert head["ContentLength"] == len(data)
    # Completed as one multipart upload of equal parts, with S3's multipart ETag.
    step = storage.part_size
    part_md5s = [hashlib.md5(data[i : i + step]).hexdigest() for i in range(0, len(data), step)]
    assert head["ETag"].strip('"') == multipart_etag(part_md5s)
    assert storage.read_range("model.safetensors", 0, len(data)) == data
    assert pending_uploads(s3_client, s3_bucket) == []


def test_object_of_exactly_one_part_and_empty_object(s3_server, s3_bucket):
    st = S3Storage(f"s3://{s3_bucket}/", part_size=5 * MiB, **s3_server.s3_options())
    exact = os.urandom(5 * MiB)
    w = st.open_writer("exact.bin")
    w.write(exact)
    w.commit()
    assert st.read_bytes("exact.bin") == exact
    st.write_bytes("empty.bin", b"")
    assert st.size("empty.bin") == 0 and st.read_bytes("empty.bin") == b""


def test_abort_leaves_no_object_and_no_pending_upload(s3_server, s3_client, s3_bucket):
    storage = S3Storage(f"s3://{s3_bucket}/models/base/", part_size=5 * MiB, **s3_server.s3_options())
    writer = storage.open_writer("model.safetensors")
    writer.write(os.urandom(12 * MiB))  # two parts uploaded, one buffered
    assert len(pending_uploads(s3_client, s3_bucket)) == 1
    writer.abort()
    writer.abort()  # idempotent
    assert not storage.exists("model.safetensors")
    assert pending_uploads(s3_client, s3_bucket) == []
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_abort_of_a_small_write_and_commit_after_abort(storage):
    writer = storage.open_writer("config.json")
    writer.write(b"{}")
    writer.abort()
    assert not storage.exists("config.json")
    with pytest.raises(MergeError):
        writer.write(b"more")


def test_write_bytes_overwrite_and_delete_round_trip(storage):
    storage.write_bytes("drmerge.json", b'{"v": 1}')
    storage.write_bytes("drmerge.json", b'{"v": 2}')
    assert storage.read_bytes("drmerge.json") == b'{"v": 2}'
    assert storage.list_files() == ["drmerge.json"]
    storage.delete("drmerge.json")
    storage.delete("drmerge.json")  # missing is fine
    assert not storage.exists("drmerge.json")
    assert storage.list_files() == []


def test_concurrent_ranged_reads_from_many_threads(storage, s3_client, s3_bucket):
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(4 * MiB)
    s3_client.put_object(Bucket=s3_bucket, Key="models/base/blob.bin", Body=data)
    ranges = [(i * 65_521 % (len(data) - 70_000), 1 + i * 977 % 70_000) for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: storage.read_range("blob.bin", *r), ranges))
    for (start, length), got in zip(ranges, results):
        assert got == data[start : start + length]


# -------------------------------------------------------------------- error mapping


def test_missing_bucket_and_missing_key_are_input_not_found(s3_server, s3_bucket):
    missing_bucket = S3Storage("s3://no-such-bucket-drmerge/base/", **s3_server.s3_options())
    for call in (lambda: missing_bucket.size("model.safetensors"),
                 lambda: missing_bucket.read_range("model.safetensors", 0, 8),
                 missing_bucket.list_files):
        with pytest.raises(MergeError) as e:
            call()
        assert e.value.code == "input_not_found"
        assert "s3://no-such-bucket-drmerge/base/" in e.value.message
    assert not missing_bucket.exists("model.safetensors")

    st = S3Storage(f"s3://{s3_bucket}/base/", **s3_server.s3_options())
    for call in (lambda: st.size("model.safetensors"),
                 lambda: st.read_range("model.safetensors", 0, 8),
                 lambda: st.read_bytes("model.safetensors")):
        with pytest.raises(MergeError) as e:
            call()
        assert e.value.code == "input_not_found"
        assert f"s3://{s3_bucket}/base/model.safetensors" in e.value.message


def test_wrong_credentials_are_access_denied(s3_server, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b"{}")
    for creds in ({"secret_access_key": "wrong-secret"}, {"access_key_id": "nobody"}):
        options = {**s3_server.s3_options(), **creds, "max_attempts": 1}
        st = S3Storage(f"s3://{s3_bucket}/m/", **options)
        for call in (lambda: st.size("config.json"), lambda: st.read_range("config.json", 0, 2),
                     st.list_files, lambda: st.write_bytes("x.json", b"{}")):
            with pytest.raises(MergeError) as e:
                call()
            assert e.value.code == "access_denied", e.value
            assert f"s3://{s3_bucket}/m/" in e.value.message
    assert pending_uploads(s3_client, s3_bucket) == []


def test_writing_into_a_missing_bucket_is_input_not_found(s3_server, s3_client):
    st = S3Storage("s3://no-such-output-bucket/run-1/", **s3_server.s3_options())
    with pytest.raises(MergeError) as e:
        st.write_bytes("drmerge.json", b"{}")
    assert e.value.code == "input_not_found"
    assert "s3://no-such-output-bucket/run-1/drmerge.json" in e.value.message
    writer = st.open_writer("model.safetensors")
    with pytest.raises(MergeError) as e:
        writer.write(os.urandom(9 * MiB))
    assert e.value.code == "input_not_found"
    writer.abort()
    names = [b["Name"] for b in s3_client.list_buckets()["Buckets"]]
    assert "no-such-output-bucket" not in names


def test_invalid_bucket_name_is_invalid_spec(s3_server):
    st = S3Storage("s3://Bad_Bucket!/x/", **s3_server.s3_options())
    with pytest.raises(MergeError) as e:
        st.list_files()
    assert e.value.code == "invalid_spec"


# ---------------------------------------------------------- flaky and dead servers


def test_reads_resume_after_connections_drop_mid_body(s3_server, s3_client, s3_bucket):
    data = os.urandom(6 * MiB)
    s3_client.put_object(Bucket=s3_bucket, Key="blob.bin", Body=data)
    with DroppingProxy(s3_server.endpoint_url) as proxy:
        options = {**s3_server.s3_options(), "endpoint_url": proxy.url}
        st = S3Storage(f"s3://{s3_bucket}/", max_attempts=4, backoff_base=0.01, read_part_size=64 * MiB, **options)
        proxy.arm(cuts=2, after_bytes=MiB)
        assert st.read_range("blob.bin", 0, len(data)) == data
        assert proxy.cuts_made == 2

        proxy.arm(cuts=100, after_bytes=MiB)
        with pytest.raises(MergeError) as e:
            st.read_range("blob.bin", 0, len(data))
        assert e.value.code == "storage_error"
        assert f"s3://{s3_bucket}/blob.bin" in e.value.message
        st.close()


def test_uploads_survive_lost_responses(s3_server, s3_client, s3_bucket):
    data = os.urandom(16 * MiB)
    with DroppingProxy(s3_server.endpoint_url) as proxy:
        options = {**s3_server.s3_options(), "endpoint_url": proxy.url}
        st = S3Storage(f"s3://{s3_bucket}/out/", part_size=5 * MiB, **options)
        writer = st.open_writer("model.safetensors")
        writer.write(data[: 6 * MiB])  # upload created, part 1 on its way
        proxy.arm(cuts=2, request_prefix=b"PUT ")  # two UploadPart responses lost
        writer.write(data[6 * MiB :])
        writer._drain(0)
        proxy.arm(cuts=1, request_prefix=b"POST ")  # the CompleteMultipartUpload response lost
        writer.commit()
        assert proxy.cuts_made == 3
        st.close()
    check = S3Storage(f"s3://{s3_bucket}/out/", **s3_server.s3_options())
    assert check.read_bytes("model.safetensors") == data
    assert pending_uploads(s3_client, s3_bucket) == []


def test_an_upload_aborted_behind_our_back_fails_commit(storage, s3_client, s3_bucket):
    writer = storage.open_writer("model.safetensors")
    writer.write(os.urandom(9 * MiB))
    (upload,) = pending_uploads(s3_client, s3_bucket)
    s3_client.abort_multipart_upload(Bucket=s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    with pytest.raises(MergeError) as e:
        writer.write(os.urandom(9 * MiB))
        writer.commit()
    assert e.value.code == "storage_error"
    assert "aborted or expired" in e.value.message
    assert not storage.exists("model.safetensors")
    assert pending_uploads(s3_client, s3_bucket) == []


def test_a_stopped_server_gives_storage_error_after_bounded_retries(tmp_path):
    server = start_seaweedfs(tmp_path / "sw")
    try:
        client = server.client()
        client.create_bucket(Bucket="doomed")
        client.put_object(Bucket="doomed", Key="m/blob.bin", Body=os.urandom(MiB))
        st = S3Storage(
            "s3://doomed/m/", max_attempts=2, part_size=5 * MiB, connect_timeout=1, read_timeout=2,
            **server.s3_options(),
        )
        assert len(st.read_range("blob.bin", 0, 100)) == 100
        writer = st.open_writer("out.bin")
        writer.write(os.urandom(6 * MiB))  # multipart upload started, one part sent
    finally:
        server.stop(kill=True)

    t0 = time.monotonic()
    for call in (lambda: st.read_range("blob.bin", 0, 100), st.list_files, lambda: st.size("blob.bin"),
                 lambda: st.write_bytes("small.json", b"{}")):
        with pytest.raises(MergeError) as e:
            call()
        assert e.value.code == "storage_error", e.value
        assert "s3://doomed/m/" in e.value.message
    with pytest.raises(MergeError) as e:
        writer.write(os.urandom(6 * MiB))
        writer.commit()
    assert e.value.code == "storage_error"
    writer.abort()  # cleanup after a failure never raises, even with the server gone
    assert time.monotonic() - t0 < 60  # bounded: two attempts each, not botocore's default budget

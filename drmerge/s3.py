"""Checkpoints on S3 (or any S3-compatible store): ranged reads and multipart writes.

This is the only module that imports boto3, so the engine runs on local paths without it.

Reads are ranged GETs: the checkpoint reader asks for one tensor's bytes at a time, and a
large range is fetched as several parts in parallel, because one S3 connection tops out
far below what a GPU worker can consume. Writes stream through a multipart upload whose
parts go out on a background thread while the caller computes the next tensors; nothing
is visible under the final name until ``commit``, and ``abort`` removes the pending upload
so no half-written object or orphaned parts remain.

Failures become MergeError codes: a missing bucket or object is ``input_not_found``,
refused credentials are ``access_denied``, and anything else still failing after retries
is ``storage_error``. botocore retries whole requests (5xx, throttling, refused
connections) with exponential backoff; a connection that drops in the middle of a body is
outside its reach, so reads resume from the last byte received, with the same budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import boto3
import botocore.exceptions as bce
import botocore.session
from botocore.config import Config

from . import locations
from .errors import MergeError
from .storage_base import ObjectWriter, Storage

log = logging.getLogger(__name__)

MiB = 1 << 20

# S3 accepts at most 10,000 parts per upload, each at least 5 MiB except the last.
_MIN_PART_SIZE = 5 * MiB
_MAX_PARTS = 10_000

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
}

# What a dropped or stalled connection looks like while a response body is being read.
_BODY_ERRORS: tuple[type[BaseException], ...] = (
    bce.ResponseStreamingError,
    bce.IncompleteReadError,
    bce.ReadTimeoutError,
    bce.ConnectionClosedError,
    ConnectionError,
    TimeoutError,
)
try:  # urllib3 errors can escape StreamingBody.read() unwrapped on some botocore versions
    import urllib3.exceptions as _u3

    _BODY_ERRORS += (_u3.ProtocolError, _u3.ReadTimeoutError, _u3.IncompleteRead)
except ImportError:  # pragma: no cover
    pass


_client_lock = threading.Lock()
_shared_loader = None


def _botocore_session():
    """A new botocore session (credentials resolve per storage, from the environment of
    the moment) sharing one model loader: parsing the S3 service model is most of the
    ~0.1-0.4 s a client costs, and a merge opens one storage per checkpoint."""
    global _shared_loader
    session = botocore.session.Session()
    if _shared_loader is None:
        _shared_loader = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _shared_loader)
    return session


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``). The URI names a
    directory, so the prefix always ends with ``/`` unless it is empty. The rules are
    drmerge.locations' (the spec's canonical form), so the storage and every check agree
    on which prefix a URI means."""
    return locations.split_s3(uri)


class S3Storage(Storage):
    """An ``s3://bucket/prefix/`` directory of objects.

    Connection settings left as None come from ``DRMERGE_S3_ENDPOINT_URL`` and
    ``DRMERGE_S3_REGION``, then from boto3's usual chain (``AWS_ACCESS_KEY_ID``,
    ``AWS_PROFILE``, instance roles, ...). ``max_attempts`` bounds every request,
    including resumed body reads. One client is shared by all threads; boto3 clients are
    thread-safe, sessions are not, and each storage makes its own session.
    """

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_attempts: int = 5,
        *,
        session_token: str | None = None,
        part_size: int = 8 * MiB,
        read_part_size: int = 16 * MiB,
        max_concurrency: int = 8,
        upload_concurrency: int = 2,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        list_page_size: int = 1000,
    ):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        if part_size < _MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {_MIN_PART_SIZE} bytes (S3 minimum)")
        if max_attempts < 1 or max_concurrency < 1 or read_part_size < 1:
            raise ValueError("max_attempts, max_concurrency and read_part_size must be positive")
        self.part_size = part_size
        self.read_part_size = read_part_size
        self.max_concurrency = max_concurrency
        self.upload_concurrency = max(1, upload_concurrency)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.list_page_size = list_page_size

        self.endpoint_url = endpoint_url or os.environ.get("DRMERGE_S3_ENDPOINT_URL") or None
        region = region or os.environ.get("DRMERGE_S3_REGION") or None
        s3_config: dict = {}
        if self.endpoint_url:
            # S3-compatible servers (MinIO, SeaweedFS, Ceph) rarely do virtual-host buckets.
            s3_config["addressing_style"] = "path"
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * (max_concurrency + upload_concurrency)),
            signature_version="s3v4",
            s3=s3_config,
            tcp_keepalive=True,
        )
        try:
            with _client_lock:
                session = boto3.session.Session(
                    aws_access_key_id=access_key_id,
                    aws_secret_access_key=secret_access_key,
                    aws_session_token=session_token,
                    region_name=region,
                    botocore_session=_botocore_session(),
                )
                self.client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except ValueError as e:  # e.g. a malformed endpoint URL
            raise MergeError("invalid_spec", f"cannot configure S3 for {self.uri}: {e}") from None
        except bce.BotoCoreError as e:
            raise MergeError("storage_error", f"cannot configure S3 for {self.uri}: {e}") from None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._unaborted: set[str] = set()  # names whose multipart upload abort() could not abort

    # -- helpers ------------------------------------------------------------------

    def key(self, name: str) -> str:
        return self.prefix + name

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="drmerge-s3")
            return self._pool

    def _sleep_backoff(self, attempt: int) -> None:
        # Full jitter, as botocore's standard mode does, so parallel parts do not retry in step.
        time.sleep(random.uniform(0, min(self.backoff_max, self.backoff_base * (2 ** attempt))))

    def _error(self, exc: BaseException, what: str, action: str) -> MergeError:
        return map_s3_error(exc, what, action, bucket_uri=f"s3://{self.bucket}/")

    def _not_found(self, name: str) -> MergeError:
        """A HEAD said 404, which does not say whether the bucket or the key is missing."""
        what = self.describe(name)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            err = self._error(e, f"s3://{self.bucket}/", "check bucket")
            if err.code == "input_not_found":
                return MergeError("input_not_found", f"{what} does not exist: there is no bucket {self.bucket!r}")
        return MergeError("input_not_found", f"{what} does not exist")

    # -- reading --------------------------------------------------------------------

    def _head(self, name: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except bce.ClientError as e:
            if _status(e) == 404 or _code(e) in _NOT_FOUND_CODES:
                return None
            raise self._error(e, self.describe(name), "inspect") from None
        except Exception as e:
            raise self._error(e, self.describe(name), "inspect") from None

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int:
        head = self._head(name)
        if head is None:
            raise self._not_found(name)
        return int(head["ContentLength"])

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        if start < 0 or length < 0:
            raise ValueError("start and length must be non-negative")
        buf = bytearray(length)
        if length == 0:
            return buf
        view = memoryview(buf)
        step = self.read_part_size
        if length <= step:
            self._get_into(name, start, view)
            return buf
        # A big range goes out as parallel ranged GETs that write straight into their slice.
        futures = [
            self._executor().submit(self._get_into, name, start + off, view[off : off + step])
            for off in range(0, length, step)
        ]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:  # no worker may still be writing into buf when we return
                if not f.cancelled():
                    try:
                        f.result()
                    except BaseException:
                        pass
            raise
        return buf

    def _get_into(self, name: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with the object's bytes from ``start``; a body cut short is
        resumed from the first missing byte, at most ``max_attempts`` times."""
        key = self.key(name)
        what = self.describe(name)
        length = len(out)
        done = 0
        etag: str | None = None
        failures = 0
        while done < length:
            first = start + done
            last = start + length - 1
            kwargs = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={first}-{last}"}
            if etag is not None:
                kwargs["IfMatch"] = etag  # a resumed read must not mix two versions
            try:
                resp = self.client.get_object(**kwargs)
            except bce.ClientError as e:
                if _code(e) == "InvalidRange" or _status(e) == 416:
                    raise _short_object(what, start, length, _object_size(e, first)) from None
                if _code(e) == "PreconditionFailed" or _status(e) == 412:
                    raise MergeError("storage_error", f"{what} changed while it was being read") from None
                if _status(e) == 404 or _code(e) in _NOT_FOUND_CODES:
                    raise self._not_found(name) from None
                raise self._error(e, what, "read") from None
            except Exception as e:
                raise self._error(e, what, "read") from None
            etag = etag or resp.get("ETag")
            expected = min(int(resp.get("ContentLength", length - done)), length - done)
            got_range = resp.get("ContentRange")
            if got_range is None and first != 0:
                resp["Body"].close()
                raise MergeError("storage_error", f"the server ignored the Range header when reading {what}")
            body = resp["Body"]
            try:
                while done < length:
                    chunk = body.read(min(length - done, MiB))
                    if not chunk:
                        break
                    n = len(chunk)
                    out[done : done + n] = chunk
                    done += n
            except _BODY_ERRORS as e:
                failures += 1
                if failures >= self.max_attempts:
                    raise MergeError(
                        "storage_error",
                        f"reading {what} kept failing: the connection dropped {failures} times mid-transfer ({e})",
                    ) from None
                self._sleep_backoff(failures)
                continue
            finally:
                body.close()
            if done < length and expected < length - (first - start):
                # The object ends before the range we asked for.
                raise _short_object(what, start, length, start + done)
            if done < length:
                failures += 1
                if failures >= self.max_attempts:
                    raise MergeError("storage_error", f"reading {what} kept ending early after {failures} attempts")
                self._sleep_backoff(failures)

    # -- listing --------------------------------------------------------------------

    def list_files(self) -> list[str]:
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=self.prefix,
                Delimiter="/",
                PaginationConfig={"PageSize": self.list_page_size},
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(self.prefix):]
                    if name:  # skip a "directory marker" object named like the prefix
                        names.append(name)
        except Exception as e:
            raise self._error(e, self.uri, "list") from None
        return sorted(names)

    # -- writing --------------------------------------------------------------------

    def open_writer(self, name: str) -> ObjectWriter:
        return _S3Writer(self, name)

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
        except bce.ClientError as e:
            if _status(e) == 404 or _code(e) in _NOT_FOUND_CODES:
                return
            raise self._error(e, self.describe(name), "delete") from None
        except Exception as e:
            raise self._error(e, self.describe(name), "delete") from None

    def unaborted_writes(self) -> list[str]:
        return sorted(self._unaborted)

    def abort_stale_writes(self, strict: bool = False) -> int:
        """Abort the multipart uploads pending directly under this prefix: what a worker
        killed in the middle of a shard leaves behind (invisible, but billed, until a
        lifecycle rule reclaims it). Best effort (a failure is logged) unless ``strict``."""
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads", ()):
                    name = upload["Key"][len(self.prefix):]
                    if not name or "/" in name:
                        continue  # a deeper "directory" is not ours
                    try:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
                    except bce.ClientError as e:
                        if _code(e) != "NoSuchUpload":
                            raise
        except Exception as e:
            err = self._error(e, self.uri, "abort the unfinished uploads in")
            if strict:
                raise err from None
            log.warning("could not abort stale uploads under %s: %s", self.uri, err)
            return aborted
        self._unaborted.clear()
        return aborted

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Storage({self.uri!r}{where})"


class _S3Writer(ObjectWriter):
    """Buffers writes into equal parts (only the last may be shorter, as some S3-compatible
    stores require) and uploads them on ``upload_concurrency`` threads while the caller
    keeps writing. At most ``upload_concurrency + 1`` finished parts wait in memory, so a
    writer holds a few tens of MiB whatever the object size."""

    def __init__(self, storage: S3Storage, name: str):
        self.s = storage
        self.name = name
        self.key = storage.key(name)
        self.what = storage.describe(name)
        self.part_size = storage.part_size
        self.threads = storage.upload_concurrency
        self.max_pending = storage.upload_concurrency + 1
        self._part: bytearray | None = None  # allocated on the first write
        self._fill = 0
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._pending: deque[Future] = deque()
        self._uploader: ThreadPoolExecutor | None = None
        self._next_part = 1
        self._state = "open"  # open -> committed | aborted

    # ObjectWriter interface

    def write(self, data) -> None:
        if self._state != "open":
            raise MergeError("internal_error", f"write to {self.what} after it was {self._state}")
        mv = memoryview(data).cast("B")
        pos, total = 0, len(mv)
        while pos < total:
            if self._part is None:
                self._part = bytearray(self.part_size)
                self._fill = 0
            take = min(self.part_size - self._fill, total - pos)
            self._part[self._fill : self._fill + take] = mv[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.part_size:
                part, self._part = self._part, None
                self._send_part(part)

    def commit(self) -> None:
        if self._state == "committed":
            return
        if self._state != "open":
            raise MergeError("internal_error", f"commit of {self.what} after it was {self._state}")
        tail = bytes(memoryview(self._part)[: self._fill]) if self._part is not None else b""
        self._part = None
        try:
            if self._upload_id is None:
                self.s.client.put_object(Bucket=self.s.bucket, Key=self.key, Body=tail)
            else:
                if tail:
                    self._send_part(tail)
                self._drain(0)
                self._complete()
        except BaseException as e:
            self.abort()
            if isinstance(e, MergeError):
                raise
            raise self.s._error(e, self.what, "write") from None
        self._state = "committed"
        self._upload_id = None
        self._shutdown()

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._part = None
        for f in self._pending:
            f.cancel()
        self._shutdown()  # waits for parts already on the wire
        self._pending.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self.s.client.abort_multipart_upload(Bucket=self.s.bucket, Key=self.key, UploadId=upload_id)
            except Exception as e:
                if _code(e) == "NoSuchUpload":
                    return
                # abort() runs on failure paths: raising here would hide the original error.
                # The parts stay invisible to readers; the storage remembers the name, so
                # the run's cleanup reports it (output.remove_partial_output) and a later
                # one aborts it (abort_stale_writes); a bucket lifecycle rule
                # (AbortIncompleteMultipartUpload) is the last resort.
                self.s._unaborted.add(self.name)
                log.warning(
                    "could not abort multipart upload %s of %s: %s", upload_id, self.what,
                    self.s._error(e, self.what, "abort the upload of"),
                )

    # internals

    def _complete(self) -> None:
        parts = sorted(self._parts, key=lambda p: p["PartNumber"])
        try:
            self.s.client.complete_multipart_upload(
                Bucket=self.s.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
        except bce.ClientError as e:
            # botocore retries a completion whose response was lost; AWS then answers
            # NoSuchUpload although the first attempt succeeded. The object's ETag tells.
            if _code(e) == "NoSuchUpload" and self._landed(parts):
                return
            if _code(e) == "NoSuchUpload":
                raise MergeError(
                    "storage_error",
                    f"the multipart upload of {self.what} was aborted or expired before it completed",
                ) from None
            raise

    def _landed(self, parts: list[dict]) -> bool:
        expected = multipart_etag([p["ETag"] for p in parts])
        try:
            head = self.s.client.head_object(Bucket=self.s.bucket, Key=self.key)
        except Exception:
            return False
        return expected is not None and head.get("ETag", "").strip('"') == expected

    def _send_part(self, data) -> None:
        if self._upload_id is None:
            try:
                resp = self.s.client.create_multipart_upload(Bucket=self.s.bucket, Key=self.key)
            except Exception as e:
                raise self.s._error(e, self.what, "start the upload of") from None
            self._upload_id = resp["UploadId"]
            self._uploader = ThreadPoolExecutor(self.threads, thread_name_prefix="drmerge-s3-put")
        number = self._next_part
        if number > _MAX_PARTS:
            raise MergeError(
                "storage_error",
                f"{self.what} needs more than {_MAX_PARTS} parts of {self.part_size} bytes; use a larger part_size",
            )
        self._next_part += 1
        self._drain(self.max_pending - 1)
        self._pending.append(self._uploader.submit(self._upload_part, number, data))

    def _upload_part(self, number: int, data) -> None:
        try:
            resp = self.s.client.upload_part(
                Bucket=self.s.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=data
            )
        except Exception as e:
            raise self.s._error(e, self.what, "write") from None
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        # If the SDK attached a checksum to the part, completion must repeat it.
        for field in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256"):
            if resp.get(field):
                part[field] = resp[field]
        self._parts.append(part)

    def _drain(self, keep: int) -> None:
        """Wait until at most ``keep`` uploads are pending; re-raise the first failure."""
        while len(self._pending) > keep:
            self._pending.popleft().result()
        # Failures of parts finished out of order surface now rather than at commit.
        for f in self._pending:
            if f.done() and f.exception() is not None:
                f.result()

    def _shutdown(self) -> None:
        if self._uploader is not None:
            self._uploader.shutdown(wait=True, cancel_futures=True)
            self._uploader = None


def multipart_etag(part_etags: list[str]) -> str | None:
    """The ETag S3 gives a completed multipart object: MD5 of the parts' binary MD5s,
    a dash, and the part count. None when the part ETags are not MD5s (SSE-KMS)."""
    digests = []
    for etag in part_etags:
        etag = etag.strip('"')
        if len(etag) != 32:
            return None
        try:
            digests.append(bytes.fromhex(etag))
        except ValueError:
            return None
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


# -- error mapping ----------------------------------------------------------------------


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _status(e: BaseException) -> int | None:
    return getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


def _object_size(e: BaseException, default: int) -> int:
    """The object size a 416 response states in ``Content-Range: bytes */SIZE``."""
    headers = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
    value = headers.get("content-range", "")
    try:
        return int(value.rpartition("/")[2])
    except ValueError:
        return default


def _short_object(what: str, start: int, length: int, at: int) -> MergeError:
    return MergeError(
        "corrupt_checkpoint",
        f"{what} ends at byte {at}, before the {length} bytes expected at offset {start}",
    )


def map_s3_error(exc: BaseException, what: str, action: str, bucket_uri: str | None = None) -> MergeError:
    """The MergeError for a boto3/botocore failure while doing ``action`` to ``what``
    (a full s3:// URI). Called after botocore's own retries are spent."""
    if isinstance(exc, MergeError):
        return exc
    if isinstance(exc, bce.ClientError):
        code, status = _code(exc), _status(exc)
        message = exc.response.get("Error", {}).get("Message") or code or f"HTTP {status}"
        if code == "NoSuchUpload":
            return MergeError("storage_error", f"the multipart upload of {what} is gone (aborted or expired)")
        if code == "NoSuchBucket":
            bucket = f" (no bucket {bucket_uri})" if bucket_uri else ""
            return MergeError("input_not_found", f"{what} does not exist{bucket}")
        if code in _NOT_FOUND_CODES or status == 404:
            return MergeError("input_not_found", f"{what} does not exist")
        if code == "InvalidBucketName":
            return MergeError("invalid_spec", f"invalid S3 location {what}: {message}")
        if code in _DENIED_CODES or status == 403:
            return MergeError(
                "access_denied",
                f"S3 refused to {action} {what}: {code or status} ({message}); check the credentials and bucket policy",
            )
        retried = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        tries = f" after {retried + 1} attempts" if retried else ""
        return MergeError("storage_error", f"S3 failed to {action} {what}{tries}: {code or status} ({message})")
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return MergeError(
            "access_denied",
            f"no usable S3 credentials to {action} {what}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, or an instance role ({exc})",
        )
    if isinstance(exc, bce.ParamValidationError):
        return MergeError("invalid_spec", f"invalid S3 location {what}: {exc}")
    if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError)):
        return MergeError("storage_error", f"cannot reach S3 to {action} {what}: {exc}")
    if isinstance(exc, (bce.BotoCoreError, *_BODY_ERRORS, OSError)):
        return MergeError("storage_error", f"S3 failed to {action} {what}: {exc}")
    return MergeError("internal_error", f"unexpected error while trying to {action} {what}: {exc!r}")

"""Where checkpoints live: a local directory or an S3 prefix, behind one small interface.

The engine only ever needs a flat "directory of objects": read a byte range of one
object, read a small object whole, list names, and write objects so that a reader never
sees a half-written one (local: temp file + rename; S3: multipart upload completed at
the end). Anything that goes wrong becomes a MergeError with a stable code.

The interface itself (Storage, ObjectWriter) is defined in drmerge.storage_base, which the
backends build on; it is re-exported here, where the engine takes it from.
"""

from __future__ import annotations

import os
import threading
import uuid

from .errors import MergeError
from .storage_base import ObjectWriter, Storage

__all__ = ["ObjectWriter", "Storage", "LocalStorage", "is_s3_uri", "open_storage"]


class LocalStorage(Storage):
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.uri = self.path
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._p(name))

    def size(self, name: str) -> int:
        try:
            return os.stat(self._p(name)).st_size
        except FileNotFoundError:
            raise MergeError("input_not_found", f"{self.describe(name)} does not exist") from None
        except OSError as e:
            raise MergeError("storage_error", f"cannot stat {self.describe(name)}: {e}") from None

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                try:
                    fd = os.open(self._p(name), os.O_RDONLY)
                except FileNotFoundError:
                    raise MergeError("input_not_found", f"{self.describe(name)} does not exist") from None
                except OSError as e:
                    raise MergeError("storage_error", f"cannot open {self.describe(name)}: {e}") from None
                self._fds[name] = fd
            return fd

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        fd = self._fd(name)
        done = 0
        while done < length:
            # os.preadv is position-explicit, so threads can share one descriptor.
            n = os.preadv(fd, [view[done:]], start + done)
            if n == 0:
                raise MergeError(
                    "corrupt_checkpoint",
                    f"{self.describe(name)} ends at byte {start + done}, before the {length} bytes expected at offset {start}",
                )
            done += n
        return buf

    def list_files(self) -> list[str]:
        if not os.path.isdir(self.path):
            raise MergeError("input_not_found", f"directory {self.path} does not exist")
        return sorted(e.name for e in os.scandir(self.path) if e.is_file())

    def open_writer(self, name: str) -> ObjectWriter:
        os.makedirs(self.path, exist_ok=True)
        return _LocalWriter(self._p(name))

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._p(name))
        except FileNotFoundError:
            pass

    def abort_stale_writes(self, strict: bool = False) -> int:
        if not os.path.isdir(self.path):
            return 0
        dropped = 0
        for e in os.scandir(self.path):
            if e.is_file() and e.name.startswith(".") and e.name.endswith(".partial"):
                self.delete(e.name)
                dropped += 1
        return dropped

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class _LocalWriter(ObjectWriter):
    def __init__(self, final_path: str):
        self.final_path = final_path
        # The temp name is hidden and unique so a crashed run never leaves something that
        # looks like a shard, and two writers never collide.
        d, base = os.path.split(final_path)
        self.tmp_path = os.path.join(d, f".{base}.{uuid.uuid4().hex[:8]}.partial")
        self._f = open(self.tmp_path, "wb")

    def write(self, data) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.final_path)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def open_storage(uri: str, s3_options: dict | None = None) -> Storage:
    """Storage for a local path or an ``s3://bucket/prefix/`` URI."""
    if is_s3_uri(uri):
        from .s3 import S3Storage  # boto3 is only imported when S3 is used

        return S3Storage(uri, **(s3_options or {}))
    if "://" in uri:
        raise MergeError("invalid_spec", f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix/")
    return LocalStorage(uri)

"""The storage interface every backend implements: a flat directory of objects.

The engine only ever needs a flat "directory of objects": read a byte range of one
object, read a small object whole, list names, and write objects so that a reader never
sees a half-written one. Backends (drmerge.storage's LocalStorage, drmerge.s3's
S3Storage) depend on this module and nothing above it; drmerge.storage picks one for a
URI, so neither backend imports the other and drmerge.storage is the only module that
knows them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ObjectWriter(ABC):
    """A streamed write of one object; invisible to readers until ``commit``."""

    @abstractmethod
    def write(self, data) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Drop everything written so far; safe to call twice or after a failure."""


class Storage(ABC):
    """A flat directory of objects addressed by name (``model.safetensors``)."""

    uri: str

    def describe(self, name: str) -> str:
        """Full location of an object, for messages."""
        return self.uri.rstrip("/") + "/" + name

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def read_range(self, name: str, start: int, length: int) -> bytearray: ...

    def read_bytes(self, name: str) -> bytes:
        return bytes(self.read_range(name, 0, self.size(name)))

    @abstractmethod
    def list_files(self) -> list[str]:
        """Names of the objects directly in this directory (not below it)."""

    @abstractmethod
    def open_writer(self, name: str) -> ObjectWriter: ...

    def write_bytes(self, name: str, data: bytes) -> None:
        writer = self.open_writer(name)
        try:
            writer.write(data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove an object; a missing one is not an error."""

    def abort_stale_writes(self, strict: bool = False) -> int:
        """Drop unfinished writes a crashed run left directly in this directory (S3:
        pending multipart uploads; local: hidden temp files). Only safe when no other
        writer is active here: the service guarantees that with its output reservation.
        Returns how many were dropped. Best effort unless ``strict`` (then a failure to
        list or abort raises MergeError: the caller must know the directory is clean)."""
        return 0

    def unaborted_writes(self) -> list[str]:
        """Names whose unfinished write this storage failed to drop (an ``abort`` that
        could not reach the server): work for ``abort_stale_writes``."""
        return []

    def close(self) -> None:
        """Release cached handles or connections."""

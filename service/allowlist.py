"""Which storage a tenant may touch: S3 bucket/prefix allow lists, checked at submit.

An entry ``s3://bucket/team`` allows that bucket's keys under ``team/`` and nothing else:
matching is on path segments, so it does not allow ``s3://bucket/teamx/``. ``s3://bucket``
allows the whole bucket, ``*`` every location. ``allow`` entries cover inputs and outputs;
``allow_read`` entries cover inputs only (a shared bucket of base models, say).

A location must be inside an entry both as written and with ``.``/``..`` segments
resolved and empty segments collapsed: S3 keys are literal strings, but a proxy or an
S3-compatible server that normalises paths would read ``team/../other/`` as ``other/``,
so either reading has to stay inside. The engine's own parser (``drmerge.s3.parse_s3_uri``)
decides which prefix a URI means, so the check and the merge agree on it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from drmerge.errors import MergeError

ANY = "*"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


class AllowListError(ValueError):
    pass


def _split(uri: str) -> tuple[str, str]:
    """``s3://b/x/y`` -> ("b", "x/y/"): the engine's reading of a location."""
    from drmerge.s3 import parse_s3_uri  # imports boto3: only when a list is checked

    return parse_s3_uri(uri)


def _normalised(prefix: str) -> str | None:
    """``a/./b/../c//d/`` -> ``a/c/d/``; None if ``..`` climbs above the bucket root."""
    if not prefix:
        return ""
    depth = 0
    for seg in prefix.split("/"):
        if seg == "..":
            depth -= 1
            if depth < 0:
                return None
        elif seg and seg != ".":
            depth += 1
    norm = posixpath.normpath("/" + prefix).lstrip("/")
    return "" if norm in ("", ".") else norm + "/"


@dataclass(frozen=True)
class Entry:
    bucket: str
    prefix: str  # "" (whole bucket) or ending in "/"

    @classmethod
    def parse(cls, text: str) -> "Entry":
        if not isinstance(text, str) or not text.startswith("s3://"):
            raise AllowListError(f"an allow entry is s3://bucket[/prefix] or '*', got {text!r}")
        try:
            bucket, prefix = _split(text)
        except MergeError as e:
            raise AllowListError(f"bad allow entry {text!r}: {e.message}") from None
        if not _BUCKET_RE.fullmatch(bucket):
            raise AllowListError(f"bad allow entry {text!r}: not a valid bucket name")
        if any(seg in (".", "..") for seg in prefix.split("/")):
            raise AllowListError(f"bad allow entry {text!r}: '.' and '..' segments are not allowed")
        return cls(bucket, prefix)

    def covers(self, bucket: str, prefix: str) -> bool:
        return bucket == self.bucket and prefix.startswith(self.prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class AccessList:
    write: tuple[Entry, ...] = ()
    read: tuple[Entry, ...] = ()
    any_location: bool = False

    @classmethod
    def parse(cls, allow=(), allow_read=()) -> "AccessList":
        allow, allow_read = list(allow or ()), list(allow_read or ())
        if ANY in allow_read:
            raise AllowListError("'*' is an --allow entry (any location, read and write), not --allow-read")
        any_location = ANY in allow
        write = tuple(Entry.parse(a) for a in allow if a != ANY)
        read = tuple(Entry.parse(a) for a in allow_read)
        return cls(write, read, any_location)

    @classmethod
    def unrestricted(cls) -> "AccessList":
        return cls(any_location=True)

    @property
    def write_entries(self) -> tuple[str, ...]:
        return ((ANY,) if self.any_location else ()) + tuple(str(e) for e in self.write)

    @property
    def read_entries(self) -> tuple[str, ...]:
        return tuple(str(e) for e in self.read)

    def allows(self, uri: str, *, write: bool) -> bool:
        """May this key read (or, with ``write``, write) the S3 location ``uri``?
        Raises MergeError(invalid_spec) for a URI the engine itself would refuse."""
        if self.any_location:
            return True
        bucket, prefix = _split(uri)
        norm = _normalised(prefix)
        if norm is None:
            return False
        entries = self.write if write else self.write + self.read
        return any(e.covers(bucket, prefix) for e in entries) and any(e.covers(bucket, norm) for e in entries)

"""Which storage a tenant may touch: S3 bucket/prefix allow lists, checked at submit.

An entry ``s3://bucket/team`` allows that bucket's keys under ``team/`` and nothing else:
matching is on path segments, so it does not allow ``s3://bucket/teamx/``. ``s3://bucket``
allows the whole bucket, ``*`` every location. ``allow`` entries cover inputs and outputs;
``allow_read`` entries cover inputs only (a shared bucket of base models, say).

Entries and locations are compared in drmerge.locations' canonical form, the one the
spec parser gives every location and the S3 storage reads: ``s3://bucket//team/`` is
``s3://bucket/team/``, and the spellings storages read differently (``.``/``..``
segments, ``a//b`` inside a key, backslashes) are refused outright rather than resolved
one way here and another way by the server, so no alias leads out of an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from drmerge import locations
from drmerge.errors import MergeError

ANY = "*"


class AllowListError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    location: str  # canonical: s3://bucket/ (whole bucket) or s3://bucket/prefix/

    @classmethod
    def parse(cls, text: str) -> "Entry":
        if not isinstance(text, str) or not locations.is_s3(text):
            raise AllowListError(f"an allow entry is s3://bucket[/prefix] or '*', got {text!r}")
        try:
            return cls(locations.canonical(text))
        except MergeError as e:
            raise AllowListError(f"bad allow entry {text!r}: {e.message}") from None

    def covers(self, location: str) -> bool:
        return locations.contains(self.location, location)

    def __str__(self) -> str:
        return self.location


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
        """May this key read (or, with ``write``, write) the S3 location ``uri``? Matched
        on its canonical form (the spec parser has usually made it so already).
        Raises MergeError(invalid_spec) for a URI the engine itself would refuse."""
        if not locations.is_s3(uri):
            raise MergeError("invalid_spec", f"{uri!r} is not an s3:// URI")
        location = locations.canonical(uri)  # pure string work for s3://, and idempotent
        if self.any_location:
            return True
        entries = self.write if write else self.write + self.read
        return any(e.covers(location) for e in entries)

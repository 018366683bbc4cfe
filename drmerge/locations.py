"""Storage locations in one canonical form, and the one containment rule.

Two spellings of one place must never pass as two places: an output spelled
``s3://b//team/ft/`` once overwrote the input ``s3://b/team/ft/``, and two jobs wrote
``.../out/`` and ``.../out//`` at once. So a location is made canonical once, when the
spec is parsed (drmerge.spec), and everything after that (the output-vs-input check, the
service's allow lists and output reservations, the S3 storage) compares canonical
strings with :func:`contains` only. Pure Python: the API process uses it without boto3.

S3: ``s3://bucket/`` + key prefix, every segment non-empty, exactly one trailing ``/``
(``s3://bucket/`` is the whole bucket). Leading and trailing slashes are dropped, as the
engine always read them (``s3://b//x//`` is ``s3://b/x/``). Refused, because S3 and the
servers and proxies in front of it read them differently (AWS keeps keys literally;
SeaweedFS, measured: collapses ``a//b`` to ``a/b``, turns ``\\`` into ``/``, answers 400
to ``.``/``..`` segments; path-normalising proxies resolve ``..``), so one string would
name two places:

- an empty segment inside the key (``a//b``),
- ``.`` and ``..`` segments,
- a backslash,
- ASCII control characters (S3 lists keys in XML, which cannot carry most of them).

Other characters (``%``, spaces, non-ASCII, ``?``, ``#``) are kept: every store tried
keeps them literally. Bucket names follow S3's rules (3-63 of ``a-z 0-9 . -``, no
``..``), so case never aliases a bucket.

Local paths: the resolved real path (``os.path.realpath``: absolute, no ``.``/``..``, no
symlinks), so a symlink or a ``..`` cannot make an input and the output look apart.
"""

from __future__ import annotations

import os
import re

from .errors import MergeError

S3_SCHEME = "s3://"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _invalid(message: str) -> MergeError:
    return MergeError("invalid_spec", message)


def is_s3(location: str) -> bool:
    return location.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket//some/prefix`` -> (``bucket``, ``some/prefix/``): the bucket and the
    normalised key prefix ("" for the whole bucket, else ending in ``/``). Refuses the
    segments listed in the module docstring. Bucket names are not judged here (the S3
    storage opens whatever it is given); :func:`canonical` judges them."""
    if not is_s3(uri):
        raise _invalid(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise _invalid(f"{uri!r} has no bucket name: use s3://bucket/prefix/")
    key = key.strip("/")
    if not key:
        return bucket, ""
    if "\\" in key:
        raise _invalid(f"{uri!r} has a backslash in its key: some S3 servers read it as '/', so it would "
                       "name two places; use '/' between segments")
    if _CONTROL_RE.search(key):
        raise _invalid(f"{uri!r} has a control character in its key")
    for seg in key.split("/"):
        if seg == "":
            raise _invalid(f"{uri!r} has an empty path segment ('//') inside its key: S3 keeps it while "
                           "other servers collapse it, so it would name two places; write one '/'")
        if seg in (".", ".."):
            raise _invalid(f"{uri!r} has a {seg!r} segment: S3 keys are literal, but servers and proxies "
                           "resolve or refuse it; name the prefix without '.' and '..'")
    return bucket, key + "/"


def canonical(value: str, base_dir: str | None = None, *, allow_relative: bool = True) -> str:
    """The canonical form of a location as a user wrote it (a local path or an
    ``s3://`` URI). Relative local paths resolve against ``base_dir`` (default: the
    current directory), or are refused when ``allow_relative`` is false (the service,
    whose working directory means nothing to a caller). Raises MergeError(invalid_spec)."""
    if is_s3(value):
        bucket, prefix = split_s3(value)
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise _invalid(f"{value!r} does not name a valid S3 bucket (3-63 characters of a-z, 0-9, '.', '-')")
        return f"{S3_SCHEME}{bucket}/{prefix}"
    if "://" in value:
        raise _invalid(f"unsupported URI scheme in {value!r}: use a local path or s3://bucket/prefix/")
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        if base_dir is None and not allow_relative:
            raise _invalid(f"{value!r} is a relative path: use an absolute path or s3://bucket/prefix/")
        path = os.path.join(base_dir if base_dir is not None else os.getcwd(), path)
    return os.path.realpath(path)


def _require_canonical(location: str) -> None:
    if is_s3(location):
        bucket, prefix = split_s3(location)
        ok = location == f"{S3_SCHEME}{bucket}/{prefix}"
    else:
        ok = os.path.isabs(location) and os.path.normpath(location) in (location, location.rstrip("/"))
    if not ok:
        raise ValueError(f"{location!r} is not a canonical location (drmerge.locations.canonical makes one)")


def as_prefix(location: str) -> str:
    """A canonical location as a string ending in ``/``, so that a plain string-prefix
    test is a test on whole path segments (``/data/out/`` is not a prefix of
    ``/data/outx/``). S3 locations already are; this is also the service's reservation
    key for an output."""
    _require_canonical(location)
    return location if location.endswith("/") else location + "/"


def contains(outer: str, inner: str) -> bool:
    """True when the canonical location ``inner`` is ``outer`` or lies inside it."""
    return as_prefix(inner).startswith(as_prefix(outer))


def overlaps(a: str, b: str) -> bool:
    """True when one canonical location equals or contains the other: writing (or, with
    overwrite, clearing) one of them could touch the other's objects."""
    return contains(a, b) or contains(b, a)


def relation(a: str, b: str) -> str | None:
    """How ``a`` stands to ``b`` in words (``"is"``, ``"lies inside"``, ``"contains"``), or
    None when they do not overlap; for messages that name both."""
    if as_prefix(a) == as_prefix(b):
        return "is"
    if contains(b, a):
        return "lies inside"
    if contains(a, b):
        return "contains"
    return None


def parents(location: str) -> list[str]:
    """Every location that strictly contains a canonical ``location``, outermost first,
    in :func:`as_prefix` form: ``s3://b/x/y/`` -> ``["s3://b/", "s3://b/x/"]``,
    ``/data/out`` -> ``["/", "/data/"]``. As many as the location has segments, so a
    check of them all costs the depth, not the number of other locations."""
    key = as_prefix(location)
    if is_s3(key):
        root_end = key.index("/", len(S3_SCHEME)) + 1  # after "s3://bucket/"
    else:
        root_end = 1  # after "/"
    out = []
    i = key.find("/", root_end - 1)
    while i != -1 and i + 1 < len(key):
        out.append(key[:i + 1])
        i = key.find("/", i + 1)
    return out

"""``ETag`` and ``If-None-Match`` on job reads, so that pollers (dashboards, ``drmerge
wait``, the job page) get ``304 Not Modified`` with no body while nothing changed.

The tag is a hash of the exact JSON body, so it changes whenever any field does (status,
progress, webhook state) and is the same on every API replica. ``Cache-Control: private,
no-cache``: a cache may keep the answer, but must ask again every time; ``Vary:
Authorization``: tenants never share a cached answer.
"""

from __future__ import annotations

import hashlib
import json

from fastapi import Request
from fastapi.responses import Response

HEADERS = {"cache-control": "private, no-cache", "vary": "Authorization"}


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison against a list of tags (or ``*``)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    plain = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == plain for t in if_none_match.split(","))


def json_response(request: Request, payload, status_code: int = 200, headers: dict | None = None) -> Response:
    """``payload`` as JSON with its ETag; 304 and no body when the caller has it already."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    etag = etag_of(body)
    all_headers = {**HEADERS, "etag": etag, **(headers or {})}
    if request.method in ("GET", "HEAD") and matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=all_headers)
    return Response(body, status_code=status_code, media_type="application/json", headers=all_headers)

"""Size limits on what a caller may send, so that no request costs unbounded memory or CPU
and every refusal is a problem+json with a code, never a 500.

- ``BodyLimitMiddleware``: bodies over ``max_body_bytes`` are 413 ``payload_too_large``
  (from Content-Length before anything is read; a chunked body is counted as it
  arrives), and JSON nested deeper than ``MAX_JSON_DEPTH`` is 422 before any parser
  recurses into it (Python's json, pydantic and our own code all recurse).
- ``check_spec``: models per job and the length of every string in a spec, with the
  ``param`` at fault, before the spec parser does any work on it.

The per-tenant queue quota (429) is enforced atomically where jobs are created
(``JobStore.create``), metadata limits in the route.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers

from .problems import Problem, make_problem

MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether JSON text ``body`` nests arrays/objects deeper than ``limit``, without
    parsing it (brackets inside strings do not count). Linear time."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    for b in brackets:
        if b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


class BodyLimitMiddleware:
    """Buffers a request body (at most ``max_bytes``) before the app sees it."""

    def __init__(self, app, max_bytes: int, problem_type_base: str, max_depth: int = MAX_JSON_DEPTH):
        self.app, self.max_bytes, self.base, self.max_depth = app, max_bytes, problem_type_base, max_depth

    def _too_large(self, scope):
        return make_problem(self.base, scope["path"], 413, "payload_too_large",
                            f"the request body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is None and "transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                resp = make_problem(self.base, scope["path"], 400, "invalid_request", "bad Content-Length")
                return await resp(scope, receive, send)
            if declared > self.max_bytes:
                return await self._too_large(scope)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body[:1] in (b"{", b"[") or body.lstrip()[:1] in (b"{", b"["):
            if json_depth_exceeds(body, self.max_depth):
                resp = make_problem(self.base, scope["path"], 422, "invalid_request",
                                    f"the JSON body is nested deeper than {self.max_depth} levels")
                return await resp(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def check_spec(raw, max_models: int, max_string: int) -> None:
    """Refuse oversized specs before parsing them: 422 ``invalid_spec`` with the param."""
    if not isinstance(raw, dict):
        return  # the spec parser explains what a spec must be
    models = raw.get("models")
    if isinstance(models, list) and len(models) > max_models:
        raise Problem(422, "invalid_spec", f"models: at most {max_models} models per job on this service, "
                      f"got {len(models)}", "spec.models")
    stack = [("spec", raw)]
    while stack:  # iterative: depth is bounded by the body middleware, but stay flat anyway
        path, value = stack.pop()
        if isinstance(value, str):
            if len(value) > max_string:
                raise Problem(422, "invalid_spec", f"{path[5:] or 'spec'}: strings in a spec are at most "
                              f"{max_string} characters, got {len(value)}", path)
        elif isinstance(value, dict):
            for k, v in value.items():
                child = f"{path}.{k}"
                if len(k) > max_string:
                    raise Problem(422, "invalid_spec", f"a key of {path} is longer than {max_string} characters",
                                  path)
                stack.append((child, v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))

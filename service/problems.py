"""Every error the API returns is RFC 9457 ``application/problem+json`` with a stable code.

Body: ``type`` (``<problem_type_base><code>``), ``title``, ``status``, ``detail``, ``code``
and ``param`` (the request field at fault, as a path like ``spec.models[1].model``, or
null). Clients branch on ``code``; ``detail`` is for people.

Codes beyond the engine's (drmerge.errors.CODES): ``invalid_request``, ``not_found``,
``method_not_allowed``, ``idempotency_key_reused``, ``job_not_cancellable``,
``job_not_succeeded`` and ``not_downloadable`` (409: no download links), ``output_busy``,
``unavailable``, and for access control and limits ``unauthorized``
(401), ``payload_too_large`` (413) and ``quota_exceeded`` (429). The engine's
``access_denied`` is also an HTTP answer (403: a spec names storage outside the key's
allow list).
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("drmerge.api")

PROBLEM_JSON = "application/problem+json"

TITLES = {
    "invalid_request": "Invalid request",
    "invalid_spec": "Invalid merge spec",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "idempotency_key_reused": "Idempotency key reused with a different request",
    "job_not_cancellable": "Job cannot be cancelled",
    "job_not_succeeded": "Job has not succeeded",
    "not_downloadable": "Output cannot be downloaded",
    "output_busy": "Output is being written by another job",
    "unavailable": "Service unavailable",
    "unauthorized": "Missing or invalid API key",
    "access_denied": "Access denied",
    "payload_too_large": "Request body too large",
    "quota_exceeded": "Too many queued jobs",
    "internal_error": "Internal error",
}


class Problem(Exception):
    def __init__(self, status: int, code: str, detail: str, param: str | None = None,
                 headers: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.code, self.detail, self.param = status, code, detail, param
        self.headers = headers
        self.extra = extra


def problem_response(request: Request, status: int, code: str, detail: str, param: str | None = None,
                     headers: dict | None = None, **extra) -> JSONResponse:
    base = getattr(request.app.state, "problem_type_base", "https://drmerge.dev/problems/")
    return make_problem(base, request.url.path, status, code, detail, param, headers, **extra)


def make_problem(base: str, path: str, status: int, code: str, detail: str, param: str | None = None,
                 headers: dict | None = None, **extra) -> JSONResponse:
    """A problem+json response without a Request (ASGI middleware answers with it)."""
    body = {"type": base + code, "title": TITLES.get(code, code.replace("_", " ").capitalize()),
            "status": status, "detail": detail, "code": code, "param": param, "instance": path}
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def loc_to_param(loc) -> str | None:
    """('body', 'models', 1, 'model') -> 'models[1].model'."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(request, exc.status, exc.code, exc.detail, exc.param, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = tuple(first.get("loc", ()))
        param = loc_to_param(loc)
        if first.get("type") == "json_invalid":
            detail = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": ")
            param = None
        else:
            msg = first.get("msg", "invalid value")
            detail = f"{param}: {msg}" if param else msg
        code = "invalid_spec" if param and (param == "spec" or param.startswith("spec.")) else "invalid_request"
        more = [{"param": loc_to_param(e.get("loc", ())), "detail": e.get("msg")} for e in errors[1:10]]
        extra = {"errors": more} if more else {}
        return problem_response(request, 422, code, detail, param, **extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        if exc.status_code >= 500:
            code = "internal_error"
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return problem_response(request, exc.status_code, code, detail, headers=getattr(exc, "headers", None))

    # Registered by class (not under Exception) so the response is an ordinary one: the
    # connection stays usable and no traceback is logged for an expected outage.
    async def _redis_down(request: Request, exc: Exception):
        log.warning("redis unavailable: %s", exc)
        return problem_response(request, 503, "unavailable", "the job store (Redis) is unreachable; retry later",
                                headers={"retry-after": "5"})

    app.add_exception_handler(redis.ConnectionError, _redis_down)
    app.add_exception_handler(redis.TimeoutError, _redis_down)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal_error", "an unexpected error occurred; it has been logged")

"""Who is calling: API keys on every /v1 request, resolved to a tenant.

``AuthMiddleware`` runs before routing and before the body is read, so a request without
a valid key learns nothing (not whether a route or a job exists, not what its body would
have been refused for) and costs us no body parsing. The tenant it finds travels in the
request scope; routes read it with ``get_principal``, which also puts the bearer scheme
in the OpenAPI document.

``DRMERGE_AUTH=disabled`` (development only) makes every request the ``default`` tenant
with no storage restriction. /livez, /readyz, /metrics and the docs never need a key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

from .allowlist import AccessList
from .problems import Problem, make_problem

log = logging.getLogger("drmerge.api")

DEFAULT_TENANT = "default"
PROTECTED_PREFIX = "/v1"


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str | None
    access: AccessList


ANONYMOUS = Principal(DEFAULT_TENANT, None, AccessList.unrestricted())


def is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def bearer_token(headers: Headers) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive), or None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class AuthMiddleware:
    """Pure ASGI (no per-request task or body copy): answers 401/503 itself, otherwise
    sets ``scope["state"]["principal"]`` and calls the app."""

    def __init__(self, app, lookup, problem_type_base: str):
        self.app = app
        self.lookup = lookup  # service.keys.AsyncKeyLookup, or None when auth is disabled
        self.base = problem_type_base

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_protected(scope["path"]):
            return await self.app(scope, receive, send)
        if self.lookup is None:
            scope.setdefault("state", {})["principal"] = ANONYMOUS
            return await self.app(scope, receive, send)
        token = bearer_token(Headers(scope=scope))
        if token is None:
            return await self._deny(scope, receive, send, "this API needs a key: send `Authorization: Bearer "
                                    "drm_...` (an operator creates one with `drmerge keys create`)", None)
        try:
            key = await self.lookup.lookup(token)
        except redis.RedisError as e:
            log.warning("redis unavailable while checking an API key: %s", e)
            resp = make_problem(self.base, scope["path"], 503, "unavailable",
                                "the job store (Redis) is unreachable; retry later", headers={"retry-after": "5"})
            return await resp(scope, receive, send)
        if key is None:
            return await self._deny(scope, receive, send, "the API key is not valid", "invalid_token")
        if key.revoked:
            return await self._deny(scope, receive, send, f"the API key {key.id} was revoked", "invalid_token")
        scope.setdefault("state", {})["principal"] = Principal(key.tenant, key.id, key.access)
        return await self.app(scope, receive, send)

    async def _deny(self, scope, receive, send, detail: str, error: str | None):
        challenge = 'Bearer realm="drmerge"' + (f', error="{error}"' if error else "")
        resp = make_problem(self.base, scope["path"], 401, "unauthorized", detail,
                            headers={"www-authenticate": challenge})
        await resp(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                     description="An API key: `Authorization: Bearer drm_...` (operators create them with "
                                 "`drmerge keys create --tenant NAME --allow s3://bucket/prefix`).")


async def get_principal(request: Request,
                        _creds: HTTPAuthorizationCredentials | None = Security(_bearer)) -> Principal:
    # async: reads what the middleware found; a sync dependency would cost a thread hop
    principal = getattr(request.state, "principal", None)
    if principal is None:  # a /v1 route reached without the middleware: never serve it
        raise Problem(401, "unauthorized", "this API needs a key")
    return principal

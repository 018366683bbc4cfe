"""API keys: each one belongs to a tenant and names the storage that tenant may use.

A key is ``drm_`` + 43 URL-safe characters (32 random bytes). It is shown once, at
creation; Redis keeps only HMAC-SHA256(pepper, key), so a copy of Redis (a backup, a
replica, a debug dump) holds no usable key, and without the pepper not even a way to test
guesses offline. The digest is also the lookup key: a request costs one HGETALL, and the
stored digest is compared again in constant time.

Redis layout (``{p}`` is ``settings.key_prefix``, shared with the job store)::

    {p}:apikey:{digest}   hash   id, tenant, allow (JSON), allow_read (JSON), created_at,
                                 revoked_at, digest
    {p}:apikeys           hash   key id -> digest (listing and revoking by id)

Revoking keeps the record (so ``keys list`` still shows it, revoked) and takes effect on
the next request: nothing is cached.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field

from .allowlist import AccessList

KEY_PREFIX = "drm_"
KEY_RE = re.compile(r"drm_[A-Za-z0-9_-]{43}")
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class KeyStoreError(Exception):
    pass


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    allow: tuple[str, ...] = ()
    allow_read: tuple[str, ...] = ()
    created_at: float = 0.0
    revoked_at: float | None = None
    digest: str = field(default="", repr=False)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def access(self) -> AccessList:
        return AccessList.parse(self.allow, self.allow_read)

    @classmethod
    def from_hash(cls, h: dict) -> "ApiKey":
        return cls(id=h["id"], tenant=h["tenant"], allow=tuple(json.loads(h.get("allow") or "[]")),
                   allow_read=tuple(json.loads(h.get("allow_read") or "[]")),
                   created_at=float(h.get("created_at") or 0),
                   revoked_at=float(h["revoked_at"]) if h.get("revoked_at") else None, digest=h.get("digest", ""))

    def public(self) -> dict:
        """What ``keys list`` shows: everything but the digest."""
        return {"id": self.id, "tenant": self.tenant, "allow": list(self.allow), "allow_read": list(self.allow_read),
                "created_at": self.created_at, "revoked_at": self.revoked_at}


def digest(pepper: bytes, key: str) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def well_formed(key: str) -> bool:
    """Cheap shape check, so junk tokens never reach Redis."""
    return bool(KEY_RE.fullmatch(key))


def check_tenant(name: str) -> str:
    if not TENANT_RE.fullmatch(name or ""):
        raise KeyStoreError("a tenant name is 1-63 characters: lowercase letters, digits, '.', '_', '-' "
                        f"(starting with a letter or digit), got {name!r}")
    return name


class KeyStore:
    """Keys in Redis. ``r`` may be a sync client (CLI, tests) for everything here; the
    API's per-request lookup is ``AsyncKeyLookup``."""

    def __init__(self, client, prefix: str, pepper: bytes):
        if not pepper:
            raise KeyStoreError("DRMERGE_API_KEY_PEPPER is not set: API keys cannot be created or checked without it")
        self.r, self.p, self.pepper = client, prefix, pepper

    @classmethod
    def from_settings(cls, settings) -> "KeyStore":
        import redis

        pepper = settings.api_key_pepper.get_secret_value().encode() if settings.api_key_pepper else b""
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10,
                                      socket_connect_timeout=5)
        return cls(client, settings.key_prefix, pepper)

    def k_key(self, dig: str) -> str:
        return f"{self.p}:apikey:{dig}"

    @property
    def k_index(self) -> str:
        return f"{self.p}:apikeys"

    def create(self, tenant: str, allow=(), allow_read=()) -> tuple[str, ApiKey]:
        """Returns (the key itself, its record). The key is not stored anywhere."""
        check_tenant(tenant)
        access = AccessList.parse(allow, allow_read)  # refuses malformed entries
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        dig = digest(self.pepper, key)
        rec = ApiKey(id="key_" + secrets.token_hex(8), tenant=tenant, allow=access.write_entries,
                     allow_read=access.read_entries, created_at=time.time(), digest=dig)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_key(dig), mapping={"id": rec.id, "tenant": rec.tenant, "allow": json.dumps(list(rec.allow)),
                                            "allow_read": json.dumps(list(rec.allow_read)),
                                            "created_at": repr(rec.created_at), "digest": dig})
        pipe.hset(self.k_index, rec.id, dig)
        pipe.execute()
        return key, rec

    def list(self) -> list[ApiKey]:
        digs = self.r.hgetall(self.k_index)
        pipe = self.r.pipeline(transaction=False)
        for d in digs.values():
            pipe.hgetall(self.k_key(d))
        keys = [ApiKey.from_hash(h) for h in pipe.execute() if h]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke by id; None if there is no such key. Revoking twice keeps the first time."""
        dig = self.r.hget(self.k_index, key_id)
        if dig is None:
            return None
        self.r.hsetnx(self.k_key(dig), "revoked_at", repr(time.time()))
        return ApiKey.from_hash(self.r.hgetall(self.k_key(dig)))

    def lookup(self, key: str) -> ApiKey | None:
        if not well_formed(key):
            return None
        dig = digest(self.pepper, key)
        return _verified(self.r.hgetall(self.k_key(dig)), dig)


class AsyncKeyLookup:
    """The per-request check in the API process, on redis.asyncio so a slow Redis does
    not hold a worker thread."""

    def __init__(self, client, prefix: str, pepper: bytes):
        if not pepper:
            raise KeyStoreError("DRMERGE_API_KEY_PEPPER is not set")
        self.r, self.p, self.pepper = client, prefix, pepper

    async def lookup(self, key: str) -> ApiKey | None:
        if not well_formed(key):
            return None
        dig = digest(self.pepper, key)
        return _verified(await self.r.hgetall(f"{self.p}:apikey:{dig}"), dig)

    async def close(self) -> None:
        await self.r.aclose()
        await self.r.connection_pool.disconnect()


def _verified(h: dict, dig: str) -> ApiKey | None:
    if not h or not hmac.compare_digest(h.get("digest", ""), dig):
        return None
    return ApiKey.from_hash(h)

"""``drmerge keys create|list|revoke``: API keys, administered by talking to Redis directly
(service.keys holds the rules; the API only ever checks keys).

Configuration and Redis problems become ``error: <code>: <message>`` lines and exit 1.
"""

from __future__ import annotations

import json
import sys
import time

from .exits import EXIT_FAILED, EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("keys", help="create, list and revoke API keys (admin: talks to Redis directly)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create a key for a tenant; prints the key alone (it is shown only once)")
    kc.add_argument("--tenant", required=True, help="tenant name: lowercase letters, digits, '.', '_', '-'")
    kc.add_argument("--allow", action="append", default=[], metavar="S3_URI",
                    help="S3 location the key may read and write, s3://bucket[/prefix] (repeat; '*' for any). "
                         "Without any --allow the key can read its tenant's jobs but submit none")
    kc.add_argument("--allow-read", action="append", default=[], metavar="S3_URI",
                    help="S3 location the key may read inputs from, but never write (repeat)")
    kc.set_defaults(func=cmd_keys_create)
    kl = keys.add_parser("list", help="list keys: id, tenant, allow, created, revoked (never the keys themselves)")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_keys_list)
    kr = keys.add_parser("revoke", help="revoke a key by id (effective on its next request)")
    kr.add_argument("id")
    kr.set_defaults(func=cmd_keys_revoke)


def _keystore():
    from service.keys import KeyStore
    from service.settings import Settings

    return KeyStore.from_settings(Settings())


def _keys_command(fn) -> int:
    """Runs a keys subcommand; configuration and Redis problems become ``error:`` lines."""
    import redis
    from pydantic import ValidationError

    from service.allowlist import AllowListError
    from service.keys import KeyStoreError

    try:
        return fn()
    except (KeyStoreError, AllowListError) as e:
        print(f"error: invalid_request: {e}", file=sys.stderr)
    except ValidationError as e:
        from .preflight import settings_error

        print(f"error: invalid_config: {settings_error(e)}", file=sys.stderr)
    except redis.RedisError as e:
        print(f"error: unavailable: cannot reach Redis (DRMERGE_REDIS_URL): {e}", file=sys.stderr)
    return EXIT_FAILED


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def cmd_keys_create(args) -> int:
    def run() -> int:
        key, rec = _keystore().create(args.tenant, allow=args.allow, allow_read=args.allow_read)
        if not rec.allow:
            print(f"note: {rec.id} has no --allow: it can read tenant {rec.tenant!r}'s jobs but submit none",
                  file=sys.stderr)
        print(f"created {rec.id} for tenant {rec.tenant!r}; the key is shown only this once:", file=sys.stderr)
        print(key)
        return EXIT_OK

    return _keys_command(run)


def cmd_keys_list(args) -> int:
    def run() -> int:
        keys = _keystore().list()
        if args.json:
            print(json.dumps([k.public() for k in keys], indent=2))
            return EXIT_OK
        if not keys:
            print("no keys")
            return EXIT_OK
        print(f"{'ID':<20}  {'TENANT':<16}  {'CREATED':<20}  {'REVOKED':<20}  ALLOW")
        for k in keys:
            allow = ", ".join(list(k.allow) + [f"{a} (read)" for a in k.allow_read]) or "-"
            print(f"{k.id:<20}  {k.tenant:<16}  {_when(k.created_at):<20}  {_when(k.revoked_at):<20}  {allow}")
        return EXIT_OK

    return _keys_command(run)


def cmd_keys_revoke(args) -> int:
    def run() -> int:
        rec = _keystore().revoke(args.id)
        if rec is None:
            print(f"error: not_found: no API key {args.id!r} (see `drmerge keys list`)", file=sys.stderr)
            return EXIT_FAILED
        print(f"{rec.id} revoked (tenant {rec.tenant!r})")
        return EXIT_OK

    return _keys_command(run)


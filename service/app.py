"""The FastAPI application: ``uvicorn service.app:app`` or ``drmerge api``.

``create_app`` wires one app to one Redis (job store), one Celery client (service.jobs.queue:
it enqueues by task name, so neither torch nor the worker is imported here) and one
metrics registry; a webhook delivery loop and the
reaper (service/reaper.py: jobs whose worker vanished) run in the background unless
disabled.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import redis
from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from . import problems
from .auth import AuthMiddleware
from .jobs.queue import make_celery, sender
from .jobs.store import JobStore
from .keys import AsyncKeyLookup
from .limits import BodyLimitMiddleware
from .metrics import RedisCollector, build_info, instrument_http
from .query import known_query_only
from .security_headers import SecurityHeadersMiddleware
from .reaper import Reaper
from .routes import health, merges, ui
from .settings import Settings, get_settings
from .webhooks import WebhookDeliverer

log = logging.getLogger("drmerge.api")

DOCS_ASSETS = "/docs-assets"  # Swagger UI's and ReDoc's JavaScript and CSS

DESCRIPTION = """
Merge fine-tuned checkpoints stored in S3 into one multitask model with DRM
(Decom-Renorm-Merge), TIES, task arithmetic or a linear average.

Submit a job with `POST /v1/merges`, then poll `GET /v1/merges/{id}` or receive a
signed webhook when it ends. Every error is `application/problem+json` with a stable `code`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    store = JobStore.from_url(settings.redis_url, prefix=settings.key_prefix,
                              idempotency_ttl_s=settings.idempotency_ttl_s)
    key_lookup = _key_lookup(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        deliverer = None
        if settings.api_deliver_webhooks:
            deliverer = WebhookDeliverer(store, settings).start()
        reaper = Reaper(store, settings, sender(app.state.celery)).start()
        try:
            yield
        finally:
            reaper.stop()
            if deliverer is not None:
                deliverer.stop()
            if key_lookup is not None:
                await key_lookup.close()

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the API itself (the
    # assets ship in the fastapi-offline wheel), so the docs work with no route to a CDN.
    app = FastAPIOffline(title="drmerge", version=_version(), description=DESCRIPTION, lifespan=lifespan,
                         docs_url="/docs", redoc_url="/redoc", openapi_url="/openapi.json",
                         static_url=DOCS_ASSETS, swagger_ui_parameters={"validatorUrl": None},
                         dependencies=[Depends(known_query_only)])
    app.state.settings = settings
    app.state.store = store
    app.state.celery = make_celery(settings)
    app.state.problem_type_base = settings.problem_type_base
    registry = CollectorRegistry()
    broker = redis.Redis.from_url(settings.celery_broker_url, socket_timeout=5, socket_connect_timeout=3)
    registry.register(RedisCollector(store, broker, settings.queue, settings.worker_heartbeat_ttl_s))
    build_info(registry, version=_version())
    app.state.registry = registry
    problems.install(app)
    # Outermost first: the key is checked before the body is even read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       problem_type_base=settings.problem_type_base)
    app.add_middleware(AuthMiddleware, lookup=key_lookup, problem_type_base=settings.problem_type_base)
    app.add_middleware(SecurityHeadersMiddleware)  # CSP and friends on /ui, /docs, /redoc
    instrument_http(app, registry)  # outermost: every answer is counted, a 401 or a 413 too
    app.include_router(merges.router)
    app.include_router(health.router)
    ui.mount(app)  # the job page, /ui
    return app


class ConfigError(RuntimeError):
    """Settings that parse but cannot run an API (``drmerge api`` prints it as one
    ``error: invalid_config: ...`` line before starting uvicorn)."""


def check_settings(settings: Settings) -> None:
    """Raise ConfigError if ``settings`` cannot serve: the checks ``create_app`` makes."""
    if settings.auth == "required" and settings.api_key_pepper is None:
        raise ConfigError("DRMERGE_AUTH=required (the default) needs DRMERGE_API_KEY_PEPPER, a secret of at "
                          "least 16 characters (e.g. `openssl rand -hex 32`); or set DRMERGE_AUTH=disabled for "
                          "a local, single-user API")


def _key_lookup(settings: Settings) -> AsyncKeyLookup | None:
    check_settings(settings)
    if settings.auth == "disabled":
        log.warning("DRMERGE_AUTH=disabled: every request is tenant 'default' with access to any storage; "
                    "never expose this API")
        return None
    import redis.asyncio

    # A blocking pool: a burst of concurrent requests waits for one of 64 connections (a
    # lookup holds one for well under a millisecond) instead of failing with "Too many
    # connections", which the default pool (100, then errors) does under load.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=64, timeout=20, decode_responses=True, socket_timeout=10,
        socket_connect_timeout=3, health_check_interval=30)
    client = redis.asyncio.Redis(connection_pool=pool)
    return AsyncKeyLookup(client, settings.key_prefix, settings.api_key_pepper.get_secret_value().encode())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("drmerge")
    except Exception:
        return "0.0.0"


_app: FastAPI | None = None


def __getattr__(name: str):
    # `uvicorn service.app:app` builds the app on first access, from the environment
    # (`drmerge api` uses `--factory service.app:create_app`).
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)

"""Probes and metrics: /livez, /readyz, /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import get_settings_dep, get_store
from ..jobs.store import JobStore
from ..settings import Settings

router = APIRouter(tags=["ops"])


@router.get("/livez", summary="Liveness: the process answers")
def livez():
    return {"status": "ok"}


def _check(fn) -> dict:
    t0 = time.perf_counter()
    try:
        detail = fn()
        out = {"ok": True}
        if detail:
            out["detail"] = detail
    except Exception as e:  # report, never raise: this is a probe
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    out["latency_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return out


def _probe_client(app, settings: Settings):
    client = getattr(app.state, "s3_probe_client", None)
    if client is None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            config=Config(signature_version=UNSIGNED, connect_timeout=2, read_timeout=3, retries={"max_attempts": 1}))
        app.state.s3_probe_client = client
    return client


def s3_reachable(client) -> str | None:
    """An unsigned ListBuckets: any HTTP answer (even AccessDenied) proves the endpoint is
    up, and the API process needs no S3 credentials of its own."""
    from botocore.exceptions import ClientError

    try:
        client.list_buckets()
    except ClientError as e:
        return f"reachable (answered {e.response.get('Error', {}).get('Code', 'an error')})"
    return None


@router.get("/readyz", summary="Readiness: Redis and S3 reachable; live worker count (zero is fine)")
def readyz(request: Request, store: JobStore = Depends(get_store), settings: Settings = Depends(get_settings_dep)):
    checks = {"redis": _check(lambda: store.ping() and None),
              "s3": _check(lambda: s3_reachable(_probe_client(request.app, settings)))}
    workers: dict = {"live": None}
    if checks["redis"]["ok"]:
        try:
            names = store.workers.live(settings.worker_heartbeat_ttl_s)
            workers = {"live": len(names), "names": names}
        except Exception as e:
            workers = {"live": None, "error": str(e)[:300]}
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ready else "unready", "checks": checks, "workers": workers},
                        status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request):
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

"""FastAPI dependencies: the objects one app instance shares (built in app.create_app).

``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, so
each would cost a thread hand-off per request (several per request, under load most of
an endpoint's overhead); these only read attributes and never block."""

from __future__ import annotations

from fastapi import Request

from .jobs.store import JobStore
from .settings import Settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_celery(request: Request):
    return request.app.state.celery


async def get_presigner(request: Request):
    """The download-URL signer (service.downloads), made on first use: an API that never
    signs needs no S3 credentials."""
    presigner = getattr(request.app.state, "presigner", None)
    if presigner is None:
        from .downloads import Presigner

        presigner = request.app.state.presigner = Presigner(request.app.state.settings)
    return presigner

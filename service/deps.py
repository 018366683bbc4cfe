"""FastAPI dependencies: the objects one app instance shares (built in app.create_app)."""

from __future__ import annotations

from fastapi import Request

from .jobstore import JobStore
from .settings import Settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_celery(request: Request):
    return request.app.state.celery

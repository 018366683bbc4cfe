"""/ui: the job page, served by the API itself (static HTML, CSS and JavaScript from this
package; no extra service, nothing from a CDN).

The page holds no secret and reads nothing without a key: the person pastes an API key,
which the page keeps in sessionStorage and sends as a Bearer header on its own /v1
calls. service/security_headers.py gives its answers a strict Content-Security-Policy:
scripts, styles and requests only from this origin, no framing; presigned S3 downloads
are plain links.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def ui_root():
    return RedirectResponse("/ui/", status_code=308)


def mount(app) -> None:
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

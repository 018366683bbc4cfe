"""The api image's command line, built the way the Dockerfile builds it, really serves.

Docker does not run here, so this mirrors the Dockerfile's `api` target step by step: a
fresh venv, `pip install ".[service]"` from a copy of the build context, the no-torch
check, then `drmerge api` with the image's environment, probed with the image's own
HEALTHCHECK command and against real Redis and S3 servers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from drmerge_ops.devservers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def dockerfile_healthcheck(target: str) -> list[str]:
    """The exec-form HEALTHCHECK CMD of a Dockerfile target, as a list."""
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
    cmd = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", stage).group(1)
    import json

    return json.loads(cmd)


def test_api_image_environment_serves(tmp_path, redis_server, s3_server):
    context = tmp_path / "src"
    # The build context the Dockerfile copies (.dockerignore keeps it to these).
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(
        ".git", ".venv", "tests", "bench", "__pycache__", "*.egg-info", ".drmerge-dev", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", ".[service]"], cwd=context, check=True,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    # The image build's own guard: torch must not be in the api environment.
    subprocess.run([py, "-c", "import importlib.util, sys; sys.exit('torch leaked into the api image' "
                              "if importlib.util.find_spec('torch') else 0)"], check=True)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRMERGE_") and k != "PYTHONPATH"}
    env.update(PATH=f"{venv}/bin:{env['PATH']}", VIRTUAL_ENV=str(venv), PYTHONDONTWRITEBYTECODE="1",
               PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(tmp_path / "cache"),
               DRMERGE_API_HOST="127.0.0.1", DRMERGE_API_PORT=str(port),
               DRMERGE_REDIS_URL=redis_server.url, DRMERGE_S3_ENDPOINT_URL=s3_server.endpoint_url,
               DRMERGE_KEY_PREFIX="apiimage", DRMERGE_API_KEY_PEPPER="image-test-pepper-0123456789")
    home = tmp_path / "home"
    home.mkdir()
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen([str(venv / "bin" / "drmerge"), "api"], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        health = dockerfile_healthcheck("api")
        deadline = time.monotonic() + 60
        while True:
            rc = subprocess.run(health, cwd=home, env=env, capture_output=True).returncode
            if rc == 0:
                break
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "the image's HEALTHCHECK never passed"
            time.sleep(0.3)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

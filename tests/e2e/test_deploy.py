"""The worker image's health check (deploy/docker/worker_healthcheck.py) against a real
Redis server and a real Celery worker process; the deployment files' own checks are in
tests/unit/test_deploy.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from deploy.validation import REPO_ROOT


# ---------------------------------------------------------------- worker health check
HEALTHCHECK = REPO_ROOT / "deploy/docker/worker_healthcheck.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRMERGE_REDIS_URL": f"redis://127.0.0.1:{port}/0", "DRMERGE_HEALTHCHECK_TIMEOUT_S": "2"}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, env=env, timeout=60)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def redis_port(tmp_path):
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (Debian package redis-server)"
    port = _free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    _wait_for(accepting, 10, "redis-server")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_worker_healthcheck_follows_a_real_celery_worker(redis_port, tmp_path):
    # No worker yet: the broker answers, but no node on this host does.
    first = _run_healthcheck(redis_port)
    assert first.returncode == 1 and "no Celery node on host" in first.stdout

    (tmp_path / "hc_app.py").write_text(
        "from celery import Celery\n"
        f"app = Celery('hc', broker='redis://127.0.0.1:{redis_port}/0')\n")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hc_app", "worker", "--pool", "prefork",
         "--concurrency", "1", "--hostname", "drmerge@%h", "--loglevel", "warning",
         "--without-gossip", "--without-mingle"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        healthy = _wait_for(lambda: (r := _run_healthcheck(redis_port)).returncode == 0 and r,
                            60, "the worker to answer the health check")
        assert f"drmerge@{socket.gethostname()} answered" in healthy.stdout
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)

    after = _run_healthcheck(redis_port)
    assert after.returncode == 1, after.stdout


def test_worker_healthcheck_fails_without_a_broker():
    result = _run_healthcheck(_free_port())
    assert result.returncode == 1
    assert "cannot reach the broker" in result.stdout

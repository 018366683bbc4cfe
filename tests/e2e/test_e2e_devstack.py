"""The README's first command: `drmerge dev up --demo` starts real servers, runs a DRM
merge through the HTTP API, and `drmerge dev down` stops everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


def drmerge(*args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    # As in the README (`.venv/bin/drmerge dev up --demo`): the venv is not activated.
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    for k in list(env):
        if k.startswith("DRMERGE_"):
            del env[k]
    return subprocess.run([sys.executable, "-m", "drmerge_ops", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_dev_up_demo_then_down(tmp_path):
    port = free_port()
    up = drmerge("dev", "up", "--demo", "--port", str(port), cwd=tmp_path)
    state_path = tmp_path / ".drmerge-dev" / "state.json"
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        out = up.stdout
        assert f"http://127.0.0.1:{port}" in out
        assert "succeeded" in out and "s3://drmerge-demo/merged/" in out
        assert "loaded .drmerge-dev/demo/merged with transformers" in out
        assert "curl -s" in out and "drmerge dev down" in out
        state = json.loads(state_path.read_text())
        pids = [p["pid"] for p in state["processes"].values()]
        assert all(_pid_alive(p) for p in pids)
        env_file = (tmp_path / ".drmerge-dev" / "env").read_text()
        assert f"DRMERGE_API_URL=http://127.0.0.1:{port}" in env_file
        # client commands find the stack from this directory without any variable
        jobs = drmerge("jobs", "--json", cwd=tmp_path)
        assert jobs.returncode == 0, jobs.stderr
        (job,) = json.loads(jobs.stdout)["data"]
        assert job["status"] == "succeeded" and job["metadata"] == {"source": "drmerge dev up --demo"}
        status = drmerge("dev", "status", "--json", cwd=tmp_path)
        assert status.returncode == 0 and json.loads(status.stdout)["readyz"]["workers"]["live"] == 1
        again = drmerge("dev", "up", cwd=tmp_path)
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        down = drmerge("dev", "down", cwd=tmp_path, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not state_path.exists()
    assert not any(_pid_alive(p) for p in pids)
    assert drmerge("dev", "status", cwd=tmp_path).returncode == 1

"""Start and stop the service's processes in the background: the API under uvicorn and
Celery merge workers, as ``python -m drmerge_ops api|worker`` children.

``drmerge dev up`` runs its stack with these, and so do the service tests (real
processes, never in-process fakes). Each child gets its own session (a Ctrl-C for the
caller does not reach it) and a log file; a start returns only once the process answers
(the API's ``/livez``, the worker's first heartbeat in Redis) and otherwise raises
StackError with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .devservers import log_tail

class StackError(RuntimeError):
    """A background process did not start (or the dev stack did not); the message says why."""


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(argv: list[str], env: dict, log_path: str, cwd: str | None = None) -> subprocess.Popen:
    """A child in its own session (a Ctrl-C for the caller does not reach it) that logs to
    ``log_path``. The project's packages are importable from the checkout even without
    an install."""
    full_env = dict(os.environ)
    full_env.update(env)
    root = _repo_root()
    full_env["PYTHONPATH"] = root + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=full_env, cwd=cwd or os.path.dirname(os.path.abspath(log_path)),
                                stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc_or_pid, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; works for our children and for pids from
    a state file."""
    if isinstance(proc_or_pid, subprocess.Popen):
        proc = proc_or_pid
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return
    pid = int(proc_or_pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our own zombie child (tests); harmless otherwise.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = f"/proc/{pid}/stat"
    if os.path.exists(stat):
        try:
            with open(stat) as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    return True


def pid_cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return None  # not Linux, or gone


def service_env(redis_url: str, s3_env: dict, **settings) -> dict:
    """Environment for API and worker processes: ``settings`` are Settings fields
    (``queue='x'`` -> ``DRMERGE_QUEUE=x``)."""
    env = {"DRMERGE_REDIS_URL": redis_url, **s3_env}
    for k, v in settings.items():
        if v is not None:
            env[f"DRMERGE_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log_path: str | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise StackError(f"process exited with {proc.returncode} before {url} answered\n{log_tail(log_path or '')}")
        if time.monotonic() > deadline:
            raise StackError(f"{url} did not answer within {timeout:.0f}s\n{log_tail(log_path or '')}")
        time.sleep(0.1)


def start_api(env: dict, port: int, log_path: str, host: str = "127.0.0.1", timeout: float = 30.0,
              log_level: str = "warning") -> subprocess.Popen:
    """``drmerge api`` (``python -m drmerge_ops api``) in the background; returns once
    /livez answers."""
    argv = [sys.executable, "-m", "drmerge_ops", "api", "--host", host, "--port", str(port), "--log-level", log_level]
    proc = _spawn(argv, env, log_path)
    try:
        wait_http(f"http://{host}:{port}/livez", timeout, proc, log_path)
    except BaseException:
        stop_process(proc, 5)
        raise
    return proc


def start_worker(env: dict, name: str, log_path: str, timeout: float = 90.0) -> subprocess.Popen:
    """``drmerge worker`` (``python -m drmerge_ops worker``) in the background; returns
    once its heartbeat is in Redis."""
    from service.jobs.store import JobStore

    argv = [sys.executable, "-m", "drmerge_ops", "worker", "--hostname", name, "--log-level", "INFO"]
    proc = _spawn(argv, env, log_path)
    store = JobStore.from_url(env["DRMERGE_REDIS_URL"], prefix=env.get("DRMERGE_KEY_PREFIX", "drmerge"))
    deadline = time.monotonic() + timeout
    try:
        while not store.workers.known(name):
            if proc.poll() is not None:
                raise StackError(f"worker exited with {proc.returncode} before its first heartbeat\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"worker sent no heartbeat within {timeout:.0f}s\n{log_tail(log_path)}")
            time.sleep(0.1)
    except BaseException:
        stop_process(proc, 5)
        raise
    finally:
        store.r.close()
    return proc

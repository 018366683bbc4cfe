"""Deployment files: the checks deploy/validate.sh runs, and proof that each one bites.

Every check passes on the repository, and every check fails on a copy with one
deliberate mistake in it: a validator that cannot fail proves nothing. The worker's
health check, against a real Redis server and a real Celery worker: tests/e2e/test_deploy.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.validation import REPO_ROOT, compose, dockerfile, docs, grafana, kube, sizing
from deploy.validation.yamlio import DuplicateKeyError, load_yaml_documents

CHECKS = {
    "dockerfile": dockerfile.check,
    "compose": compose.check,
    "k8s": kube.check,
    "grafana": grafana.check,
    "docs": docs.check,
}
DEPLOY_FILES = ("Dockerfile", ".dockerignore", "docker-compose.yml", "docker-compose.gpu.yml",
                ".env.example", "deploy", "pyproject.toml")


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The deployment files in a scratch directory, free to break."""
    for name in DEPLOY_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, tmp_path / name)
    return tmp_path


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not found in {path.name}"
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def assert_caught(problems: list[str], expected: str) -> None:
    assert problems, "the broken copy passed validation"
    assert any(expected in p for p in problems), f"expected {expected!r} among: {problems}"


# ---------------------------------------------------------------- the repository is clean
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_repository_passes(name):
    assert CHECKS[name](REPO_ROOT) == []


def test_validate_sh_passes_and_fails(repo_copy):
    env = {**os.environ, "PYTHON": sys.executable}
    ok = subprocess.run(["bash", str(REPO_ROOT / "deploy/validate.sh")], capture_output=True,
                        text=True, env=env, timeout=240)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all checks passed" in ok.stdout

    # The copy's validate.sh validates the copy (it finds its root from its own path).
    edit(repo_copy / "deploy/k8s/worker-scaledobject.yaml", "listName: drmerge", "listName: celery")
    broken = subprocess.run(["bash", str(repo_copy / "deploy/validate.sh")], capture_output=True,
                            text=True, env=env, timeout=240)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "watches list 'celery'" in broken.stdout
    assert "FAILED: Kubernetes manifests" in broken.stdout


# ---------------------------------------------------------------- Dockerfile
DOCKERFILE_BREAKS = {
    "hadolint: unpinned apt install": (
        "Dockerfile", "ENV XDG_CACHE_HOME=/tmp/.cache\n",
        "ENV XDG_CACHE_HOME=/tmp/.cache\nRUN apt-get update && apt-get install -y curl\n", "DL3008"),
    "api runs as root": ("Dockerfile", "USER 10001:10001\nEXPOSE 8000", "EXPOSE 8000", "target api: does not switch"),
    "torch leaks into api": ("Dockerfile", 'pip install --no-cache-dir ".[service]"',
                             'pip install --no-cache-dir ".[service,engine]"', "api image: stage api-build"),
    "base image not pinned": ("Dockerfile", "ARG PYTHON_VERSION=3.11.14", "ARG PYTHON_VERSION=3.11",
                              "not pinned to an exact version"),
    "worker without healthcheck": ("Dockerfile", 'HEALTHCHECK --interval=60s', "HEALTHCHECK NONE\n# --interval=60s",
                                   "target worker: no HEALTHCHECK"),
    "torch unpinned": ("Dockerfile", '"torch==${TORCH_VERSION}"\nCOPY', "torch\nCOPY",
                       "torch is not installed pinned"),
    "dockerignore drops a COPY source": (".dockerignore", "!deploy/docker/\n", "", "excluded by .dockerignore"),
    "dockerignore lets .env in": (".dockerignore", "!LICENSE\n", "!LICENSE\n!.env\n", "lets .env"),
    "dockerignore drops a package": (".dockerignore", "!drmerge_ops/\n", "", "package drmerge_ops/"),
}


@pytest.mark.parametrize("case", sorted(DOCKERFILE_BREAKS))
def test_dockerfile_checks_catch(repo_copy, case):
    path, old, new, expected = DOCKERFILE_BREAKS[case]
    edit(repo_copy / path, old, new)
    assert_caught(dockerfile.check(repo_copy), expected)


# ---------------------------------------------------------------- compose
COMPOSE_BREAKS = {
    "unknown key": ("docker-compose.yml", "    restart: unless-stopped\n\n  minio:",
                    "    restart: unless-stopped\n    restrat: always\n\n  minio:", "additional properties"),
    "redis without AOF": ("docker-compose.yml", '- --appendonly\n      - "yes"', '- --appendonly\n      - "no"',
                          "AOF persistence is off"),
    "redis may evict": ("docker-compose.yml", "      - noeviction", "      - allkeys-lru", "eviction could drop"),
    "api starts before minio is healthy": (
        "docker-compose.yml", "  minio:\n    condition: service_healthy\n  create-bucket",
        "  minio:\n    condition: service_started\n  create-bucket", "depends_on minio is 'service_started'"),
    "short worker grace": ("docker-compose.yml", "DRMERGE_WORKER_STOP_GRACE_PERIOD:-5m", "DRMERGE_WORKER_STOP_GRACE_PERIOD:-10s",
                           "stop_grace_period"),
    "secret with a default": ("docker-compose.yml",
                              "${DRMERGE_WEBHOOK_SECRET:?set DRMERGE_WEBHOOK_SECRET in .env (see .env.example)}",
                              "${DRMERGE_WEBHOOK_SECRET:-insecure}", "compose renders without DRMERGE_WEBHOOK_SECRET"),
    "api on all interfaces": ("docker-compose.yml", "${DRMERGE_API_BIND_ADDRESS:-127.0.0.1}:", "", "api: port"),
    "GPU override reserves nothing": ("docker-compose.gpu.yml", "driver: nvidia", "driver: amd", "reserves no nvidia GPU"),
    "undocumented variable": (".env.example", "REDIS_MAXMEMORY=0\n", "", "REDIS_MAXMEMORY is used"),
    "stale variable": (".env.example", "MINIO_BUCKET=drmerge\n", "MINIO_BUCKET=drmerge\nUNUSED_SETTING=1\n",
                       "documents UNUSED_SETTING"),
}


@pytest.mark.parametrize("case", sorted(COMPOSE_BREAKS))
def test_compose_checks_catch(repo_copy, case):
    path, old, new, expected = COMPOSE_BREAKS[case]
    edit(repo_copy / path, old, new)
    assert_caught(compose.check(repo_copy), expected)


def test_compose_gpu_override_merges_into_worker():
    merged, errors = compose._model(REPO_ROOT, [compose.BASE, compose.GPU])
    assert errors == []
    worker = merged["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 1, ["gpu"])
    assert worker["environment"]["DRMERGE_WORKER_DEVICE"] == "cuda"
    # The override leaves everything else of the worker as the base file has it.
    base, _ = compose._model(REPO_ROOT, [compose.BASE])
    assert base["services"]["worker"]["environment"]["DRMERGE_WORKER_DEVICE"] == "auto"
    assert worker["stop_grace_period"] == base["services"]["worker"]["stop_grace_period"]


# ---------------------------------------------------------------- Kubernetes
K8S = "deploy/k8s/"
K8S_BREAKS = {
    "unknown field": (K8S + "api-deployment.yaml", "      terminationGracePeriodSeconds: 30",
                      "      terminationGracePeriodSeconds: 30\n      hostNetwrk: true", "'hostNetwrk' was unexpected"),
    "wrong type": (K8S + "api-hpa.yaml", "minReplicas: 2", "minReplicas: two", "is not of type"),
    "duplicate key": (K8S + "redis.yaml", "  replicas: 1\n", "  replicas: 1\n  replicas: 3\n", "duplicate key 'replicas'"),
    "KEDA number not a string": (K8S + "worker-scaledobject.yaml", 'listLength: "1"', "listLength: 1",
                                 "listLength: 1 is not of type 'string'"),
    "KEDA unknown field": (K8S + "worker-scaledobject.yaml", "  pollingInterval: 15", "  pollingIntervall: 15",
                           "'pollingIntervall' was unexpected"),
    "KEDA watches another list": (K8S + "worker-scaledobject.yaml", "listName: drmerge", "listName: celery",
                                  "watches list 'celery'"),
    "KEDA address in another namespace": (K8S + "worker-scaledobject.yaml", "drmerge-redis.drmerge.svc",
                                          "drmerge-redis.default.svc", "points at namespace 'default'"),
    "KEDA cooldown shorter than a merge": (K8S + "worker-scaledobject.yaml", "cooldownPeriod: 22200",
                                           "cooldownPeriod: 600", "forever"),
    "worker asks for no GPU": (K8S + "worker-deployment.yaml", "              nvidia.com/gpu: 1\n", "",
                               "does not request a GPU", -1),
    "worker grace too short": (K8S + "worker-deployment.yaml", "terminationGracePeriodSeconds: 300",
                               "terminationGracePeriodSeconds: 30", "SIGTERM cannot wait"),
    "worker without GPU toleration": (K8S + "worker-deployment.yaml", "key: nvidia.com/gpu", "key: example.com/gpu",
                                      "no toleration"),
    "HPA aims at nothing": (K8S + "api-hpa.yaml", "    name: drmerge-api", "    name: drmerge-apii", "not defined here"),
    "HPA window beyond the API's limit": (K8S + "api-hpa.yaml", "stabilizationWindowSeconds: 300",
                                          "stabilizationWindowSeconds: 7200", "outside 0..3600"),
    "service port typo": (K8S + "api-service.yaml", "targetPort: http", "targetPort: htp", "do not declare"),
    "liveness on the wrong path": (K8S + "api-deployment.yaml", "path: /livez\n              port: http\n            periodSeconds: 10",
                                   "path: /healthz\n              port: http\n            periodSeconds: 10",
                                   "livenessProbe should GET /livez"),
    "missing ConfigMap": (K8S + "api-deployment.yaml", "name: drmerge-config", "name: drmerge-cfg",
                          "ConfigMap drmerge-cfg is not defined"),
    "selector misses the pods": (K8S + "api-pdb.yaml", "    matchLabels:\n      app.kubernetes.io/name: drmerge\n"
                                 "      app.kubernetes.io/component: api", "    matchLabels:\n      app.kubernetes.io/name: "
                                 "drmerge\n      app.kubernetes.io/component: apii", "selects no pods"),
    "wrong namespace": (K8S + "configmap.yaml", "namespace: drmerge", "namespace: default", "not 'drmerge'"),
    "kustomization misses a file": (K8S + "kustomization.yaml", "  - api-pdb.yaml\n", "", "does not list api-pdb.yaml"),
    "replicas fight the autoscaler": (K8S + "worker-deployment.yaml", "  revisionHistoryLimit: 5",
                                      "  replicas: 2\n  revisionHistoryLimit: 5", "sets spec.replicas"),
    "no seccomp profile": (K8S + "redis.yaml", "        seccompProfile:\n          type: RuntimeDefault\n", "",
                           "no seccompProfile"),
    "untagged image": (K8S + "redis.yaml", "image: redis:7.4.11-bookworm", "image: redis", "has no release tag"),
    "ServiceMonitor port typo": (K8S + "optional/servicemonitor.yaml", "- port: http", "- port: metrics",
                                 "no selected Service names"),
}


@pytest.mark.parametrize("case", sorted(K8S_BREAKS))
def test_k8s_checks_catch(repo_copy, case):
    path, old, new, expected, *count = K8S_BREAKS[case]
    edit(repo_copy / path, old, new, *count)
    assert_caught(kube.check(repo_copy), expected)


def test_k8s_unknown_kind_is_an_error_not_a_skip(repo_copy):
    (repo_copy / "deploy/k8s/optional/extra.yaml").write_text(
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n  namespace: drmerge\n")
    assert_caught(kube.check(repo_copy), "no schema for example.com/v1 Widget")


def test_worker_memory_matches_the_sizing_table():
    """The shipped worker is sized as its comment and the README say: 8B-shaped, 5 models."""
    worker = next(d for d in load_yaml_documents(REPO_ROOT / "deploy/k8s/worker-deployment.yaml")
                  if d["kind"] == "Deployment")
    resources = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
    eight_b = next(s for s in sizing.SHAPES if s.name.startswith("8B"))
    want = f"{sizing.recommended_limit_gib(sizing.ram_bytes(eight_b, 5))}Gi"
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == want


def test_sizing_model_matches_the_engine_reference_figure():
    # The engine's documented figure: Llama-3-8B with 5 models needs roughly 6 GB of GPU memory.
    eight_b = next(s for s in sizing.SHAPES if s.name.startswith("8B"))
    assert 5e9 < sizing.gpu_bytes(eight_b, 5) < 7e9
    for shape in sizing.SHAPES:
        rams = [sizing.ram_bytes(shape, t) for t in sizing.MODEL_COUNTS]
        gpus = [sizing.gpu_bytes(shape, t) for t in sizing.MODEL_COUNTS]
        assert rams == sorted(rams) and gpus == sorted(gpus)


def test_yaml_loader_rejects_duplicates_but_allows_merge_overrides(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {a: 1, b: 2}\nchild:\n  <<: *b\n  b: 3\n")
    assert load_yaml_documents(ok)[0]["child"] == {"a": 1, "b": 3}
    dup = tmp_path / "dup.yaml"
    dup.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(DuplicateKeyError, match="duplicate key 'a' at line 3"):
        load_yaml_documents(dup)


# ---------------------------------------------------------------- Grafana and docs
GRAFANA_BREAKS = {
    "unknown metric": ("max(drmerge_queue_depth)", "max(drmerge_queue_dept)", "unknown metric 'drmerge_queue_dept'"),
    "PromQL syntax error": ("max(drmerge_workers_live)", "max(drmerge_workers_live", "PromQL does not parse"),
    "label the metric lacks": ('drmerge_jobs{status=\\"running\\"}', 'drmerge_jobs{state=\\"running\\"}',
                               "drmerge_jobs has no label 'state'"),
    "a metric without a panel": ("sum(rate(drmerge_bytes_read_total[$__rate_interval]))",
                                 "sum(rate(drmerge_bytes_written_total[$__rate_interval]))",
                                 "no panel shows drmerge_bytes_read_total"),
    "duplicate panel id": ('"id": 2,', '"id": 1,', "id missing or not unique"),
    "not JSON": ('"title": "drmerge",', '"title": "drmerge",,', "not valid JSON"),
    "duplicate JSON key": ('"title": "drmerge",', '"title": "drmerge",\n  "title": "again",', "duplicate key"),
}


@pytest.mark.parametrize("case", sorted(GRAFANA_BREAKS))
def test_grafana_checks_catch(repo_copy, case):
    old, new, expected = GRAFANA_BREAKS[case]
    edit(repo_copy / grafana.DASHBOARD, old, new)
    assert_caught(grafana.check(repo_copy), expected)


def test_readme_sizing_table_must_stay_in_sync(repo_copy):
    edit(repo_copy / docs.README, "| 27.5 GiB |", "| 20.0 GiB |")
    assert_caught(docs.check(repo_copy), "sizing table is stale")

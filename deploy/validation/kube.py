"""Kubernetes manifest checks: schemas for every document, then the cross-references.

Schemas: core kinds against the OpenAPI-derived JSON schemas that kubernetes-validate
ships (strict: unknown fields are errors), for the oldest and newest Kubernetes versions
we support; KEDA's ScaledObject, the ServiceMonitor and the Kustomization against schemas
vendored in ./schemas. A document of a kind with no schema is an error, never skipped.

Schemas say each object is well-formed; they cannot say the objects fit together. The
second half checks what `kubectl apply` would accept but the cluster would then get
wrong: selectors that match nothing, autoscalers aimed at missing Deployments, probes on
undeclared ports, a worker that does not ask for a GPU, a KEDA trigger watching some
other list than the Celery queue, and so on.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import referencing

from .yamlio import DuplicateKeyError, load_json, load_yaml_documents

K8S_DIR = Path("deploy/k8s")
OPTIONAL_DIR = "optional"
# Oldest and newest Kubernetes we claim (the API pods use the preStop `sleep` action,
# on by default since 1.30).
K8S_VERSIONS = ("1.30.0", "1.37.0")
SCHEMAS = Path(__file__).with_name("schemas")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.schema.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization-v1beta1.schema.json",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
CELERY_QUEUE = "drmerge"
GPU = "nvidia.com/gpu"
MIN_WORKER_GRACE_S = 120   # a tensor step takes up to ~1 min on CPU; SIGTERM waits for it
MAX_STABILIZATION_S = 3600  # the HPA API's limit


# ------------------------------------------------------------------ loading
def manifest_files(root: Path) -> list[Path]:
    return sorted((root / K8S_DIR).rglob("*.yaml")) + sorted((root / K8S_DIR).rglob("*.yml"))


def load(root: Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    docs, problems = [], []
    for path in manifest_files(root):
        rel = path.relative_to(root)
        try:
            for doc in load_yaml_documents(path):
                if not isinstance(doc, dict) or not {"apiVersion", "kind"} <= doc.keys():
                    problems.append(f"{rel}: a document without apiVersion/kind")
                    continue
                docs.append((rel, doc))
        except (DuplicateKeyError, ValueError) as exc:  # yaml errors are ValueErrors too
            problems.append(f"{rel}: {exc}")
        except Exception as exc:  # yaml.YAMLError and friends
            problems.append(f"{rel}: not valid YAML: {exc}")
    return docs, problems


def _name(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"


# ------------------------------------------------------------------ schemas
@lru_cache(maxsize=None)
def _crd_validator(filename: str) -> jsonschema.protocols.Validator:
    schema = load_json(SCHEMAS / filename)
    defs = _k8s_definitions(K8S_VERSIONS[-1])
    registry = referencing.Registry().with_resources([
        (defs["$id"], referencing.Resource.from_contents(defs)),
        (schema["$id"], referencing.Resource.from_contents(schema)),
    ])
    return jsonschema.Draft202012Validator(schema, registry=registry)


@lru_cache(maxsize=None)
def _k8s_validator(version: str, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    """A validator over kubernetes-validate's strict schema for one kind, built once.

    Same files and naming as kubernetes_validate.validate() (apps/v1 Deployment ->
    deployment-apps-v1.json), which re-reads the 1.8 MB definitions for every document.
    """
    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = schema_dir / f"{kind.lower()}-{group_version}.json"
    if not path.is_file():
        return None
    registry = referencing.Registry().with_resources([
        ("https://kubernetes.io/api/_definitions.json",
         referencing.Resource.from_contents(_k8s_definitions(version))),
    ])
    return jsonschema.Draft202012Validator(load_json(path), registry=registry)


@lru_cache(maxsize=None)
def _k8s_definitions(version: str) -> dict:
    return load_json(Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" /
                     f"v{version}-local-strict" / "_definitions.json")


def _schema_errors(rel: Path, doc: dict) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    where = f"{rel}: {_name(doc)}"

    def describe(errors, prefix=""):
        return [f"{where}: {prefix}{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))]

    if key in CRD_SCHEMAS:
        return describe(_crd_validator(CRD_SCHEMAS[key]).iter_errors(doc))
    problems = []
    for version in K8S_VERSIONS:
        validator = _k8s_validator(version, *key)
        if validator is None:
            return [f"{where}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes "
                    f"{version} (unknown kind, or a CRD without a vendored schema)"]
        problems += describe(validator.iter_errors(doc), f"Kubernetes {version}: ")
    return problems


# ------------------------------------------------------------------ cross-references
def _containers(doc: dict) -> list[dict]:
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def _pod_spec(doc: dict) -> dict:
    return ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}


def _template_labels(doc: dict) -> dict:
    return (((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def _matches(selector: dict | None, labels: dict) -> bool:
    """matchLabels and matchExpressions (In/NotIn/Exists/DoesNotExist) against labels."""
    if not selector:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _probes(container: dict) -> Iterator[tuple[str, dict]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if container.get(kind):
            yield kind, container[kind]


def _image_pinned(image: str, kustomize_images: dict[str, dict]) -> bool:
    """A release tag or digest, here or set by the kustomization's `images:`."""
    if "@sha256:" in image:
        return True
    name, tag = image.rsplit(":", 1) if ":" in image.rsplit("/", 1)[-1] else (image, "")
    override = kustomize_images.get(name)
    if override:
        if override.get("digest"):
            return True
        tag = override.get("newTag") or tag
    return bool(tag) and tag != "latest"


def check_references(docs: list[tuple[Path, dict]]) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, list[tuple[Path, dict]]] = {}
    for rel, doc in docs:
        by_kind.setdefault(doc["kind"], []).append((rel, doc))

    kustomizations = by_kind.get("Kustomization", [])
    kustomization = kustomizations[0][1] if kustomizations else {}
    namespace = kustomization.get("namespace")
    kustomize_images = {i["name"]: i for i in kustomization.get("images") or []}
    configmaps = {d["metadata"]["name"] for _, d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"] for _, d in by_kind.get("Secret", [])}
    service_accounts = {d["metadata"]["name"] for _, d in by_kind.get("ServiceAccount", [])}
    workloads = [(rel, d) for kind in WORKLOADS for rel, d in by_kind.get(kind, [])]
    deployments = {d["metadata"]["name"]: d for _, d in by_kind.get("Deployment", [])}

    for rel, doc in docs:
        if doc["kind"] in CLUSTER_SCOPED or doc["kind"] == "Kustomization":
            continue
        ns = (doc.get("metadata") or {}).get("namespace")
        if namespace and ns != namespace:
            problems.append(f"{rel}: {_name(doc)} is in namespace {ns!r}, not {namespace!r}")

    for rel, doc in workloads:
        where = f"{rel}: {_name(doc)}"
        selector = (doc.get("spec") or {}).get("selector")
        if not _matches(selector, _template_labels(doc)):
            problems.append(f"{where}: selector does not match its own pod template labels")
        pod = _pod_spec(doc)
        sa = pod.get("serviceAccountName")
        if sa and sa not in service_accounts:
            problems.append(f"{where}: serviceAccountName {sa} is not defined")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service-account token it does not need")
        if (pod.get("securityContext") or {}).get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        pod_seccomp = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        for c in _containers(doc):
            cw = f"{where} container {c.get('name')}"
            if not _image_pinned(c.get("image", ""), kustomize_images):
                problems.append(f"{cw}: image {c.get('image')!r} has no release tag (here or in kustomization images)")
            res = c.get("resources") or {}
            for need in ("cpu", "memory"):
                if need not in (res.get("requests") or {}):
                    problems.append(f"{cw}: no resources.requests.{need}")
            if "memory" not in (res.get("limits") or {}):
                problems.append(f"{cw}: no resources.limits.memory")
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cw}: capabilities are not dropped (drop: [ALL])")
            # The namespace enforces Pod Security `restricted`, which also wants a seccomp profile.
            if ((sc.get("seccompProfile") or {}).get("type") or pod_seccomp) not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{cw}: no seccompProfile RuntimeDefault (Pod Security restricted)")
            for src in c.get("envFrom") or []:
                if "configMapRef" in src and src["configMapRef"]["name"] not in configmaps:
                    problems.append(f"{cw}: envFrom ConfigMap {src['configMapRef']['name']} is not defined")
                if "secretRef" in src and src["secretRef"]["name"] not in secrets:
                    problems.append(f"{cw}: envFrom Secret {src['secretRef']['name']} is not defined "
                                    "(not even in optional/secret.example.yaml)")
            port_names = {p.get("name") for p in c.get("ports") or []}
            port_numbers = {p.get("containerPort") for p in c.get("ports") or []}
            for kind, probe in _probes(c):
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = (probe.get(handler) or {}).get("port")
                    if port is None:
                        continue
                    if (isinstance(port, str) and port not in port_names) or \
                            (isinstance(port, int) and port not in port_numbers):
                        problems.append(f"{cw}: {kind} uses port {port!r}, which the container does not declare")

    # Services and the workloads they route to.
    for rel, svc in by_kind.get("Service", []):
        selector = (svc.get("spec") or {}).get("selector") or {}
        targets = [d for _, d in workloads if _matches({"matchLabels": selector}, _template_labels(d))]
        if not targets:
            problems.append(f"{rel}: {_name(svc)} selects no pods of any workload here")
            continue
        for port in svc["spec"].get("ports") or []:
            tp = port.get("targetPort", port.get("port"))
            declared = {p.get("name") if isinstance(tp, str) else p.get("containerPort")
                        for d in targets for c in _containers(d) for p in c.get("ports") or []}
            if tp not in declared:
                problems.append(f"{rel}: {_name(svc)} targets port {tp!r}, which its pods do not declare")

    for rel, pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(_matches(pdb["spec"].get("selector"), _template_labels(d)) for _, d in workloads):
            problems.append(f"{rel}: {_name(pdb)} selects no pods of any workload here")

    # Autoscalers: one per Deployment, aimed at something that exists, owning its replicas.
    owners: dict[str, str] = {}
    autoscalers = by_kind.get("HorizontalPodAutoscaler", []) + by_kind.get("ScaledObject", [])
    for rel, obj in autoscalers:
        target = (obj.get("spec") or {}).get("scaleTargetRef") or {}
        name = target.get("name")
        if target.get("kind", "Deployment") != "Deployment" or name not in deployments:
            problems.append(f"{rel}: {_name(obj)} scales {target.get('kind', 'Deployment')}/{name}, "
                            "which is not defined here")
            continue
        if name in owners:
            problems.append(f"{rel}: Deployment/{name} is scaled by both {owners[name]} and {_name(obj)}")
        owners[name] = _name(obj)
        if "replicas" in deployments[name]["spec"]:
            problems.append(f"Deployment/{name} sets spec.replicas although {_name(obj)} owns them "
                            "(every kubectl apply would reset the autoscaler's choice)")
        behavior = obj["spec"].get("behavior") or \
            (((obj["spec"].get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior")) or {}
        for direction, rules in behavior.items():
            window = (rules or {}).get("stabilizationWindowSeconds")
            if window is not None and not 0 <= window <= MAX_STABILIZATION_S:
                problems.append(f"{rel}: {_name(obj)} {direction}.stabilizationWindowSeconds {window} "
                                f"is outside 0..{MAX_STABILIZATION_S} (the API rejects it)")

    for rel, so in by_kind.get("ScaledObject", []):
        problems += _check_scaledobject(rel, so, by_kind, namespace)

    for rel, dep in by_kind.get("Deployment", []):
        component = _template_labels(dep).get("app.kubernetes.io/component")
        if component == "worker":
            problems += _check_worker(rel, dep)
        elif component == "api":
            problems += _check_api(rel, dep)
    if not any(_template_labels(d).get("app.kubernetes.io/component") == "worker" for d in deployments.values()):
        problems.append("no worker Deployment (pod label app.kubernetes.io/component: worker)")
    if not any(_template_labels(d).get("app.kubernetes.io/component") == "api" for d in deployments.values()):
        problems.append("no api Deployment (pod label app.kubernetes.io/component: api)")

    for rel, sm in by_kind.get("ServiceMonitor", []):
        services = [s for _, s in by_kind.get("Service", [])
                    if _matches(sm["spec"]["selector"], (s.get("metadata") or {}).get("labels") or {})]
        if not services:
            problems.append(f"{rel}: {_name(sm)} selects no Service here")
        for ep in sm["spec"].get("endpoints") or []:
            if "port" in ep and not any(ep["port"] == p.get("name") for s in services
                                        for p in s["spec"].get("ports") or []):
                problems.append(f"{rel}: {_name(sm)} scrapes port {ep['port']!r}, which no selected Service names")
    return problems


def _check_scaledobject(rel: Path, so: dict, by_kind: dict, namespace: str | None) -> list[str]:
    problems, spec, where = [], so["spec"], f"{rel}: {_name(so)}"
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append(f"{where}: minReplicaCount exceeds maxReplicaCount")
    config = {k: v for _, cm in by_kind.get("ConfigMap", []) for k, v in (cm.get("data") or {}).items()}
    limit = int(config.get("DRMERGE_JOB_TIME_LIMIT_S", "21600"))
    # KEDA's default cooldownPeriod is 300 s.
    if spec.get("minReplicaCount", 0) == 0 and spec.get("cooldownPeriod", 300) < limit:
        problems.append(f"{where}: scales to zero after cooldownPeriod {spec.get('cooldownPeriod', 300)}s, "
                        f"shorter than DRMERGE_JOB_TIME_LIMIT_S {limit}s: a merge longer than the cooldown "
                        "is stopped, re-queued, restarted and stopped again, forever")
    redis_triggers = [t for t in spec.get("triggers") or [] if t.get("type") == "redis"]
    if not redis_triggers:
        problems.append(f"{where}: no redis trigger on the Celery queue")
    redis_services = {s["metadata"]["name"]: s for _, s in by_kind.get("Service", [])
                      if "redis" in s["metadata"]["name"]}
    for trig in redis_triggers:
        meta = trig.get("metadata") or {}
        if meta.get("listName") != CELERY_QUEUE:
            problems.append(f"{where}: redis trigger watches list {meta.get('listName')!r}, "
                            f"but Celery queues jobs on {CELERY_QUEUE!r}")
        url = config.get("DRMERGE_REDIS_URL", "")
        m = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?(?:/(\d+))?", url)
        if m:
            db = m.group(3) or "0"
            if meta.get("databaseIndex", "0") != db:
                problems.append(f"{where}: redis trigger reads database {meta.get('databaseIndex', '0')}, "
                                f"DRMERGE_REDIS_URL uses {db}")
        address = meta.get("address")
        if address and redis_services:
            host, _, port = address.rpartition(":")
            parts = host.split(".")
            if parts[0] in redis_services:
                if len(parts) < 2:
                    problems.append(f"{where}: address {address} is namespace-relative, but the KEDA "
                                    "operator resolves it from its own namespace (use NAME.NAMESPACE.svc...)")
                elif namespace and parts[1] != namespace:
                    problems.append(f"{where}: address {address} points at namespace {parts[1]!r}, "
                                    f"the manifests deploy to {namespace!r}")
                svc_ports = {str(p.get("port")) for p in redis_services[parts[0]]["spec"].get("ports") or []}
                if port not in svc_ports:
                    problems.append(f"{where}: address port {port} is not a port of Service/{parts[0]}")
            else:
                problems.append(f"{where}: address {address} is not the in-cluster Redis Service "
                                f"({', '.join(sorted(redis_services))})")
    return problems


def _check_worker(rel: Path, dep: dict) -> list[str]:
    problems, where, pod = [], f"{rel}: {_name(dep)}", _pod_spec(dep)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < MIN_WORKER_GRACE_S:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} < {MIN_WORKER_GRACE_S}: "
                        "SIGTERM cannot wait for the tensor in hand")
    if not any(t.get("key") == GPU and t.get("operator") in ("Exists", "Equal") for t in pod.get("tolerations") or []):
        problems.append(f"{where}: no toleration for {GPU} taints on GPU nodes")
    for c in pod.get("containers") or []:
        res = c.get("resources") or {}
        req, lim = (res.get("requests") or {}).get(GPU), (res.get("limits") or {}).get(GPU)
        if lim is None or int(lim) < 1:
            problems.append(f"{where}: container {c.get('name')} does not request a GPU ({GPU} limit)")
        elif req is not None and req != lim:
            problems.append(f"{where}: container {c.get('name')} {GPU} request != limit")
        if not c.get("livenessProbe"):
            problems.append(f"{where}: container {c.get('name')} has no livenessProbe")
        mem_req = (res.get("requests") or {}).get("memory")
        mem_lim = (res.get("limits") or {}).get("memory")
        if mem_req != mem_lim:
            problems.append(f"{where}: container {c.get('name')} memory request {mem_req} != limit "
                            f"{mem_lim}: a node under pressure would evict a running merge first")
    return problems


def _check_api(rel: Path, dep: dict) -> list[str]:
    problems, where = [], f"{rel}: {_name(dep)}"
    for c in _pod_spec(dep).get("containers") or []:
        paths = {kind: (probe.get("httpGet") or {}).get("path") for kind, probe in _probes(c)}
        if paths.get("livenessProbe") != "/livez":
            problems.append(f"{where}: livenessProbe should GET /livez (got {paths.get('livenessProbe')})")
        if paths.get("readinessProbe") != "/readyz":
            problems.append(f"{where}: readinessProbe should GET /readyz (got {paths.get('readinessProbe')})")
    return problems


# ------------------------------------------------------------------ kustomization
def check_kustomization(root: Path, docs: list[tuple[Path, dict]]) -> list[str]:
    kdir = root / K8S_DIR
    ks = [(rel, d) for rel, d in docs if d["kind"] == "Kustomization"]
    if len(ks) != 1 or ks[0][0] != K8S_DIR / "kustomization.yaml":
        return [f"want exactly one Kustomization, at {K8S_DIR / 'kustomization.yaml'}"]
    listed = ks[0][1].get("resources") or []
    problems = [f"kustomization.yaml: resource {r} does not exist" for r in listed if not (kdir / r).is_file()]
    on_disk = {p.relative_to(kdir).as_posix() for p in manifest_files(root)
               if p.parent == kdir and p.name != "kustomization.yaml"}
    for missing in sorted(on_disk - set(listed)):
        problems.append(f"kustomization.yaml does not list {missing} (move optional manifests to {OPTIONAL_DIR}/)")
    for r in listed:
        if r.startswith(OPTIONAL_DIR + "/"):
            problems.append(f"kustomization.yaml lists {r}: optional manifests are applied by hand")
    for rel, doc in docs:
        if doc["kind"] == "Secret" and rel.parts[-2] != OPTIONAL_DIR:
            problems.append(f"{rel}: Secrets with values do not belong in the applied manifests")
        if doc["kind"] == "Secret" and "example" not in rel.name:
            problems.append(f"{rel}: a Secret manifest must be an example (name it *.example.yaml)")
    used_images = {c.get("image") for _, d in docs for c in _containers(d)}
    for image in ks[0][1].get("images") or []:
        if image["name"] not in used_images:
            problems.append(f"kustomization.yaml: image {image['name']} is used by no container")
    return problems


def check(root: Path) -> list[str]:
    docs, problems = load(root)
    if not docs and not problems:
        return [f"no manifests under {K8S_DIR}"]
    for rel, doc in docs:
        problems += _schema_errors(rel, doc)
    problems += check_kustomization(root, docs)
    try:
        problems += check_references(docs)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        # Only reachable when a schema error above already explains the malformed object.
        problems.append(f"cross-reference checks stopped on a malformed object: {exc!r}")
    return problems

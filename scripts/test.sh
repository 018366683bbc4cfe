#!/usr/bin/env bash
# The whole test suite: tests/unit, tests/integration (real Redis/S3), tests/e2e (processes over
# HTTP). Arguments pass through to pytest: a layer (tests/unit, -m e2e), a file, -k.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

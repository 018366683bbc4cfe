"""Offline checks for drmerge's deployment files (Dockerfile, compose, Kubernetes, Grafana).

Each ``check_*`` function takes the repository root and returns a list of problems
(strings, empty when all is well), so the same code serves ``deploy/validate.sh``
(``python -m deploy.validation <check>``) and ``tests/unit/test_deploy.py``, which also runs
the checks on deliberately broken copies to prove they catch what they claim to.
Nothing here touches the network: the schemas are vendored or shipped by PyPI packages.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

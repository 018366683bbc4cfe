"""python -m deploy.validation {dockerfile,compose,k8s,grafana,docs,all} [--root DIR]

Prints each problem found and exits 1 if there is any, 0 otherwise.
`python -m deploy.validation sizing --print` prints the README's sizing table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import REPO_ROOT, compose, dockerfile, docs, grafana, kube, sizing

CHECKS = {
    "dockerfile": dockerfile.check,
    "compose": compose.check,
    "k8s": kube.check,
    "grafana": grafana.check,
    "docs": docs.check,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.validation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=[*CHECKS, "all", "sizing"])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--print", action="store_true", help="with `sizing`: print the table")
    args = parser.parse_args(argv)

    if args.check == "sizing":
        print(sizing.markdown_table())
        return 0
    names = list(CHECKS) if args.check == "all" else [args.check]
    failed = False
    for name in names:
        problems = CHECKS[name](args.root.resolve())
        for problem in problems:
            print(f"{name}: {problem}")
        print(f"{name}: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``drmerge`` console script (also ``python -m drmerge_ops``).

One parser for every stable command: the engine's ``merge`` and ``validate`` come from
drmerge.cli (which ``python -m drmerge`` runs on its own); this package adds the service
launchers (``api``, ``worker``: drmerge_ops.launch), the local stack (``dev up|down|
status``: drmerge_ops.devstack), key administration (``keys``: drmerge_ops.keys_admin)
and the API's terminal client (``submit``, ``status``, ``wait``, ``jobs``, ``cancel``,
``events``: drmerge_ops.client_commands).

Every command runs under drmerge.cli's contract: exit 0 on success; on failure a
non-zero exit and a last stderr line ``error: <code>: <message>``. Each module imports
what it needs inside its commands, so ``drmerge merge`` never pays for FastAPI, Celery or
httpx, and ``drmerge api`` never for torch.
"""

from __future__ import annotations

import sys

from drmerge import cli as engine_cli

from . import client_commands, devstack, keys_admin, launch


def build_parser():
    parser, sub = engine_cli.new_parser("Merge fine-tuned models with DRM.")
    engine_cli.register(sub)
    for commands in (launch, devstack, keys_admin, client_commands):
        commands.register(sub)
    return parser


def main(argv=None) -> int:
    return engine_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

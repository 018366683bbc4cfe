"""Health check for a drmerge worker container (Docker HEALTHCHECK, Kubernetes exec probe).

Healthy means: the Celery node running in *this* container answers a broadcast ping
sent through the broker. That proves the worker process is alive, connected to Redis
and consuming control messages; a merge in progress does not block the answer because
the worker's main process handles control messages while the pool runs the task.

Replies are matched on the host part of the node name (``<prefix>@<hostname>``), so the
check does not depend on how the worker names its node, and other workers on the same
broker cannot make this container look healthy. The hostname is the container's (Docker)
or the pod's name (Kubernetes), which is what Celery uses by default.

Only the standard library and Celery (already in the worker image) are used. Exit codes:
0 healthy, 1 unhealthy. Settings: DRMERGE_REDIS_URL (the broker), and
DRMERGE_HEALTHCHECK_TIMEOUT_S (seconds to wait for replies, default 10).
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def _give_up(signum, frame):  # pragma: no cover - only fires when the broker hangs
    print("unhealthy: health check exceeded its deadline (broker unresponsive?)")
    sys.stdout.flush()
    os._exit(1)


def main() -> int:
    broker = os.environ.get("DRMERGE_REDIS_URL", "redis://127.0.0.1:6379/0")
    timeout = float(os.environ.get("DRMERGE_HEALTHCHECK_TIMEOUT_S", "10"))
    host = socket.gethostname()

    # A hard deadline: kombu retries connections on its own, and a probe must never hang.
    signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(int(timeout) + 10)

    from celery import Celery  # imported late: a missing Celery is reported, not a traceback

    app = Celery("drmerge-healthcheck", broker=broker)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            replies = app.control.ping(timeout=timeout, connection=conn) or []
    except Exception as exc:  # any broker failure is an unhealthy result, with its reason
        print(f"unhealthy: cannot reach the broker: {exc}")
        return 1

    nodes = sorted(name for reply in replies for name in reply)
    mine = [name for name in nodes if name.rpartition("@")[2] == host]
    if mine:
        print(f"healthy: {', '.join(mine)} answered")
        return 0
    print(f"unhealthy: no Celery node on host {host!r} answered within {timeout:g}s "
          f"(answered: {', '.join(nodes) or 'none'})")
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""The worker registry: which workers are alive, by their heartbeats in Redis.

Every worker process refreshes its entry every ``worker_heartbeat_s`` (worker/tasks.py);
a worker whose last heartbeat is older than ``worker_heartbeat_ttl_s`` is not live.
``/readyz`` and ``drmerge_workers_live`` count the live ones, and a worker that receives
a job still ``running`` elsewhere checks here whether that owner is alive (a duplicate
delivery) or lost (the job is claimed again).
"""

from __future__ import annotations

import json
import time

from .keys import Keys


class WorkerRegistry:
    def __init__(self, client, keys: Keys):
        self.r, self.keys = client, keys

    def heartbeat(self, name: str, info: dict, ttl_s: float) -> None:
        """Record that ``name`` is alive, with what it says about itself (expires)."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(self.keys.workers, {name: now})
        key = self.keys.worker(name)
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in dict(info, last_seen=now).items()})
        pipe.expire(key, max(1, int(ttl_s * 3)))
        pipe.zremrangebyscore(self.keys.workers, "-inf", now - ttl_s * 20)  # forget long-gone names
        pipe.execute()

    def remove(self, name: str) -> None:
        self.r.zrem(self.keys.workers, name)
        self.r.delete(self.keys.worker(name))

    def live(self, ttl_s: float) -> list[str]:
        """Names of the workers whose last heartbeat is at most ``ttl_s`` old."""
        return self.r.zrangebyscore(self.keys.workers, time.time() - ttl_s, "+inf")

    def known(self, name: str) -> bool:
        """Whether ``name`` has sent a heartbeat (and was not removed since)."""
        return self.r.zscore(self.keys.workers, name) is not None

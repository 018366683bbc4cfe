"""A merge job as the service sees it: the record, its ids, its public form, its events.

Pure Python (no Redis): the job store (service.jobs.store) reads and writes these, the
API returns ``Job.public()`` and webhooks send it.

Reliability fields of a job (service/reaper.py, worker/runner.py): ``heartbeat_at``
(Redis server time of the owning attempt's last heartbeat: the reaper judges staleness
against Redis's own clock, so host clock skew does not matter), ``shards`` (the resume
journal: output shards committed so far, ``{name, size, sha256, plan}``; a restarted
attempt verifies and keeps them), ``handoffs`` (times a worker gave the job back on
shutdown: not failures, so they do not count against ``job_max_attempts``), ``queue``
(the Celery queue the job was submitted to: every later message for it, a re-queue, a
re-send or a cleanup request, goes there, whichever process sends it) and ``cleanup``
(``pending`` when a job ended leaving partial output: it ended without its worker, or its
run's own cleanup failed because the storage was unreachable; ``failed`` once the retries
were given up), with ``cleanup_files`` (JSON list: objects the failed run could not
remove, beyond its ``shards``) and ``cleanup_attempts``. While a cleanup is pending the
job keeps its output reservation, so no new job writes there before it is clean; the
reaper (service/reaper.py) sends a worker the job's id again with backoff until the
cleanup succeeds (``DRMERGE_CLEANUP_*``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .status import TERMINAL, JobStatus

# Hash fields stored as JSON (the rest are strings and numbers).
JSON_FIELDS = ("spec", "metadata", "progress", "result", "error", "webhook", "webhook_state", "shards",
               "cleanup_files")
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"

_id_lock = threading.Lock()
_last_id = [0, 0]  # (ms, random) of the newest id this process made


def new_job_id(now: float | None = None) -> str:
    """``mrg_`` + a lowercase ULID: 48 bits of milliseconds then 80 random bits, so ids
    sort by creation time (the list index relies on this) and never collide. Within one
    process ids are strictly increasing even inside one millisecond, and even if the clock
    steps back (python-ulid's generator is not used for that reason: its monotonic policy
    only covers ids made in the same millisecond)."""
    ms = int((time.time() if now is None else now) * 1000)
    rnd = int.from_bytes(os.urandom(10), "big")
    with _id_lock:
        if ms <= _last_id[0]:
            ms, rnd = _last_id[0], (_last_id[1] + 1 + (rnd & 0xFFFF)) % (1 << 80)
        _last_id[0], _last_id[1] = ms, rnd
    return _encode((ms << 80) | rnd)


def _encode(n: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return "mrg_" + "".join(reversed(chars))


def id_bound(ts: float) -> str:
    """The smallest id of a job created in the millisecond of unix time ``ts``: every job
    created earlier sorts before it, every job created then or later at or after it."""
    return _encode(int(ts * 1000) << 80)


def is_job_id(value: str) -> bool:
    return (isinstance(value, str) and len(value) == 30 and value.startswith("mrg_")
            and all(c in _CROCKFORD for c in value[4:]))


def iso(ts: float | None) -> str | None:
    """RFC 3339 UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event(type_: str, message: str, now: float, **data) -> dict:
    """One entry of a job's event log (the store numbers it when appending)."""
    ev = {"type": type_, "at": now, "message": message}
    ev.update({k: v for k, v in data.items() if v is not None})
    return ev


@dataclass
class Job:
    """One job record (the hash at ``{p}:job:{id}``), decoded."""

    id: str
    status: JobStatus
    created_at: float
    spec: dict
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    progress: dict | None = None
    result: dict | None = None
    error: dict | None = None
    metadata: dict = field(default_factory=dict)
    webhook: dict | None = None  # {"url", "secret"?}: internal, the secret never leaves the store
    webhook_state: dict | None = None
    attempts: int = 0
    worker: str | None = None
    output: str | None = None
    cancel_requested_at: float | None = None
    enqueued_at: float | None = None
    heartbeat_at: float | None = None
    shards: list = field(default_factory=list)  # the resume journal (see the module docstring)
    handoffs: int = 0
    cleanup: str | None = None
    cleanup_files: list = field(default_factory=list)  # objects a failed run could not remove (besides shards)
    tenant: str = "default"
    queue: str | None = None  # the Celery queue it was sent to (None: a record older than this field)

    @classmethod
    def from_hash(cls, h: dict) -> "Job":
        def num(k):
            v = h.get(k)
            return float(v) if v not in (None, "") else None

        def js(k):
            v = h.get(k)
            return json.loads(v) if v not in (None, "") else None

        return cls(
            id=h["id"], status=JobStatus(h["status"]), created_at=float(h["created_at"]), spec=js("spec") or {},
            started_at=num("started_at"), finished_at=num("finished_at"), updated_at=num("updated_at"),
            progress=js("progress"), result=js("result"), error=js("error"), metadata=js("metadata") or {},
            webhook=js("webhook"), webhook_state=js("webhook_state"), attempts=int(h.get("attempts") or 0),
            worker=h.get("worker") or None, output=h.get("output") or None,
            cancel_requested_at=num("cancel_requested_at"), enqueued_at=num("enqueued_at"),
            heartbeat_at=num("heartbeat_at"), shards=js("shards") or [], handoffs=int(h.get("handoffs") or 0),
            cleanup=h.get("cleanup") or None, cleanup_files=list(js("cleanup_files") or []),
            tenant=h.get("tenant") or "default", queue=h.get("queue") or None,
        )

    @property
    def lost(self) -> int:
        """Attempts that ended with their worker lost (killed, crashed, vanished)."""
        return max(0, self.attempts - self.handoffs)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> dict:
        """The job as the API returns it and webhooks send it (never the webhook secret)."""
        progress = dict(empty_progress(), **(self.progress or {}))
        if self.terminal:
            progress["eta_seconds"] = None  # an ended job has no time left to estimate (a cancelled one neither)
        webhook = None
        if self.webhook:
            state = self.webhook_state or {}
            webhook = {"url": self.webhook["url"], "status": state.get("status", "waiting"),
                       "attempts": state.get("attempts", 0), "last_error": state.get("last_error"),
                       "delivered_at": iso(state.get("delivered_at"))}
        return {
            "id": self.id, "object": "merge", "status": str(self.status),
            "created_at": iso(self.created_at), "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at), "spec": self.spec, "progress": progress,
            "result": self.result, "error": self.error, "metadata": self.metadata, "webhook": webhook,
            "attempts": self.attempts,
        }


def lost_workers_error(lost: int, max_attempts: int, what: str) -> dict:
    """The error of a job that lost ``job_max_attempts`` workers, whichever process notices
    (the reaper: heartbeats stopped; a worker's claim: a redelivery whose worker is gone).

    ``internal_error``, not ``timeout``: nothing ran out of time (``timeout`` is the job
    time limit, and tells the caller the merge was too long for it); the service lost the
    processes running it (killed for memory, crashed, node lost), a failure on the
    service's side that the caller cannot fix by changing the spec or the limit. A
    worker-killing input is a bug in its guards, which is what the code says."""
    return {"code": "internal_error", "param": None,
            "message": f"{what}, and this job has now lost {lost} workers (out of memory or killed?; "
                       f"DRMERGE_JOB_MAX_ATTEMPTS={max_attempts}); giving up"}


def empty_progress() -> dict:
    return {"stage": None, "tensors_done": 0, "tensors_total": 0, "bytes_read": 0, "bytes_written": 0,
            "fraction": 0.0, "eta_seconds": None}

"""Merge jobs in Redis: records, listing, events, idempotency, the state machine, and the
operations the reaper and the worker's runner need.

Used by the API (create, read, cancel), by the worker (claim, progress, shard journal,
finish) and by the reaper (stale and unsent jobs), so it imports neither FastAPI nor
torch, and nothing outside this class touches a job's Redis keys (service.jobs.keys names
them). Every status change goes through ``JobStore.transition``, which checks
``TRANSITIONS`` (service.jobs.status) and applies the change in one Lua script
(scripts/transition.lua): the status, the per-status indexes, the event log, the output
reservation, the webhook queue and the duration histogram can never disagree, even with
several API processes and workers racing on one job.

The store also holds the worker registry (``store.workers``, service.jobs.workers) and
the webhook due queue (``store.webhooks``, service.jobs.webhook_queue), on the same Redis.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import redis

from drmerge import locations

from .errors import (IdempotencyConflict, IllegalTransition, JobNotFound, JobStoreError, OutputBusy, QuotaExceeded,
                     StaleAttempt, StillAlive)
from .keys import Keys
from .model import JSON_FIELDS, Job, id_bound, is_job_id, new_event, new_job_id
from .scripts import Script
from .status import OWNED, STATUSES, TERMINAL, TRANSITIONS, JobStatus
from .webhook_queue import WebhookQueue
from .workers import WorkerRegistry

# drmerge_job_duration_seconds buckets: merges take seconds (tests) to hours (70B models).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600, 43200)

MAX_EVENTS = 1000
# Jobs one list page may look at when filtering by metadata (which has no index).
MAX_LIST_SCAN = 5000


@dataclass
class JobPage:
    """A page of ``JobStore.page``: the jobs, whether more may follow, and the cursor
    (``after``) for the next page."""

    jobs: list[Job]
    has_more: bool
    next_after: str | None


def _unprefixed(reserved: str) -> str:
    """A reservation key back as the location it reserves (local paths have no trailing /)."""
    return reserved if locations.is_s3(reserved) or reserved == "/" else reserved.rstrip("/")


def body_hash(body) -> str:
    """Hash of a request body that ignores key order and whitespace (idempotency)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "drmerge", idempotency_ttl_s: int = 86400):
        self.r = client  # the Redis client (tests inspect through it; callers use the methods)
        self.p = prefix
        self.keys = Keys(prefix)
        self.idempotency_ttl_s = idempotency_ttl_s
        self.workers = WorkerRegistry(client, self.keys)
        self.webhooks = WebhookQueue(client, self.keys)
        self._transition = Script(client, "transition")
        self._create = Script(client, "create")
        self._progress = Script(client, "progress")
        self._add_event = Script(client, "add_event")
        self._job_heartbeat = Script(client, "job_heartbeat")
        self._record_shard = Script(client, "record_shard")
        self._claim_enqueue = Script(client, "claim_enqueue")
        self._schedule_cleanup = Script(client, "schedule_cleanup")
        self._claim_cleanup = Script(client, "claim_cleanup")
        self._end_cleanup = Script(client, "end_cleanup")

    @classmethod
    def from_url(cls, url: str, prefix: str = "drmerge", **kw) -> "JobStore":
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                                      health_check_interval=30)
        return cls(client, prefix, **kw)

    # --- create and read ----------------------------------------------------------------
    def create(self, spec: dict, output: str, *, metadata: dict | None = None, webhook: dict | None = None,
               idempotency_key: str | None = None, request_hash: str | None = None,
               now: float | None = None, tenant: str = "default", max_queued: int = 0,
               queue: str | None = None) -> tuple[Job, bool]:
        """Store a new queued job of ``tenant``, to be sent to Celery queue ``queue``.
        Returns (job, created); created is False when the tenant used the idempotency key
        before with the same body (the earlier job comes back).

        ``output`` is a canonical location (drmerge.locations; parse_spec makes them).

        Raises IdempotencyConflict (same key, other body), OutputBusy (an active job
        already writes to ``output``, to a location containing it or to one inside it:
        two merges into one prefix would interleave shards, and a failed or cancelled one
        deletes what it wrote) or QuotaExceeded (the tenant has ``max_queued`` queued
        jobs; 0 means no limit).
        """
        reserved = locations.as_prefix(output)  # ValueError for a location not canonical
        now = time.time() if now is None else now
        job_id = new_job_id(now)
        fields = {"id": job_id, "status": JobStatus.QUEUED, "created_at": repr(now), "updated_at": repr(now),
                  "spec": json.dumps(spec), "metadata": json.dumps(metadata or {}), "output": reserved,
                  "attempts": "0", "tenant": tenant}
        if webhook:
            fields["webhook"] = json.dumps(webhook)
        if queue:
            fields["queue"] = queue
        if idempotency_key:
            fields["idempotency_key"] = idempotency_key
        ev = new_event("status", "job created", now, to=JobStatus.QUEUED)
        ev["id"] = 1
        idem_key = self.keys.idempotency(tenant, idempotency_key)
        k = self.keys
        kind, ref, *held = self._create(
            keys={"job": k.job(job_id), "events": k.events(job_id), "all_jobs": k.index(),
                  "index_queued": k.index(JobStatus.QUEUED), "outputs": k.outputs, "idempotency": idem_key,
                  "tenant_jobs": k.tenant(tenant), "tenant_queued": k.tenant(tenant, "queued"),
                  "outputs_sorted": k.outputs_sorted},
            args={"job_id": job_id, "fields": json.dumps(fields), "output": reserved,
                  "use_idempotency": "1" if idempotency_key else "0", "body_hash": request_hash or "",
                  "idempotency_ttl_s": self.idempotency_ttl_s, "event": json.dumps(ev),
                  "max_queued": int(max_queued), "job_key_prefix": k.job_prefix,
                  "parents": json.dumps(locations.parents(output))})
        if kind == "replay":
            job = self.get(ref)
            if job is None:  # the job record was removed; the key is stale
                self.r.delete(idem_key)
                return self.create(spec, output, metadata=metadata, webhook=webhook,
                                   idempotency_key=idempotency_key, request_hash=request_hash, now=now,
                                   tenant=tenant, max_queued=max_queued, queue=queue)
            return job, False
        if kind == "idem_conflict":
            raise IdempotencyConflict(idempotency_key, ref)
        if kind == "output_busy":
            raise OutputBusy(output, ref, _unprefixed(held[0]))
        if kind == "quota":
            raise QuotaExceeded(tenant, int(ref))
        return self.get(job_id), True

    def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        h = self.r.hgetall(self.keys.job(job_id))
        return Job.from_hash(h) if h else None

    def require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list(self, status: str | None = None, limit: int = 20, after: str | None = None,
             tenant: str | None = None) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page;
        ``tenant`` limits it to that tenant's jobs. Returns (jobs, has_more)."""
        page = self.page(status=status, limit=limit, after=after, tenant=tenant)
        return page.jobs, page.has_more

    def page(self, *, status: str | None = None, limit: int = 20, after: str | None = None,
             tenant: str | None = None, created_after: float | None = None, created_before: float | None = None,
             metadata: dict[str, str] | None = None, max_scan: int = MAX_LIST_SCAN) -> "JobPage":
        """One page of jobs, newest first, older than the cursor ``after``.

        ``created_after`` (inclusive) and ``created_before`` (exclusive) are unix times,
        compared at the millisecond of the job's id (a ULID: ids sort by creation time), so
        they only narrow the walk of the index. ``metadata``: every key must hold exactly
        that value; there is no index for it, so at most ``max_scan`` jobs are looked at per
        page: if that runs out first, the page holds what was found (maybe nothing), with
        ``has_more`` and a cursor to go on from."""
        upper = after
        if created_before is not None:
            bound = id_bound(created_before)
            upper = bound if upper is None or bound < upper else upper
        lower = id_bound(created_after) if created_after is not None else None
        if tenant is None:
            a, b = self.keys.index(status), None
        elif status is None:
            a, b = self.keys.tenant(tenant), None
        else:
            a, b = self.keys.tenant(tenant), self.keys.index(status)
        batch = 100 if metadata else min(100, limit + 1)
        jobs: list[Job] = []
        scanned, last_seen = 0, None
        for ids in self._walk(a, b, upper, lower, batch):
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(self.keys.job(i))
            for job_id, h in zip(ids, pipe.execute()):
                scanned += 1
                last_seen = job_id
                if h:
                    job = Job.from_hash(h)
                    if not metadata or all(job.metadata.get(k) == v for k, v in metadata.items()):
                        jobs.append(job)
                        if len(jobs) > limit:  # one more than the page: there is a next page
                            return JobPage(jobs[:limit], True, jobs[limit - 1].id)
                if scanned >= max_scan:
                    return JobPage(jobs, True, last_seen)
        return JobPage(jobs, False, None)

    def _walk(self, a: str, b: str | None, upper: str | None, lower: str | None, batch: int):
        """Batches of the ids in index ``a`` (and in ``b`` too, if given), newest first,
        older than ``upper`` and not older than ``lower``. With two indexes it walks the
        smaller and checks membership in the other, so a tenant's status filter costs at
        most the size of the smaller index."""
        if b is not None:
            pipe = self.r.pipeline(transaction=False)
            pipe.zcard(a)
            pipe.zcard(b)
            size_a, size_b = pipe.execute()
            a, b = (a, b) if size_a <= size_b else (b, a)
        cursor = upper
        low = f"[{lower}" if lower else "-"
        while True:
            ids = self.r.zrevrangebylex(a, f"({cursor}" if cursor else "+", low, start=0, num=batch)
            if not ids:
                return
            cursor = ids[-1]
            if b is not None:
                pipe = self.r.pipeline(transaction=False)
                for i in ids:
                    pipe.zscore(b, i)
                matched = [i for i, score in zip(ids, pipe.execute()) if score is not None]
            else:
                matched = ids
            if matched:
                yield matched
            if len(ids) < batch:
                return

    def counts(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for s in STATUSES:
            pipe.zcard(self.keys.index(s))
        return dict(zip(STATUSES, pipe.execute()))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[dict]:
        raw = self.r.lrange(self.keys.events(job_id), 0, -1)
        out = []
        for item in raw:
            ev = json.loads(item)
            if ev.get("id", 0) > after:
                out.append(ev)
            if len(out) >= limit:
                break
        return out

    def add_event(self, job_id: str, type_: str, message: str, **data) -> None:
        ev = new_event(type_, message, time.time(), **data)
        self._add_event(keys={"job": self.keys.job(job_id), "events": self.keys.events(job_id)},
                        args={"event": json.dumps(ev), "max_events": MAX_EVENTS})

    # --- the queue message of a queued job --------------------------------------------------
    def mark_enqueued(self, job_id: str) -> None:
        """Its message was sent (the API, right after sending it)."""
        self.r.hset(self.keys.job(job_id), "enqueued_at", repr(time.time()))

    def claim_enqueue(self, job_id: str) -> bool:
        """True if the caller is the one to (re)send this queued job's message."""
        return bool(self._claim_enqueue(keys={"job": self.keys.job(job_id)}, args={"now": repr(time.time())}))

    def mark_unsent(self, job_id: str) -> None:
        """A claimed send failed: the next reaper sweep sends it (``unsent_queued``)."""
        self.r.hset(self.keys.job(job_id), "enqueued_at", "")

    def unsent_queued(self, older_than_s: float) -> list[tuple[str, str | None]]:
        """Queued jobs whose message is not known to be sent and that have not changed
        for ``older_than_s`` (an API crash between storing a job and sending it, or a
        failed re-send), each with its own queue (None: a record older than that field)."""
        ids = self.r.zrange(self.keys.index(JobStatus.QUEUED), 0, -1)
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), "enqueued_at", "updated_at", "queue")
        cutoff = time.time() - older_than_s
        return [(job_id, queue or None) for job_id, (enqueued, updated, queue) in zip(ids, pipe.execute())
                if not enqueued and float(updated or 0) <= cutoff]

    # --- state machine ------------------------------------------------------------------
    def transition(self, job_id: str, to: str, *, from_: set[str] | frozenset[str] | None = None,
                   fields: dict | None = None, message: str | None = None, attempt: int | None = None,
                   now: float | None = None, stale_after: float | None = None,
                   cleanup_due: float | None = None) -> str:
        """Move a job to ``to`` if its current status allows it; returns the previous status.

        ``from_`` narrows the statuses the caller expects (it must name legal sources);
        ``attempt`` fences the change to the worker attempt that owns the job;
        ``stale_after`` (the reaper's) applies it only if the job's heartbeat is at least
        that many seconds old, checked in the same atomic step (else StillAlive);
        ``cleanup_due`` (with ``fields`` setting ``cleanup: pending``) schedules the first
        retry of the output's cleanup in the same step.
        """
        if to not in STATUSES:
            raise ValueError(f"unknown status {to!r}")
        legal = {s for s, targets in TRANSITIONS.items() if to in targets}
        sources = legal if from_ is None else set(from_) & legal
        if from_ is not None and not set(from_) <= legal:
            raise ValueError(f"illegal transition(s) {sorted(set(from_) - legal)} -> {to}")
        now = time.time() if now is None else now
        enc = {}
        for k, v in (fields or {}).items():
            if k in JSON_FIELDS:
                enc[k] = json.dumps(v)
            elif isinstance(v, float):
                enc[k] = repr(v)
            else:
                enc[k] = str(v)
        if to in TERMINAL:
            enc.setdefault("finished_at", repr(now))
        ev = new_event("status", message or f"job {to}", now, to=to)
        k = self.keys
        keys = {"job": k.job(job_id), "events": k.events(job_id), "outputs": k.outputs,
                "outputs_sorted": k.outputs_sorted, "cleanup_due": k.cleanup_due, "webhooks_due": k.webhooks_due,
                "stats": k.stats}
        keys.update({f"index_{s}": k.index(s) for s in STATUSES})
        kind, cur = self._transition(
            keys=keys,
            args={"job_id": job_id, "to": str(to), "sources": " ".join(sorted(sources)), "now": repr(now),
                  "attempt": "" if attempt is None else str(attempt), "fields": json.dumps(enc),
                  "duration_buckets": " ".join(str(b) for b in DURATION_BUCKETS), "event": json.dumps(ev),
                  "max_events": MAX_EVENTS, "stale_after": "" if stale_after is None else repr(float(stale_after)),
                  "cleanup_due_at": "" if cleanup_due is None else f"{cleanup_due:.3f}"})
        if kind == "alive":
            raise StillAlive(f"job {job_id} has a fresh heartbeat; left alone")
        if kind == "missing":
            raise JobNotFound(job_id)
        if kind == "illegal":
            raise IllegalTransition(job_id, cur, to)
        if kind == "stale":
            raise StaleAttempt(f"job {job_id}: attempt {attempt} is no longer the current one")
        return cur

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one by asking its worker (which
        stops between two tensors). Cancelling a cancelling or cancelled job is a no-op;
        a succeeded or failed job raises IllegalTransition."""
        for _ in range(10):
            job = self.require(job_id)
            now = time.time()
            try:
                if job.status == JobStatus.QUEUED:
                    self.transition(job_id, JobStatus.CANCELLED, from_={JobStatus.QUEUED}, now=now,
                                    fields={"cancel_requested_at": now},
                                    message="cancelled while queued; it will never start")
                elif job.status == JobStatus.RUNNING:
                    self.transition(job_id, JobStatus.CANCELLING, from_={JobStatus.RUNNING}, now=now,
                                    fields={"cancel_requested_at": now},
                                    message="cancel requested; the worker stops after the current tensor")
                    self.r.publish(self.keys.cancel_channel, job_id)
                elif job.status in (JobStatus.CANCELLING, JobStatus.CANCELLED):
                    return job
                else:
                    raise IllegalTransition(job_id, job.status, JobStatus.CANCELLED)
            except IllegalTransition as e:
                if e.current in TERMINAL and e.current != JobStatus.CANCELLED:
                    raise
                continue  # the status moved under us; look again
            return self.require(job_id)
        raise JobStoreError(f"job {job_id} keeps changing status; try the cancel again")

    # --- worker side ----------------------------------------------------------------------
    def write_progress(self, job_id: str, attempt: int, progress: dict, d_read: int = 0, d_written: int = 0,
                       event: dict | None = None) -> bool:
        now = time.time()
        ev = ""
        if event:
            ev = json.dumps(new_event(event.pop("type", "stage"), event.pop("message", ""), now, **event))
        return bool(self._progress(
            keys={"job": self.keys.job(job_id), "stats": self.keys.stats, "events": self.keys.events(job_id)},
            args={"attempt": str(attempt), "progress": json.dumps(progress), "now": repr(now),
                  "d_read": int(max(0, d_read)), "d_written": int(max(0, d_written)), "event": ev,
                  "max_events": MAX_EVENTS}))

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.keys.job(job_id), "status") in (JobStatus.CANCELLING, JobStatus.CANCELLED)

    def subscribe_cancels(self):
        """A pub/sub subscription to cancel requests (messages carry the job id)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.keys.cancel_channel)
        return pubsub

    def job_heartbeat(self, job_id: str, attempt: int) -> bool:
        """Stamp the attempt's heartbeat; False when the attempt no longer owns the job."""
        return bool(self._job_heartbeat(keys={"job": self.keys.job(job_id)}, args={"attempt": str(attempt)}))

    def record_shard(self, job_id: str, attempt: int, entry: dict) -> bool:
        """Add a committed output shard to the job's resume journal (fenced by attempt)."""
        return bool(self._record_shard(keys={"job": self.keys.job(job_id)},
                                       args={"attempt": str(attempt), "entry": json.dumps(entry)}))

    # --- output cleanup -----------------------------------------------------------------
    def schedule_cleanup(self, job_id: str, files: list[str], due: float) -> None:
        """Mark the job's output for cleanup (``files``: objects that may remain besides its
        shards), first try at ``due`` unless a retry is already scheduled."""
        self._schedule_cleanup(keys={"job": self.keys.job(job_id), "cleanup_due": self.keys.cleanup_due},
                               args={"job_id": job_id, "files": json.dumps(list(files)), "due": f"{due:.3f}"})

    def due_cleanups(self, now: float | None = None, limit: int = 100) -> list[str]:
        now = time.time() if now is None else now
        return self.r.zrangebyscore(self.keys.cleanup_due, "-inf", repr(now), start=0, num=limit)

    def claim_cleanup(self, job_id: str, backoff_base_s: float, backoff_max_s: float,
                      now: float | None = None) -> tuple[int, str | None] | None:
        """Take a due cleanup: returns (attempt number, the job's queue) and schedules the
        next try after ``min(max, base * 2^(attempt-1))``; None if it is not due or no
        longer pending."""
        now = time.time() if now is None else now
        res = self._claim_cleanup(keys={"job": self.keys.job(job_id), "cleanup_due": self.keys.cleanup_due},
                                  args={"job_id": job_id, "now": repr(now),
                                        "backoff_base_s": repr(float(backoff_base_s)),
                                        "backoff_max_s": repr(float(backoff_max_s))})
        if not res:
            return None
        return int(res[0]), (res[1] or None)

    def end_cleanup(self, job_id: str, outcome: str, message: str) -> None:
        """``done``: nothing of the job is left in its output; ``failed``: retries given up.
        Either way its output reservation is released (once the job is over)."""
        assert outcome in ("done", "failed")
        ev = new_event("cleanup", message, time.time(), outcome=outcome)
        k = self.keys
        self._end_cleanup(keys={"job": k.job(job_id), "events": k.events(job_id), "cleanup_due": k.cleanup_due,
                                "outputs": k.outputs, "outputs_sorted": k.outputs_sorted},
                          args={"job_id": job_id, "outcome": outcome, "event": json.dumps(ev),
                                "max_events": MAX_EVENTS})

    # --- reaper side ----------------------------------------------------------------------
    def server_time(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    def stale_owned(self, older_than_s: float) -> list[tuple[str, float]]:
        """Running and cancelling jobs whose owner's heartbeat (``updated_at`` until the
        first one) is at least ``older_than_s`` old by Redis's clock, with how many
        seconds it has been quiet. A hint only: the reaper's transition checks it again
        atomically (``stale_after``)."""
        pipe = self.r.pipeline(transaction=False)
        for s in sorted(OWNED):
            pipe.zrange(self.keys.index(s), 0, -1)
        ids = [i for batch in pipe.execute() for i in batch]
        if not ids:
            return []
        now = self.server_time()
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), "heartbeat_at", "updated_at")
        out = []
        for job_id, (hb, updated) in zip(ids, pipe.execute()):
            quiet = now - float(hb or updated or 0)
            if quiet >= older_than_s:
                out.append((job_id, quiet))
        return out

    def hold_reaper_lease(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease that lets one process at a time sweep; False while
        another process holds it. It expires ``ttl_s`` after the last renewal."""
        ttl_ms = int(ttl_s * 1000)
        if self.r.set(self.keys.reaper_lease, holder, nx=True, px=ttl_ms):
            return True
        if self.r.get(self.keys.reaper_lease) == holder:
            self.r.pexpire(self.keys.reaper_lease, ttl_ms)
            return True
        return False

    def release_reaper_lease(self, holder: str) -> None:
        if self.r.get(self.keys.reaper_lease) == holder:
            self.r.delete(self.keys.reaper_lease)

    # --- metrics ------------------------------------------------------------------------
    def stats(self) -> dict[str, str]:
        return self.r.hgetall(self.keys.stats)

    def ping(self) -> bool:
        return bool(self.r.ping())

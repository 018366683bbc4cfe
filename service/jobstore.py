"""Merge jobs in Redis: records, listing, events, idempotency, and the state machine.

Used by the API (create, read, cancel) and by the worker (claim, progress, finish), so
it imports neither FastAPI nor torch. Every status change goes through
``JobStore.transition``, which checks ``TRANSITIONS`` and applies the change in one Lua
script: the status, the per-status indexes, the event log, the output reservation, the
webhook queue and the duration histogram can never disagree, even with several API
processes and workers racing on one job.

Redis layout (``{p}`` is ``settings.key_prefix``)::

    {p}:job:{id}          hash    one job (fields below, JSON for nested values)
    {p}:job:{id}:events   list    JSON events, oldest first
    {p}:jobs              zset    every job id, all scores 0: ids sort by time (ULID), so
                                  ZREVRANGEBYLEX lists newest first and ``after`` is a cursor
    {p}:jobs:{status}     zset    the same, one per status (listing filter, metrics)
    {p}:idem:{hash}       string  {"job_id", "body_sha256"}, expires after idempotency_ttl_s;
                                  hash = sha256(tenant, key): each tenant has its own keys
    {p}:tenant:{t}:jobs   zset    the ids of tenant t's jobs (as {p}:jobs: listing per tenant)
    {p}:tenant:{t}:queued zset    ids of t's jobs that were queued when last looked at
                                  (pruned on each submit; the per-tenant queue quota)
    {p}:outputs           hash    output -> id of the active job writing it; the output in
                                  drmerge.locations.as_prefix form (canonical, ending in /)
    {p}:outputs:sorted    zset    the same outputs, all scores 0: a ZRANGEBYLEX on a prefix
                                  finds an active output inside a new one (see create)
    {p}:webhooks:due      zset    job id -> unix time its next webhook attempt is due
    {p}:cleanup:due       zset    job id -> unix time its next output cleanup attempt is due
    {p}:workers           zset    worker name -> unix time of its last heartbeat
    {p}:worker:{name}     hash    what that worker said about itself (expires)
    {p}:stats             hash    byte counters and the job duration histogram
    {p}:cancel            channel job ids whose cancel was requested (workers listen)
    {p}:reaper            string  lease: which process sweeps for stale jobs right now

Reliability fields of a job hash (service/reaper.py, worker/runner.py):
``heartbeat_at`` (Redis server time of the owning attempt's last heartbeat: the reaper
judges staleness against Redis's own clock, so host clock skew does not matter),
``shards`` (JSON list of output shards committed so far, ``{name, size, sha256, plan}``:
a restarted attempt verifies and keeps them), ``handoffs`` (times a worker gave the job
back on shutdown: not failures, so they do not count against ``job_max_attempts``),
``queue`` (the Celery queue the job was submitted to: every later message for it, a
re-queue, a re-send or a cleanup request, goes there, whichever process sends it) and
``cleanup`` (``pending`` when a job ended leaving partial output: it ended without its
worker, or its run's own cleanup failed because the storage was unreachable; ``failed``
once the retries were given up), with ``cleanup_files`` (JSON list: objects the failed run
could not remove, beyond its ``shards``) and ``cleanup_attempts``. While a cleanup is
pending the job keeps its output reservation, so no new job writes there before it is
clean; the reaper (service/reaper.py) sends a worker the job's id again with backoff until
the cleanup succeeds (``DRMERGE_CLEANUP_*``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis

from drmerge import locations

STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"queued", "running", "cancelling"})

# The only legal status changes. Beyond DESIGN.md's queued -> running -> succeeded|failed
# and queued|running -> cancelling -> cancelled:
#   queued -> cancelled      a queued job has nothing to stop, so its cancel is immediate
#                            (the worker that later receives its message acks and skips it);
#   queued -> failed         the job could not be enqueued, or its worker died too often;
#   running -> running       a redelivered job whose worker died is claimed by a new worker
#                            (attempt + 1; the old attempt is fenced off by its number);
#   running -> queued        handed back: its worker is shutting down (SIGTERM), or it
#                            vanished and the reaper re-queued it; the next attempt resumes
#                            from the shards already committed;
#   cancelling -> succeeded|failed   the merge ended before it saw the cancel.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"running", "queued", "succeeded", "failed", "cancelling"}),
    "cancelling": frozenset({"cancelled", "succeeded", "failed"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

# drmerge_job_duration_seconds buckets: merges take seconds (tests) to hours (70B models).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600, 43200)

MAX_EVENTS = 1000
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_JSON_FIELDS = ("spec", "metadata", "progress", "result", "error", "webhook", "webhook_state", "shards",
                "cleanup_files")


_id_lock = threading.Lock()
_last_id = [0, 0]  # (ms, random) of the newest id this process made


def new_job_id(now: float | None = None) -> str:
    """``mrg_`` + a lowercase ULID: 48 bits of milliseconds then 80 random bits, so ids
    sort by creation time (the list index relies on this) and never collide. Within one
    process ids are strictly increasing even inside one millisecond."""
    ms = int((time.time() if now is None else now) * 1000)
    rnd = int.from_bytes(os.urandom(10), "big")
    with _id_lock:
        if ms <= _last_id[0]:
            ms, rnd = _last_id[0], (_last_id[1] + 1 + (rnd & 0xFFFF)) % (1 << 80)
        _last_id[0], _last_id[1] = ms, rnd
    n = (ms << 80) | rnd
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return "mrg_" + "".join(reversed(chars))


def is_job_id(value: str) -> bool:
    return (isinstance(value, str) and len(value) == 30 and value.startswith("mrg_")
            and all(c in _CROCKFORD for c in value[4:]))


def iso(ts: float | None) -> str | None:
    """RFC 3339 UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def body_hash(body) -> str:
    """Hash of a request body that ignores key order and whitespace (idempotency)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobStoreError(Exception):
    pass


class JobNotFound(JobStoreError):
    def __init__(self, job_id: str):
        super().__init__(f"no merge job {job_id!r}")
        self.job_id = job_id


class IllegalTransition(JobStoreError):
    def __init__(self, job_id: str, current: str, target: str):
        super().__init__(f"job {job_id} is {current}; it cannot become {target}")
        self.job_id, self.current, self.target = job_id, current, target


class IdempotencyConflict(JobStoreError):
    def __init__(self, key: str, job_id: str):
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request body (job {job_id})")
        self.key, self.job_id = key, job_id


class OutputBusy(JobStoreError):
    """``output`` overlaps ``held``, the output of the active job ``job_id``: the same
    location, one containing it, or one inside it."""

    def __init__(self, output: str, job_id: str, held: str | None = None):
        held = output if held is None else held
        where = held if held.rstrip("/") == output.rstrip("/") else (
            f"{held}, which contains {output}" if locations.contains(held, output) else f"{held}, inside {output}")
        super().__init__(f"job {job_id} is already writing to {where}; wait for it or cancel it")
        self.output, self.job_id, self.held = output, job_id, held


def _unprefixed(reserved: str) -> str:
    """A reservation key back as the location it reserves (local paths have no trailing /)."""
    return reserved if locations.is_s3(reserved) or reserved == "/" else reserved.rstrip("/")


class QuotaExceeded(JobStoreError):
    def __init__(self, tenant: str, queued: int):
        super().__init__(f"tenant {tenant!r} already has {queued} queued jobs, the most allowed; "
                         "retry when some have started")
        self.tenant, self.queued = tenant, queued


class StaleAttempt(JobStoreError):
    """A worker acted on a job attempt that another worker has since claimed."""


class StillAlive(JobStoreError):
    """The reaper meant to act on a job whose heartbeat turned out to be fresh."""


@dataclass
class Job:
    id: str
    status: str
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
            id=h["id"], status=h["status"], created_at=float(h["created_at"]), spec=js("spec") or {},
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
        webhook = None
        if self.webhook:
            state = self.webhook_state or {}
            webhook = {"url": self.webhook["url"], "status": state.get("status", "waiting"),
                       "attempts": state.get("attempts", 0), "last_error": state.get("last_error"),
                       "delivered_at": iso(state.get("delivered_at"))}
        return {
            "id": self.id, "object": "merge", "status": self.status,
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


# --- Lua --------------------------------------------------------------------------------
# KEYS: 1 job, 2 events, 3 outputs, 4 webhooks due, 5 stats, 6..11 one zset per STATUSES,
#       12 cleanup due, then the sorted outputs (KEYS[#KEYS]).
# ARGV[11]: when a pending cleanup is due ('' for none).
_STATUS_INDEX = "{" + ", ".join(f"{s}={i + 6}" for i, s in enumerate(STATUSES)) + "}"

_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
local to, now = ARGV[2], ARGV[4]
local ok = false
for s in string.gmatch(ARGV[3], '%S+') do if s == cur then ok = true end end
if not ok then return {'illegal', cur} end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[5] then return {'stale', cur} end
if ARGV[10] ~= '' then
  -- the reaper's condition: act only if the owner's heartbeat is older than ARGV[10] s
  -- by Redis's own clock (updated_at stands in until the first heartbeat)
  local hb = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or redis.call('HGET', KEYS[1], 'updated_at') or '0')
  local t = redis.call('TIME')
  if tonumber(t[1]) + tonumber(t[2]) / 1e6 - hb < tonumber(ARGV[10]) then return {'alive', cur} end
end
local idx = """ + _STATUS_INDEX + """
local fields = cjson.decode(ARGV[6])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'status', to, 'updated_at', now)
if cur ~= to then
  redis.call('ZREM', KEYS[idx[cur]], ARGV[1])
  redis.call('ZADD', KEYS[idx[to]], 0, ARGV[1])
end
if ARGV[11] ~= '' then redis.call('ZADD', KEYS[12], ARGV[11], ARGV[1]) end
local terminal = (to == 'succeeded' or to == 'failed' or to == 'cancelled')
if terminal then
  -- the output stays reserved while partial output of this job may remain (cleanup pending)
  local out = redis.call('HGET', KEYS[1], 'output')
  if out and redis.call('HGET', KEYS[3], out) == ARGV[1] and redis.call('HGET', KEYS[1], 'cleanup') ~= 'pending' then
    redis.call('HDEL', KEYS[3], out)
    redis.call('ZREM', KEYS[#KEYS], out)
  end
  if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('HSET', KEYS[1], 'webhook_state', cjson.encode({status='pending', attempts=0}))
    redis.call('ZADD', KEYS[4], now, ARGV[1])
  end
  local started = redis.call('HGET', KEYS[1], 'started_at')
  if started and started ~= '' then
    local d = tonumber(now) - tonumber(started)
    if d < 0 then d = 0 end
    for le in string.gmatch(ARGV[7], '%S+') do
      if d <= tonumber(le) then redis.call('HINCRBY', KEYS[5], 'dur:' .. to .. ':' .. le, 1) end
    end
    redis.call('HINCRBY', KEYS[5], 'dur:' .. to .. ':count', 1)
    redis.call('HINCRBYFLOAT', KEYS[5], 'dur:' .. to .. ':sum', d)
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
local ev = cjson.decode(ARGV[8])
ev['id'] = seq
ev['from'] = cur
redis.call('RPUSH', KEYS[2], cjson.encode(ev))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[9]), -1)
return {'ok', cur}
"""

# KEYS: 1 job, 2 events, 3 all jobs, 4 queued, 5 outputs, 6 idempotency key (may be unused),
#       7 tenant's jobs, 8 tenant's queued, 9 sorted outputs
# ARGV: 1 id, 2 fields json, 3 output (as_prefix form), 4 use idem (0/1), 5 body hash, 6 idem ttl,
#       7 event json, 8 most queued jobs of the tenant (0: no limit), 9 job key prefix,
#       10 json list of the output's parents (drmerge.locations.parents)
# The output is busy when an active job holds it, a location containing it (one HGET per
# parent: the depth) or one inside it (all outputs inside it sort right after it: one
# ZRANGEBYLEX; '\255' sorts after every byte of UTF-8 text). Returns the held location.
# The quota count reads the job hashes of the tenant's queued set by name (not KEYS):
# fine on a single Redis, which is what the service runs on.
_CREATE_LUA = """
if ARGV[4] == '1' then
  local prev = redis.call('GET', KEYS[6])
  if prev then
    local p = cjson.decode(prev)
    if p['body_sha256'] == ARGV[5] then return {'replay', p['job_id']} end
    return {'idem_conflict', p['job_id']}
  end
end
local holder = redis.call('HGET', KEYS[5], ARGV[3])
if holder then return {'output_busy', holder, ARGV[3]} end
for _, parent in ipairs(cjson.decode(ARGV[10])) do
  holder = redis.call('HGET', KEYS[5], parent)
  if holder then return {'output_busy', holder, parent} end
end
while true do
  local inside = redis.call('ZRANGEBYLEX', KEYS[9], '(' .. ARGV[3], '(' .. ARGV[3] .. '\255', 'LIMIT', 0, 1)
  if #inside == 0 then break end
  holder = redis.call('HGET', KEYS[5], inside[1])
  if holder then return {'output_busy', holder, inside[1]} end
  redis.call('ZREM', KEYS[9], inside[1])  -- no holder: a stale entry, never written by these scripts
end
local maxq = tonumber(ARGV[8])
if maxq > 0 then
  local n = 0
  for _, qid in ipairs(redis.call('ZRANGE', KEYS[8], 0, -1)) do
    if redis.call('HGET', ARGV[9] .. qid, 'status') == 'queued' then n = n + 1
    else redis.call('ZREM', KEYS[8], qid) end
  end
  if n >= maxq then return {'quota', tostring(n)} end
  redis.call('ZADD', KEYS[8], 0, ARGV[1])
end
redis.call('ZADD', KEYS[7], 0, ARGV[1])
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'event_seq', 1)
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[9], 0, ARGV[3])
if ARGV[4] == '1' then
  redis.call('SET', KEYS[6], cjson.encode({job_id=ARGV[1], body_sha256=ARGV[5]}), 'EX', tonumber(ARGV[6]))
end
redis.call('RPUSH', KEYS[2], ARGV[7])
return {'created', ARGV[1]}
"""

# Progress and events are written only by the attempt that owns the job, and only while
# it is running or cancelling, so a late write from a fenced-off worker changes nothing.
# KEYS: 1 job, 2 stats, 3 events. ARGV: 1 attempt, 2 progress json, 3 now, 4 d_read,
# 5 d_written, 6 event json or '', 7 max events
_PROGRESS_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'cancelling' then return 0 end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2], 'updated_at', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[2], 'bytes_read', ARGV[4]) end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[2], 'bytes_written', ARGV[5]) end
if ARGV[6] ~= '' then
  local ev = cjson.decode(ARGV[6])
  ev['id'] = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
  redis.call('RPUSH', KEYS[3], cjson.encode(ev))
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
end
return 1
"""

# The owning attempt's heartbeat, stamped with Redis's clock. Returns 0 when the attempt no
# longer owns the job (it was re-queued or claimed by another worker, or it ended): the
# worker then stops without touching the output, which now belongs to someone else.
# KEYS: 1 job. ARGV: 1 attempt
_JOB_HEARTBEAT_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'cancelling' then return 0 end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'heartbeat_at', string.format('%d.%06d', t[1], t[2]))
return 1
"""

# Append (or replace, by name) one committed output shard in the resume journal; fenced
# like progress. KEYS: 1 job. ARGV: 1 attempt, 2 entry json
_RECORD_SHARD_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'cancelling' then return 0 end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
local entry = cjson.decode(ARGV[2])
local raw = redis.call('HGET', KEYS[1], 'shards')
local list = {}
if raw and raw ~= '' then list = cjson.decode(raw) end
local out = {}
for _, e in ipairs(list) do if e['name'] ~= entry['name'] then table.insert(out, e) end end
table.insert(out, entry)
redis.call('HSET', KEYS[1], 'shards', cjson.encode(out))
return 1
"""

# A queued job whose message is not known to be sent: mark it sent (the caller then sends
# it), so that two processes never both re-send one job. KEYS: 1 job. ARGV: 1 now
_CLAIM_ENQUEUE_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local at = redis.call('HGET', KEYS[1], 'enqueued_at')
if at and at ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'enqueued_at', ARGV[1])
return 1
"""

# Mark a job's output for a later cleanup: cleanup = pending, ``files`` added to
# cleanup_files, due at ARGV[3] unless a retry is already scheduled.
# KEYS: 1 job, 2 cleanup due. ARGV: 1 job id, 2 files json, 3 due
_SCHEDULE_CLEANUP_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local raw = redis.call('HGET', KEYS[1], 'cleanup_files')
local list, have = {}, {}
if raw and raw ~= '' then for _, n in ipairs(cjson.decode(raw)) do table.insert(list, n) end end
for _, n in ipairs(list) do have[n] = true end
for _, n in ipairs(cjson.decode(ARGV[2])) do
  if not have[n] then table.insert(list, n); have[n] = true end
end
redis.call('HSET', KEYS[1], 'cleanup', 'pending', 'cleanup_files', #list > 0 and cjson.encode(list) or '[]')
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[1])
return 1
"""

# The next try of a due cleanup: count it and schedule the one after (exponential backoff),
# so a lost message is retried too. Returns {attempt, queue}, or nil if not due / not pending.
# KEYS: 1 job, 2 cleanup due. ARGV: 1 job id, 2 now, 3 backoff base, 4 backoff max
_CLAIM_CLEANUP_LUA = """
local due = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return false end
if redis.call('HGET', KEYS[1], 'cleanup') ~= 'pending' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
local n = redis.call('HINCRBY', KEYS[1], 'cleanup_attempts', 1)
local delay = math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) * 2 ^ (n - 1))
redis.call('ZADD', KEYS[2], string.format('%.3f', tonumber(ARGV[2]) + delay), ARGV[1])
return {n, redis.call('HGET', KEYS[1], 'queue') or ''}
"""

# A cleanup ended: ARGV[2] 'done' (nothing of the job is left) or 'failed' (given up). The
# output reservation the job kept for it is released once the job is over.
# KEYS: 1 job, 2 events, 3 cleanup due, 4 outputs, 5 sorted outputs.
# ARGV: 1 job id, 2 outcome, 3 event json, 4 max events
_END_CLEANUP_LUA = """
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == 'done' then
  redis.call('HDEL', KEYS[1], 'cleanup', 'cleanup_files', 'cleanup_attempts')
else
  redis.call('HSET', KEYS[1], 'cleanup', ARGV[2])
end
local st = redis.call('HGET', KEYS[1], 'status')
local out = redis.call('HGET', KEYS[1], 'output')
if (st == 'succeeded' or st == 'failed' or st == 'cancelled') and out and redis.call('HGET', KEYS[4], out) == ARGV[1] then
  redis.call('HDEL', KEYS[4], out)
  redis.call('ZREM', KEYS[5], out)
end
local ev = cjson.decode(ARGV[3])
ev['id'] = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
redis.call('RPUSH', KEYS[2], cjson.encode(ev))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
return 1
"""

# KEYS: 1 job, 2 events. ARGV: 1 event json, 2 max events
_EVENT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ev = cjson.decode(ARGV[1])
ev['id'] = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
redis.call('RPUSH', KEYS[2], cjson.encode(ev))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
return 1
"""

# Claim the earliest due webhook: move its due time forward by a lease so a crashed
# deliverer's claim expires and another process retries it.
# KEYS: 1 due zset. ARGV: 1 now, 2 lease seconds
_CLAIM_WEBHOOK_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due[1])
return due[1]
"""


def _event(type_: str, message: str, now: float, **data) -> dict:
    ev = {"type": type_, "at": now, "message": message}
    ev.update({k: v for k, v in data.items() if v is not None})
    return ev


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "drmerge", idempotency_ttl_s: int = 86400):
        self.r = client
        self.p = prefix
        self.idempotency_ttl_s = idempotency_ttl_s
        self._transition = client.register_script(_TRANSITION_LUA)
        self._create = client.register_script(_CREATE_LUA)
        self._progress = client.register_script(_PROGRESS_LUA)
        self._event_script = client.register_script(_EVENT_LUA)
        self._claim_webhook = client.register_script(_CLAIM_WEBHOOK_LUA)
        self._job_heartbeat = client.register_script(_JOB_HEARTBEAT_LUA)
        self._record_shard = client.register_script(_RECORD_SHARD_LUA)
        self._claim_enqueue = client.register_script(_CLAIM_ENQUEUE_LUA)
        self._schedule_cleanup = client.register_script(_SCHEDULE_CLEANUP_LUA)
        self._claim_cleanup = client.register_script(_CLAIM_CLEANUP_LUA)
        self._end_cleanup = client.register_script(_END_CLEANUP_LUA)

    @classmethod
    def from_url(cls, url: str, prefix: str = "drmerge", **kw) -> "JobStore":
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                                      health_check_interval=30)
        return cls(client, prefix, **kw)

    # keys
    def k_job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def k_events(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:events"

    def k_index(self, status: str | None = None) -> str:
        return f"{self.p}:jobs" if status is None else f"{self.p}:jobs:{status}"

    def k_tenant(self, tenant: str, what: str = "jobs") -> str:
        return f"{self.p}:tenant:{tenant}:{what}"

    @property
    def k_outputs(self) -> str:
        return f"{self.p}:outputs"

    @property
    def k_outputs_sorted(self) -> str:
        return f"{self.p}:outputs:sorted"

    @property
    def k_webhooks_due(self) -> str:
        return f"{self.p}:webhooks:due"

    @property
    def k_cleanup_due(self) -> str:
        return f"{self.p}:cleanup:due"

    @property
    def k_stats(self) -> str:
        return f"{self.p}:stats"

    @property
    def k_workers(self) -> str:
        return f"{self.p}:workers"

    @property
    def cancel_channel(self) -> str:
        return f"{self.p}:cancel"

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
        fields = {"id": job_id, "status": "queued", "created_at": repr(now), "updated_at": repr(now),
                  "spec": json.dumps(spec), "metadata": json.dumps(metadata or {}), "output": reserved,
                  "attempts": "0", "tenant": tenant}
        if webhook:
            fields["webhook"] = json.dumps(webhook)
        if queue:
            fields["queue"] = queue
        if idempotency_key:
            fields["idempotency_key"] = idempotency_key
        ev = _event("status", "job created", now, to="queued")
        ev["id"] = 1
        idem_key = f"{self.p}:idem:-"
        if idempotency_key:
            scoped = f"{tenant}\n{idempotency_key}".encode()
            idem_key = f"{self.p}:idem:{hashlib.sha256(scoped).hexdigest()}"
        res = self._create(
            keys=[self.k_job(job_id), self.k_events(job_id), self.k_index(), self.k_index("queued"),
                  self.k_outputs, idem_key, self.k_tenant(tenant), self.k_tenant(tenant, "queued"),
                  self.k_outputs_sorted],
            args=[job_id, json.dumps(fields), reserved, "1" if idempotency_key else "0", request_hash or "",
                  self.idempotency_ttl_s, json.dumps(ev), int(max_queued), f"{self.p}:job:",
                  json.dumps(locations.parents(output))])
        kind, ref, *held = res
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
        h = self.r.hgetall(self.k_job(job_id))
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
        start = f"({after}" if after else "+"
        if tenant is None:
            ids = self.r.zrevrangebylex(self.k_index(status), start, "-", start=0, num=limit + 1)
        elif status is None:
            ids = self.r.zrevrangebylex(self.k_tenant(tenant), start, "-", start=0, num=limit + 1)
        else:
            ids = self._intersect(self.k_tenant(tenant), self.k_index(status), after, limit + 1)
        has_more = len(ids) > limit
        ids = ids[:limit]
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.k_job(i))
        jobs = [Job.from_hash(h) for h in pipe.execute() if h]
        return jobs, has_more

    def _intersect(self, a: str, b: str, after: str | None, n: int, batch: int = 256) -> list[str]:
        """The first ``n`` ids (newest first, older than ``after``) in both index a and
        b: walks the smaller one and checks membership in the other, so a tenant's
        status filter costs at most the size of the smaller index."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(a)
        pipe.zcard(b)
        size_a, size_b = pipe.execute()
        walk, other = (a, b) if size_a <= size_b else (b, a)
        out: list[str] = []
        cursor = after
        while len(out) < n:
            ids = self.r.zrevrangebylex(walk, f"({cursor}" if cursor else "+", "-", start=0, num=batch)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.zscore(other, i)
            out += [i for i, score in zip(ids, pipe.execute()) if score is not None]
            cursor = ids[-1]
            if len(ids) < batch:
                break
        return out[:n]

    def counts(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for s in STATUSES:
            pipe.zcard(self.k_index(s))
        return dict(zip(STATUSES, pipe.execute()))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[dict]:
        raw = self.r.lrange(self.k_events(job_id), 0, -1)
        out = []
        for item in raw:
            ev = json.loads(item)
            if ev.get("id", 0) > after:
                out.append(ev)
            if len(out) >= limit:
                break
        return out

    def add_event(self, job_id: str, type_: str, message: str, **data) -> None:
        ev = _event(type_, message, time.time(), **data)
        self._event_script(keys=[self.k_job(job_id), self.k_events(job_id)], args=[json.dumps(ev), MAX_EVENTS])

    def mark_enqueued(self, job_id: str) -> None:
        self.r.hset(self.k_job(job_id), "enqueued_at", repr(time.time()))

    def claim_enqueue(self, job_id: str) -> bool:
        """True if the caller is the one to (re)send this queued job's message."""
        return bool(self._claim_enqueue(keys=[self.k_job(job_id)], args=[repr(time.time())]))

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
            if k in _JSON_FIELDS:
                enc[k] = json.dumps(v)
            elif isinstance(v, float):
                enc[k] = repr(v)
            else:
                enc[k] = str(v)
        if to in TERMINAL:
            enc.setdefault("finished_at", repr(now))
        ev = _event("status", message or f"job {to}", now, to=to)
        keys = [self.k_job(job_id), self.k_events(job_id), self.k_outputs, self.k_webhooks_due, self.k_stats]
        keys += [self.k_index(s) for s in STATUSES] + [self.k_cleanup_due]
        keys.append(self.k_outputs_sorted)
        kind, cur = self._transition(
            keys=keys,
            args=[job_id, to, " ".join(sorted(sources)), repr(now), "" if attempt is None else str(attempt),
                  json.dumps(enc), " ".join(str(b) for b in DURATION_BUCKETS), json.dumps(ev), MAX_EVENTS,
                  "" if stale_after is None else repr(float(stale_after)),
                  "" if cleanup_due is None else f"{cleanup_due:.3f}"])
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
                if job.status == "queued":
                    self.transition(job_id, "cancelled", from_={"queued"}, now=now,
                                    fields={"cancel_requested_at": now},
                                    message="cancelled while queued; it will never start")
                elif job.status == "running":
                    self.transition(job_id, "cancelling", from_={"running"}, now=now,
                                    fields={"cancel_requested_at": now},
                                    message="cancel requested; the worker stops after the current tensor")
                    self.r.publish(self.cancel_channel, job_id)
                elif job.status in ("cancelling", "cancelled"):
                    return job
                else:
                    raise IllegalTransition(job_id, job.status, "cancelled")
            except IllegalTransition as e:
                if e.current in TERMINAL and e.current != "cancelled":
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
            ev = json.dumps(_event(event.pop("type", "stage"), event.pop("message", ""), now, **event))
        return bool(self._progress(keys=[self.k_job(job_id), self.k_stats, self.k_events(job_id)],
                                   args=[str(attempt), json.dumps(progress), repr(now), int(max(0, d_read)),
                                         int(max(0, d_written)), ev, MAX_EVENTS]))

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.k_job(job_id), "status") in ("cancelling", "cancelled")

    def job_heartbeat(self, job_id: str, attempt: int) -> bool:
        """Stamp the attempt's heartbeat; False when the attempt no longer owns the job."""
        return bool(self._job_heartbeat(keys=[self.k_job(job_id)], args=[str(attempt)]))

    def record_shard(self, job_id: str, attempt: int, entry: dict) -> bool:
        """Add a committed output shard to the job's resume journal (fenced by attempt)."""
        return bool(self._record_shard(keys=[self.k_job(job_id)], args=[str(attempt), json.dumps(entry)]))

    def server_time(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    def active_job_ids(self, statuses=("running", "cancelling")) -> list[str]:
        pipe = self.r.pipeline(transaction=False)
        for s in statuses:
            pipe.zrange(self.k_index(s), 0, -1)
        return [i for ids in pipe.execute() for i in ids]

    # --- workers ------------------------------------------------------------------------
    def heartbeat(self, name: str, info: dict, ttl_s: float) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(self.k_workers, {name: now})
        key = f"{self.p}:worker:{name}"
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in dict(info, last_seen=now).items()})
        pipe.expire(key, max(1, int(ttl_s * 3)))
        pipe.zremrangebyscore(self.k_workers, "-inf", now - ttl_s * 20)  # forget long-gone names
        pipe.execute()

    def remove_worker(self, name: str) -> None:
        self.r.zrem(self.k_workers, name)
        self.r.delete(f"{self.p}:worker:{name}")

    def live_workers(self, ttl_s: float) -> list[str]:
        return self.r.zrangebyscore(self.k_workers, time.time() - ttl_s, "+inf")

    # --- output cleanup -----------------------------------------------------------------
    def schedule_cleanup(self, job_id: str, files: list[str], due: float) -> None:
        """Mark the job's output for cleanup (``files``: objects that may remain besides its
        shards), first try at ``due`` unless a retry is already scheduled."""
        self._schedule_cleanup(keys=[self.k_job(job_id), self.k_cleanup_due],
                               args=[job_id, json.dumps(list(files)), f"{due:.3f}"])

    def due_cleanups(self, now: float | None = None, limit: int = 100) -> list[str]:
        now = time.time() if now is None else now
        return self.r.zrangebyscore(self.k_cleanup_due, "-inf", repr(now), start=0, num=limit)

    def claim_cleanup(self, job_id: str, backoff_base_s: float, backoff_max_s: float,
                      now: float | None = None) -> tuple[int, str | None] | None:
        """Take a due cleanup: returns (attempt number, the job's queue) and schedules the
        next try after ``min(max, base * 2^(attempt-1))``; None if it is not due or no
        longer pending."""
        now = time.time() if now is None else now
        res = self._claim_cleanup(keys=[self.k_job(job_id), self.k_cleanup_due],
                                  args=[job_id, repr(now), repr(float(backoff_base_s)), repr(float(backoff_max_s))])
        if not res:
            return None
        return int(res[0]), (res[1] or None)

    def end_cleanup(self, job_id: str, outcome: str, message: str) -> None:
        """``done``: nothing of the job is left in its output; ``failed``: retries given up.
        Either way its output reservation is released (once the job is over)."""
        assert outcome in ("done", "failed")
        ev = _event("cleanup", message, time.time(), outcome=outcome)
        self._end_cleanup(keys=[self.k_job(job_id), self.k_events(job_id), self.k_cleanup_due, self.k_outputs,
                                self.k_outputs_sorted],
                          args=[job_id, outcome, json.dumps(ev), MAX_EVENTS])

    # --- webhooks -----------------------------------------------------------------------
    def claim_due_webhook(self, lease_s: float) -> str | None:
        return self._claim_webhook(keys=[self.k_webhooks_due], args=[repr(time.time()), repr(lease_s)])

    def schedule_webhook(self, job_id: str, state: dict, due: float | None) -> None:
        """Record a delivery attempt's outcome and when to try again (None: done)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_job(job_id), "webhook_state", json.dumps(state))
        if due is None:
            pipe.zrem(self.k_webhooks_due, job_id)
        else:
            pipe.zadd(self.k_webhooks_due, {job_id: due})
        pipe.execute()

    # --- metrics ------------------------------------------------------------------------
    def stats(self) -> dict[str, str]:
        return self.r.hgetall(self.k_stats)

    def ping(self) -> bool:
        return bool(self.r.ping())

"""Where job state lives in Redis: every key name of one deployment, in one place.

Redis layout (``{p}`` is ``settings.key_prefix``)::

    {p}:job:{id}          hash    one job (fields: service.jobs.model.Job, JSON for nested values)
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
                                  finds an active output inside a new one (see create.lua)
    {p}:webhooks:due      zset    job id -> unix time its next webhook attempt is due
    {p}:cleanup:due       zset    job id -> unix time its next output cleanup attempt is due
    {p}:workers           zset    worker name -> unix time of its last heartbeat
    {p}:worker:{name}     hash    what that worker said about itself (expires)
    {p}:stats             hash    byte counters and the job duration histogram
    {p}:cancel            channel job ids whose cancel was requested (workers listen)
    {p}:reaper            string  lease: which process sweeps for stale jobs right now

API keys (service.keys) live under the same prefix, in their own keys.
"""

from __future__ import annotations

import hashlib


class Keys:
    """The key names under one prefix (several deployments or test stacks share a Redis
    by using different prefixes)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.all_jobs = f"{prefix}:jobs"
        self.outputs = f"{prefix}:outputs"
        self.outputs_sorted = f"{prefix}:outputs:sorted"
        self.webhooks_due = f"{prefix}:webhooks:due"
        self.cleanup_due = f"{prefix}:cleanup:due"
        self.stats = f"{prefix}:stats"
        self.workers = f"{prefix}:workers"
        self.cancel_channel = f"{prefix}:cancel"
        self.reaper_lease = f"{prefix}:reaper"
        self.job_prefix = f"{prefix}:job:"  # + id: the job hash

    def job(self, job_id: str) -> str:
        return self.job_prefix + job_id

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def index(self, status: str | None = None) -> str:
        """The index of every job (``None``) or of the jobs in one status."""
        return self.all_jobs if status is None else f"{self.prefix}:jobs:{status}"

    def tenant(self, tenant: str, what: str = "jobs") -> str:
        """A tenant's jobs (``what="jobs"``) or its queued jobs (``"queued"``)."""
        return f"{self.prefix}:tenant:{tenant}:{what}"

    def idempotency(self, tenant: str, key: str | None) -> str:
        """The record of ``key`` as used by ``tenant`` (a placeholder name without one)."""
        if not key:
            return f"{self.prefix}:idem:-"
        scoped = f"{tenant}\n{key}".encode()
        return f"{self.prefix}:idem:{hashlib.sha256(scoped).hexdigest()}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

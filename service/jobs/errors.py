"""What can go wrong with a job store operation: one exception class per outcome, so the
API maps each to its HTTP problem and the worker and reaper to their decision."""

from __future__ import annotations

from drmerge import locations


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


class QuotaExceeded(JobStoreError):
    def __init__(self, tenant: str, queued: int):
        super().__init__(f"tenant {tenant!r} already has {queued} queued jobs, the most allowed; "
                         "retry when some have started")
        self.tenant, self.queued = tenant, queued


class StaleAttempt(JobStoreError):
    """A worker acted on a job attempt that another worker has since claimed."""


class StillAlive(JobStoreError):
    """The reaper meant to act on a job whose heartbeat turned out to be fresh."""

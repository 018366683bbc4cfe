"""The status of a merge job: THE one definition (pure Python, no imports of the project).

The API schemas, the job store and its Lua scripts, the runner, the reaper, the metrics,
drmerge_client and the ``drmerge`` CLI all take the statuses, the terminal and active
sets and the legal transitions from here.

The life of a job: ``queued -> running -> succeeded | failed``, and ``queued | running ->
cancelling -> cancelled``. ``TRANSITIONS`` is every legal change; beyond those:

- ``queued -> cancelled``: a queued job has nothing to stop, so its cancel is immediate
  (the worker that later receives its message acks and skips it);
- ``queued -> failed``: the job could not be enqueued, or its worker died too often;
- ``running -> running``: a redelivered job whose worker died is claimed by a new worker
  (attempt + 1; the old attempt is fenced off by its number);
- ``running -> queued``: handed back: its worker is shutting down (SIGTERM), or it
  vanished and the reaper re-queued it; the next attempt resumes from the shards already
  committed;
- ``cancelling -> succeeded | failed``: the merge ended before it saw the cancel.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A job's status. A ``str``: members equal, hash and serialise as their values."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Every status in lifecycle order (the per-status indexes, metrics labels, CLI choices).
STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
# A job in one of these never changes again.
TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# Not over yet: it holds its output reservation and a worker may still act on it.
ACTIVE: frozenset[JobStatus] = frozenset(STATUSES) - TERMINAL
# Being worked on by a worker attempt (which stamps a heartbeat the reaper watches).
OWNED: frozenset[JobStatus] = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED,
                                  JobStatus.CANCELLING}),
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.SUCCEEDED, JobStatus.FAILED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

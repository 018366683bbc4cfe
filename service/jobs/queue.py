"""The merge queue: the Celery app definition, the task name, and the one ``enqueue``.

Both sides of the queue build on this module: the API (submit) and the reaper in every
process send merge messages through ``enqueue``, and the worker (worker/celery_app.py)
builds its Celery app with ``make_celery`` plus its task modules. Importing it stays
torch-free and worker-free: a message carries only the job id and is sent by task name.

Why these settings:
- one merge at a time per worker (``worker_prefetch_multiplier=1``, concurrency 1):
  a merge uses the whole GPU and a large share of host memory;
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a worker that dies mid-merge
  leaves its message unacknowledged, so the job is redelivered, not lost;
- the broker's ``visibility_timeout`` is above the longest allowed job, or Redis would
  hand a still-running merge to a second worker;
- a hard time limit a little above ``job_time_limit_s``: the task enforces the limit
  itself between tensors (and cleans up); the hard limit only catches a hung worker
  (the threads pool cannot enforce it; the runner's watchdog does);
- task events on (``worker_send_task_events``): Flower and ``celery events`` see each
  merge received, started and ended, with the job's outcome as its state (worker.tasks);
- a merge is not cancelled when the broker connection drops (a Redis restart): it keeps
  running and records its outcome in the job store once Redis is back. Its late ack may
  be lost with the old connection; the redelivery hours later finds the job over and is
  dropped.

A SIGKILLed worker's message is not what brings its job back (that takes the visibility
timeout): the job's heartbeat stops and the reaper (service/reaper.py) re-queues it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from celery import Celery

from service.settings import Settings, get_settings

MERGE_TASK = "drmerge.merge"
HARD_LIMIT_GRACE_S = 600


def make_celery(settings: Settings | None = None, include: Sequence[str] = ()) -> Celery:
    """The Celery app of ``settings``; ``include`` names task modules (the worker's)."""
    s = settings or get_settings()
    app = Celery("drmerge", broker=s.celery_broker_url, include=list(include))
    app.conf.update(
        task_default_queue=s.queue,
        task_routes={MERGE_TASK: {"queue": s.queue}},
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_track_started=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_time_limit=s.job_time_limit_s + HARD_LIMIT_GRACE_S,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": s.job_time_limit_s + 2 * HARD_LIMIT_GRACE_S,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
    )
    return app


def enqueue(celery: Celery, job_id: str, *, queue: str) -> None:
    """Publish the merge message of job ``job_id`` on ``queue``: the job's own queue (the
    one its record got at submission), whichever process sends it, so a job only ever
    reaches the worker pool it was sent to. The message carries only the id (the job is
    in Redis) and the job id is also the Celery task id, so broker and worker logs name
    the job. Raises whatever the broker raises: callers decide what a failed send means
    (the API fails the job, the reaper and a hand-back leave it for the next sweep)."""
    celery.send_task(MERGE_TASK, args=[job_id], queue=queue, task_id=job_id)


def send_once(store, send: Callable[[str, str], None], job_id: str, queue: str) -> bool:
    """(Re)send the message of a queued job to ``queue`` (its own) when its message is
    not known to be sent, unless another process claimed that send first (the job store's
    ``claim_enqueue``): the reaper's re-queues and unsent jobs, and a worker's hand-back.
    Returns whether this call sent it. If ``send`` fails, the job is marked unsent again,
    so the next reaper sweep retries, and the error propagates for the caller to report."""
    if not store.claim_enqueue(job_id):
        return False
    try:
        send(job_id, queue)
    except Exception:
        store.mark_unsent(job_id)
        raise
    return True


def sender(celery: Celery) -> Callable[[str, str], None]:
    """``enqueue`` bound to one Celery app: the ``(job_id, queue) -> None`` callable the
    reaper and the runner are given."""
    return lambda job_id, queue: enqueue(celery, job_id, queue=queue)

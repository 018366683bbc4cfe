"""Celery tasks and worker lifecycle hooks. Thin: the job rules are in worker.runner,
the merge in drmerge.pipeline.

A worker process also keeps a heartbeat in Redis (``/readyz`` and ``drmerge_workers_live``
count them) and one in the record of the job it runs (the reaper re-queues a job whose
heartbeat stops), and runs a webhook delivery loop and the reaper (service/reaper.py).

On SIGTERM (warm shutdown) the running merge stops at the next tensor and its job goes
back to the queue with its committed shards kept (worker.runner); Celery then acks the
message and exits.

The Celery task's state tells the job's outcome (Flower, ``celery events``): SUCCESS for a
succeeded job (and for a message with nothing to do: a duplicate, a job already over, a
hand-back), FAILURE with ``JobFailed`` or ``JobCancelled`` otherwise. Those are raised
only after the job record is final, and a raised exception acks the message
(``task_acks_on_failure_or_timeout``), so a failed job is never redelivered; a worker
that dies mid-merge still leaves its message unacked (``reject_on_worker_lost``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery import signals

from service.jobs.queue import MERGE_TASK, enqueue
from service.jobs.status import JobStatus
from service.jobs.store import JobStore
from service.reaper import Reaper
from service.settings import get_settings
from service.webhooks import WebhookDeliverer

from .celery_app import celery_app
from .runner import JobRunner

log = logging.getLogger("drmerge.worker")
for _noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # per-client INFO lines, not job news
    logging.getLogger(_noisy).setLevel(logging.WARNING)

_state: dict = {"name": None, "runner": None, "store": None, "stop": threading.Event(), "threads": []}


def _store() -> JobStore:
    if _state["store"] is None:
        s = get_settings()
        _state["store"] = JobStore.from_url(s.redis_url, prefix=s.key_prefix, idempotency_ttl_s=s.idempotency_ttl_s)
    return _state["store"]


def resolve_device(setting: str) -> str:
    """``auto`` -> cuda if a GPU is visible, else cpu (decided once, at worker start)."""
    if setting != "auto":
        return setting
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def _runner(hostname: str | None = None) -> JobRunner:
    if _state["runner"] is None:
        s = get_settings()
        name = _state["name"] or hostname or f"drmerge@{socket.gethostname()}-{os.getpid()}"
        _state["name"] = name
        _state["runner"] = JobRunner(_store(), s, name, device=resolve_device(s.worker_device), enqueue=_enqueue)
    return _state["runner"]


def _enqueue(job_id: str, queue: str) -> None:
    """Publish a merge message to ``queue``: the job's own (JobStore ``queue``), not
    necessarily this worker's, so a job never reaches a pool it was not sent to."""
    enqueue(celery_app, job_id, queue=queue)


class JobFailed(Exception):
    """The merge job failed (its record, already final, says why): the task's FAILURE."""


class JobCancelled(Exception):
    """The merge job was cancelled (its record is final): the task's FAILURE, not SUCCESS."""


def outcome_of(job_id: str, status: str | None) -> str | None:
    """The task's return value for a job that ended ``status``, or the exception that makes
    the task's state FAILURE."""
    if status == JobStatus.FAILED:
        job = _store().get(job_id)
        error = (job.error if job else None) or {}
        raise JobFailed(f"job {job_id} failed: {error.get('code', 'internal_error')}: {error.get('message', '')}"[:1000])
    if status == JobStatus.CANCELLED:
        raise JobCancelled(f"job {job_id} was cancelled")
    return status


# throws: expected outcomes, logged by Celery as one line (no traceback).
@celery_app.task(name=MERGE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
                 throws=(JobFailed, JobCancelled))
def merge(self, job_id: str) -> str | None:
    """Run merge job ``job_id`` (the message carries only the id; the job is in Redis)."""
    return outcome_of(job_id, _runner(self.request.hostname).run(job_id))


def _heartbeat_loop() -> None:
    s = get_settings()
    started = time.time()
    while not _state["stop"].is_set():
        runner = _state["runner"]
        try:
            _store().workers.heartbeat(_state["name"], {"pid": os.getpid(), "host": socket.gethostname(),
                                                "device": runner.device if runner else None,
                                                "started_at": started, "queue": s.queue,
                                                "current_job": runner.current_job if runner else None},
                               s.worker_heartbeat_ttl_s)
        except Exception as e:
            log.warning("heartbeat failed: %s", e)
        if runner is not None:
            try:
                runner.heartbeat_job()
            except Exception as e:
                log.warning("job heartbeat failed: %s", e)
        _state["stop"].wait(s.worker_heartbeat_s)


@signals.worker_ready.connect
def _on_ready(sender=None, **_):
    hostname = getattr(sender, "hostname", None)
    _state["name"] = hostname or _state["name"]
    runner = _runner(hostname)
    log.info("worker %s ready on device %s", runner.worker_name, runner.device)
    try:  # import torch and the engine now, not inside the first job
        import drmerge.pipeline  # noqa: F401
    except Exception as e:
        log.error("cannot import the merge engine: %s", e)
    t = threading.Thread(target=_heartbeat_loop, name="drmerge-heartbeat", daemon=True)
    t.start()
    _state["threads"].append(t)
    _state["deliverer"] = WebhookDeliverer(_store(), get_settings()).start()
    _state["reaper"] = Reaper(_store(), get_settings(), _enqueue, name=runner.worker_name).start()


@signals.worker_shutting_down.connect
def _on_shutting_down(**_):
    """SIGTERM/SIGINT (sent from the signal handler: only set flags here). The merge in
    progress stops at the next tensor and its job is handed back to the queue."""
    runner = _state["runner"]
    if runner is not None:
        runner.shutting_down.set()


@signals.worker_shutdown.connect
def _on_shutdown(**_):
    _state["stop"].set()
    for key in ("deliverer", "reaper"):
        if _state.get(key) is not None:
            _state[key].stop()
    if _state["name"]:
        try:
            _store().workers.remove(_state["name"])
        except Exception:
            pass

"""The reaper: no job stays ``running`` after its worker has gone.

A worker killed with SIGKILL (OOM killer, node loss, ``kill -9``) leaves its job
``running`` and its Celery message unacknowledged; Redis would only hand that message out
again after the broker's visibility timeout, which must exceed the job time limit (hours).
Instead the owning attempt stamps ``heartbeat_at`` in the job record every
``worker_heartbeat_s``, and the reaper looks for jobs whose heartbeat is older than
``job_heartbeat_timeout_s``:

- ``running``: back to ``queued`` with a fresh message (the next attempt resumes from the
  shards already committed), or, once the job has lost ``job_max_attempts`` workers,
  ``failed`` with ``internal_error`` (service.jobs.model.lost_workers_error says why that code);
- ``cancelling``: ``cancelled`` (nobody is left to stop);
- a job that ends here is marked ``cleanup: pending`` and a message is sent anyway: the
  worker that receives it removes the partial output (the API has no S3 credentials);
- a job whose cleanup is pending (ended here, or its run could not remove its partial
  output because S3 was unreachable) is sent to a worker again each time its retry is due,
  backing off from ``cleanup_backoff_base_s`` up to ``cleanup_backoff_max_s``, until a
  worker finds its output clean; after ``cleanup_max_attempts`` tries it is given up
  (``cleanup: failed``, an event says what may remain) and its output released;
- ``queued`` with no message known to be sent (the API died between storing the job and
  publishing it) older than ``job_heartbeat_timeout_s``: the message is sent.

Every message goes to the job's own queue (the ``queue`` its record got at submission),
never to this process's ``DRMERGE_QUEUE``: one reaper serves worker pools on several
queues, and a job must only reach the pool it was sent to. A record without one (made
before the field existed) falls back to this process's queue.

Where it runs: in every API process and every worker (``reaper_interval_s``). The API is
the one part that is always up (workers may scale to zero, and the message a re-queue
sends is what wakes the autoscaler); workers run it too so that recovery does not depend
on the API. Several replicas are safe: one sweeps at a time, by a lease in Redis that
expires if its holder dies, and each decision is one atomic, fenced step (the job's
attempt number must be unchanged and its heartbeat still stale, by Redis's clock), so a
job is never re-queued twice or taken from a worker that just came back.

A reaper that could not reach Redis judges nothing until Redis has answered it for two
heartbeat periods: during an outage every heartbeat looks stale, and workers need a
moment to refresh theirs once Redis is back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from .jobs.errors import IllegalTransition, StaleAttempt, StillAlive
from .jobs.model import lost_workers_error
from .jobs.queue import send_once
from .jobs.status import OWNED, JobStatus
from .jobs.store import JobStore

log = logging.getLogger("drmerge.reaper")


class Reaper:
    def __init__(self, store: JobStore, settings, enqueue, name: str | None = None):
        self.store = store
        self.settings = settings
        self.enqueue = enqueue  # (job_id, queue) -> None: publish a merge message to that queue
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.lease_key = store.keys.reaper_lease
        self._connected_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one sweep ---------------------------------------------------------------------
    def _hold_lease(self) -> bool:
        return self.store.hold_reaper_lease(self.name, max(1.0, self.settings.reaper_interval_s * 3))

    def sweep(self, force: bool = False) -> dict:
        """Look once; returns what was done: {"requeued", "failed", "cancelled", "sent",
        "cleanup", "cleanup_given_up"} (lists of job ids). ``force`` skips the lease and the
        reconnect grace (tests)."""
        done: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "sent": [], "cleanup": [],
                                      "cleanup_given_up": []}
        try:
            if not force:
                if not self._hold_lease():
                    self._connected_since = self._connected_since or time.monotonic()
                    return done
                now_m = time.monotonic()
                if self._connected_since is None:
                    self._connected_since = now_m
                if now_m - self._connected_since < 2 * self.settings.worker_heartbeat_s:
                    return done  # just (re)connected: let workers refresh their heartbeats first
            self._reap_stale(done)
            self._send_unsent(done)
            self._retry_cleanups(done)
        except Exception as e:  # Redis away: judge nothing until it has been back a while
            self._connected_since = None
            log.warning("reaper: %s", e)
        return done

    def _reap_stale(self, done: dict) -> None:
        s = self.settings
        limit = s.job_heartbeat_timeout_s
        for job_id, quiet_s in self.store.stale_owned(limit):
            job = self.store.get(job_id)
            if job is None or job.status not in OWNED:
                continue
            quiet = round(quiet_s)
            who = f"worker {job.worker}" if job.worker else "its worker"
            try:
                if job.status == JobStatus.CANCELLING:
                    self.store.transition(job_id, JobStatus.CANCELLED, from_={JobStatus.CANCELLING},
                                          attempt=job.attempts, stale_after=limit, fields={"cleanup": "pending"},
                                          cleanup_due=time.time() + s.cleanup_backoff_base_s,
                                          message=f"cancelled: {who} vanished (no heartbeat for {quiet}s) "
                                                  "before it stopped")
                    done["cancelled"].append(job_id)
                    self._send_cleanup(job_id, job.queue)
                elif job.lost >= s.job_max_attempts:
                    self.store.transition(
                        job_id, JobStatus.FAILED, from_={JobStatus.RUNNING}, attempt=job.attempts, stale_after=limit,
                        cleanup_due=time.time() + s.cleanup_backoff_base_s,
                        fields={"cleanup": "pending",
                                "error": lost_workers_error(job.lost, s.job_max_attempts,
                                                            f"{who} stopped sending heartbeats (none for {quiet}s)")},
                        message=f"failed: {who} vanished (no heartbeat for {quiet}s); too many lost workers")
                    done["failed"].append(job_id)
                    self._send_cleanup(job_id, job.queue)
                else:
                    self.store.transition(
                        job_id, JobStatus.QUEUED, from_={JobStatus.RUNNING}, attempt=job.attempts, stale_after=limit,
                        fields={"worker": "", "enqueued_at": ""},
                        message=f"{who} vanished (no heartbeat for {quiet}s); re-queued "
                                f"(lost {job.lost} of at most {s.job_max_attempts} workers)")
                    done["requeued"].append(job_id)
                    self._send(job_id, job.queue)
            except (StillAlive, StaleAttempt, IllegalTransition):
                continue  # it came back, or moved on, meanwhile
            log.warning("reaper: job %s: %s vanished (no heartbeat for %ss)", job_id, who, quiet)

    def _send_unsent(self, done: dict) -> None:
        """Queued jobs whose message was never published (an API crash between storing
        the job and sending it, or a failed re-send)."""
        for job_id, queue in self.store.unsent_queued(self.settings.job_heartbeat_timeout_s):
            if self._send(job_id, queue):
                self.store.add_event(job_id, "status", "its queue message was never sent; sent it now")
                done["sent"].append(job_id)

    def _retry_cleanups(self, done: dict) -> None:
        """Jobs whose partial output is still to be removed and whose next try is due."""
        s = self.settings
        for job_id in self.store.due_cleanups():
            claimed = self.store.claim_cleanup(job_id, s.cleanup_backoff_base_s, s.cleanup_backoff_max_s)
            if claimed is None:
                continue
            attempt, queue = claimed
            if attempt > s.cleanup_max_attempts:
                job = self.store.get(job_id)
                left = sorted({e.get("name") for e in (job.shards if job else []) if isinstance(e, dict)}
                              | set(job.cleanup_files if job else []))
                self.store.end_cleanup(job_id, "failed", f"gave up removing the partial output after {attempt - 1} "
                                       f"tries (DRMERGE_CLEANUP_MAX_ATTEMPTS={s.cleanup_max_attempts}); remove what "
                                       f"is left of it by hand: {', '.join(map(str, left))[:1500] or 'its output prefix'}"
                                       ", and any unfinished multipart uploads there")
                log.warning("reaper: job %s: gave up removing its partial output", job_id)
                done["cleanup_given_up"].append(job_id)
                continue
            self._send_cleanup(job_id, queue)
            done["cleanup"].append(job_id)

    def _queue(self, queue: str | None) -> str:
        return queue or self.settings.queue  # a record older than the queue field

    def _send(self, job_id: str, queue: str | None) -> bool:
        try:
            return send_once(self.store, self.enqueue, job_id, self._queue(queue))
        except Exception as e:  # marked unsent: the next sweep retries
            log.warning("reaper: cannot queue job %s: %s", job_id, e)
            return False

    def _send_cleanup(self, job_id: str, queue: str | None) -> None:
        """A message for an ended job: the worker receiving it removes the partial output."""
        try:
            self.enqueue(job_id, self._queue(queue))
        except Exception as e:
            log.warning("reaper: cannot ask a worker to clean up after job %s: %s", job_id, e)

    # --- the loop ----------------------------------------------------------------------
    def start(self) -> "Reaper":
        if self.settings.reaper_interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="drmerge-reaper", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_s):
            self.sweep()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.store.release_reaper_lease(self.name)
        except Exception:
            pass

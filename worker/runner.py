"""One merge job's life on a worker: claim it, run the engine, record how it ended.

Kept apart from Celery so the rules read in one place (and so tests can drive it):
- a job that is already over, or was cancelled while queued, is never started;
- a job whose previous worker died is claimed again (attempt + 1) unless that worker is
  still alive (then this is a duplicate delivery and is dropped), up to
  ``job_max_attempts``;
- every write is fenced by the attempt number, so a worker that was presumed dead can
  no longer change the job;
- progress goes to Redis at most every ``progress_interval_s`` (stage changes at once);
- cancellation arrives by Redis pub/sub (with a status poll as a fallback) and the engine
  polls it between tensors; the time limit is enforced the same way, and a watchdog ends
  the process if the engine is stuck inside one tensor far past the limit;
- the owning attempt stamps a heartbeat in the job record (``heartbeat_job``, from the
  worker's heartbeat thread); the reaper (service/reaper.py) re-queues a job whose
  heartbeat stops. A heartbeat that finds the job owned by someone else (re-queued,
  reclaimed, ended) makes this attempt stop at the next tensor without touching the
  output, which now belongs to the newer attempt;
- every committed output shard goes into the job's resume journal; a later attempt
  verifies those shards and merges only the rest;
- a failed or cancelled merge removes its partial output; if it cannot (the storage is
  unreachable), the job still ends with the merge's own error and is marked ``cleanup:
  pending`` (what may remain recorded), and the reaper sends it to a worker again, with
  backoff, until ``_discard_output`` finds the prefix clean;
- on worker shutdown (SIGTERM) the engine stops at the next tensor, keeps its committed
  shards, and the job goes back to the queue (``running -> queued``, a fresh message):
  a hand-off, which does not count as a lost attempt.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from service.jobs.errors import IllegalTransition, StaleAttempt
from service.jobs.model import empty_progress, lost_workers_error
from service.jobs.queue import send_once
from service.jobs.status import OWNED, JobStatus
from service.jobs.store import JobStore

log = logging.getLogger("drmerge.worker")

MAX_WARNING_EVENTS = 50
WATCHDOG_GRACE_S = 600
# Loggers of the service itself; everything else under "drmerge" is the engine, whose
# warnings become job events.
_SERVICE_LOGGERS = ("drmerge.worker", "drmerge.webhooks", "drmerge.api", "drmerge.metrics")


class ProgressReporter:
    """The engine's ``progress`` callback: throttled writes of the job's progress."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, interval_s: float):
        self.store, self.job_id, self.attempt, self.interval = store, job_id, attempt, interval_s
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.merge_started: float | None = None
        self.last_write = 0.0
        self.stage: str | None = None
        self.sent_read = 0
        self.sent_written = 0
        self.latest: dict = empty_progress()

    def __call__(self, p) -> None:
        with self.lock:
            now = time.monotonic()
            stage = getattr(p, "stage", None)
            done, total = int(getattr(p, "tensors_done", 0)), int(getattr(p, "tensors_total", 0))
            if self.merge_started is None and total and stage not in (None, "planning"):
                self.merge_started = now
            fraction = min(1.0, done / total) if total else 0.0
            eta = None
            if self.merge_started is not None and 0 < fraction < 1 and done >= 1:
                eta = round((now - self.merge_started) * (1 - fraction) / fraction, 1)
            elif fraction >= 1:
                eta = 0.0
            self.latest = {"stage": stage, "tensors_done": done, "tensors_total": total,
                           "bytes_read": int(getattr(p, "bytes_read", 0)),
                           "bytes_written": int(getattr(p, "bytes_written", 0)),
                           "fraction": round(fraction, 4), "eta_seconds": eta}
            stage_changed = stage != self.stage
            if not stage_changed and now - self.last_write < self.interval:
                return
            self.stage = stage
            self.last_write = now
            self._write({"type": "stage", "message": f"stage: {stage}", "stage": stage} if stage_changed else None)

    def _write(self, event: dict | None) -> None:
        p = self.latest
        d_read, d_written = p["bytes_read"] - self.sent_read, p["bytes_written"] - self.sent_written
        try:
            self.store.write_progress(self.job_id, self.attempt, p, d_read, d_written, event)
            self.sent_read, self.sent_written = p["bytes_read"], p["bytes_written"]
        except Exception as e:  # progress is best effort: never fail a merge over it
            log.warning("job %s: cannot write progress: %s", self.job_id, e)

    def flush(self) -> dict:
        with self.lock:
            self._write(None)
            return dict(self.latest)


class CancelWatcher:
    """Sets ``event`` as soon as the job is cancelled: a pub/sub message normally, a
    status poll every ``poll_s`` if a message was missed (e.g. published before we
    subscribed)."""

    def __init__(self, store: JobStore, job_id: str, poll_s: float = 1.0):
        self.store, self.job_id, self.poll_s = store, job_id, poll_s
        self.event = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cancel-{job_id}", daemon=True)

    def start(self) -> "CancelWatcher":
        self._thread.start()
        return self

    def _run(self) -> None:
        pubsub = None
        last_poll = 0.0
        while not self._stop.is_set() and not self.event.is_set():
            try:
                if pubsub is None:
                    pubsub = self.store.subscribe_cancels()
                msg = pubsub.get_message(timeout=min(0.5, self.poll_s))
                if msg and msg.get("data") == self.job_id:
                    self.event.set()
                    break
                if time.monotonic() - last_poll >= self.poll_s:
                    last_poll = time.monotonic()
                    if self.store.is_cancel_requested(self.job_id):
                        self.event.set()
            except Exception as e:  # Redis blip: reconnect, keep polling
                log.warning("job %s: cancel watcher: %s", self.job_id, e)
                pubsub = None
                self._stop.wait(1.0)
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _WarningsToEvents(logging.Handler):
    """Engine warnings logged while a job runs become ``warning`` events of that job."""

    def __init__(self, store: JobStore, job_id: str):
        super().__init__(logging.WARNING)
        self.store, self.job_id, self.count = store, job_id, 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_SERVICE_LOGGERS) or self.count >= MAX_WARNING_EVENTS:
            return
        self.count += 1
        try:
            self.store.add_event(self.job_id, "warning", record.getMessage()[:2000])
        except Exception:
            pass


class JobRunner:
    def __init__(self, store: JobStore, settings, worker_name: str, device: str | None = None,
                 run_merge=None, enqueue=None):
        self.store = store
        self.settings = settings
        self.worker_name = worker_name
        self.device = device or settings.worker_device
        self._run_merge = run_merge  # injectable engine entry point; default drmerge.pipeline.run_merge
        self.enqueue = enqueue  # (job_id, queue) -> None: publish a merge message (hand-backs); None: the reaper does
        self.current_job: str | None = None
        self.current_attempt: int | None = None
        self.shutting_down = threading.Event()  # set by the worker's SIGTERM hook
        self._lost = threading.Event()  # the current attempt no longer owns its job

    def heartbeat_job(self) -> None:
        """Stamp the running job's heartbeat (called by the worker's heartbeat thread)."""
        job_id, attempt = self.current_job, self.current_attempt
        if job_id is None or attempt is None:
            return
        if not self.store.job_heartbeat(job_id, attempt) and self.current_job == job_id:
            if not self._lost.is_set():
                log.warning("job %s: attempt %s no longer owns the job (re-queued or taken over); stopping it",
                            job_id, attempt)
            self._lost.set()

    # --- claiming ----------------------------------------------------------------------
    def claim(self, job_id: str) -> int | None:
        """Make this worker the owner of the job; returns the attempt number, or None
        if the job must not run here."""
        for _ in range(5):
            job = self.store.get(job_id)
            if job is None:
                log.warning("job %s does not exist; dropping its message", job_id)
                return None
            if job.terminal:
                if job.cleanup == "pending":
                    self._discard_output(job)
                log.info("job %s is already %s; nothing to do", job_id, job.status)
                return None
            if job.status == JobStatus.CANCELLING:  # cancelled while its previous worker was lost
                self._finish(job_id, JobStatus.CANCELLED, attempt=None, from_={JobStatus.CANCELLING},
                             message="cancelled; its worker was lost before it stopped")
                return None
            message = f"running on {self.worker_name}"
            if job.status == JobStatus.RUNNING:
                owner = job.worker
                live = self.store.workers.live(self.settings.worker_heartbeat_ttl_s)
                if owner and owner != self.worker_name and owner in live:
                    log.warning("job %s is running on live worker %s; dropping duplicate delivery", job_id, owner)
                    return None
                if job.lost >= self.settings.job_max_attempts:
                    if self._finish(job_id, JobStatus.FAILED, attempt=job.attempts, from_={JobStatus.RUNNING},
                                    error=lost_workers_error(job.lost, self.settings.job_max_attempts,
                                                             f"worker {owner or '?'} was lost"),
                                    message="too many lost workers", cleanup=[]):
                        self._discard_output(self.store.require(job_id))
                    return None
                message = f"worker {owner} was lost; restarting on {self.worker_name} (attempt {job.attempts + 1})"
            elif job.attempts:
                message = f"running on {self.worker_name} (attempt {job.attempts + 1}, resuming)"
            now = time.time()
            fields = {"attempts": job.attempts + 1, "worker": self.worker_name, "progress": empty_progress()}
            if job.started_at is None:
                fields["started_at"] = now
            try:
                self.store.transition(job_id, JobStatus.RUNNING, from_={job.status}, attempt=job.attempts,
                                      fields=fields, message=message, now=now)
                return job.attempts + 1
            except (IllegalTransition, StaleAttempt):
                continue  # cancelled or claimed meanwhile: look again
        return None

    # --- running ----------------------------------------------------------------------
    def run(self, job_id: str) -> str | None:
        """Run one job to a terminal state; returns that state (None if not run here)."""
        attempt = self.claim(job_id)
        if attempt is None:
            return None
        self._lost.clear()
        self.current_job, self.current_attempt = job_id, attempt
        try:
            self.heartbeat_job()
        except Exception as e:
            log.warning("job %s: first heartbeat failed: %s", job_id, e)
        try:
            return self._run_claimed(job_id, attempt)
        finally:
            self.current_job = self.current_attempt = None

    def _run_claimed(self, job_id: str, attempt: int) -> str | None:
        from drmerge.errors import Interrupted, MergeError
        from drmerge.spec import parse_spec

        job = self.store.require(job_id)
        reporter = ProgressReporter(self.store, job_id, attempt, self.settings.progress_interval_s)
        watcher = CancelWatcher(self.store, job_id).start()
        limit = self.settings.job_time_limit_s
        deadline = time.monotonic() + limit
        timed_out = threading.Event()

        def should_cancel() -> bool:
            if watcher.event.is_set():
                return True
            if time.monotonic() > deadline:
                timed_out.set()
                return True
            return False

        watchdog = threading.Timer(limit + WATCHDOG_GRACE_S, self._watchdog, args=(job_id, attempt, limit))
        watchdog.daemon = True
        watchdog.start()
        handler = _WarningsToEvents(self.store, job_id)
        engine_log = logging.getLogger("drmerge")
        engine_log.addHandler(handler)
        completed = None
        if attempt > 1:  # an earlier attempt may have committed shards: resume from them
            completed = list(job.shards)
            self.store.add_event(job_id, "resume", f"attempt {attempt}: {len(completed)} shard(s) recorded by "
                                 "earlier attempts will be verified and kept", shards=len(completed))

        def on_shard(entry: dict) -> None:
            try:
                self._with_redis_retries(lambda: self.store.record_shard(job_id, attempt, entry), budget_s=30.0)
            except Exception as e:  # the journal is an optimisation: a lost entry means a redone shard
                log.warning("job %s: cannot record shard %s: %s", job_id, entry.get("name"), e)

        def should_pause() -> bool:
            return self.shutting_down.is_set() or self._lost.is_set()

        def owns_output() -> bool:
            """Asked before a failed attempt deletes its output. Stamping the heartbeat
            both checks ownership and keeps the reaper away while the deletion runs."""
            if self.store.job_heartbeat(job_id, attempt):
                return True
            self._lost.set()
            return False

        try:
            spec = parse_spec(job.spec)
            run_merge = self._run_merge
            if run_merge is None:
                from drmerge.pipeline import run_merge
            result = run_merge(spec, device=self.device, progress=reporter, should_cancel=should_cancel,
                               s3_options=self.settings.s3_options(), completed_shards=completed,
                               on_shard=on_shard, should_pause=should_pause, owns_output=owns_output)
        except Interrupted as e:
            return self._hand_back(job_id, attempt, reporter.flush(), e)
        except MergeError as e:
            progress = reporter.flush()
            # The engine could not remove all of its partial output: the job keeps the
            # merge's own error and gets a cleanup that is retried until the prefix is clean.
            left = list(e.cleanup_pending) or None
            removed = ("its partial output could not all be removed yet (storage unavailable?); removal is retried"
                       if left else "its partial output was removed")
            if e.code == "cancelled" and timed_out.is_set() and not watcher.event.is_set():
                return self._finish(job_id, JobStatus.FAILED, attempt, from_=OWNED, progress=progress,
                                    error={"code": "timeout", "param": None,
                                           "message": f"the merge ran longer than the {limit}s limit and was stopped; "
                                                      f"{removed}"},
                                    message="time limit exceeded", cleanup=left)
            if e.code == "cancelled":
                return self._finish(job_id, JobStatus.CANCELLED, attempt, from_={JobStatus.CANCELLING},
                                    progress=progress, cleanup=left,
                                    message=f"cancelled; {removed if left else 'partial output removed'}")
            return self._finish(job_id, JobStatus.FAILED, attempt, from_=OWNED, progress=progress,
                                error=e.to_dict(), message=f"failed: {e.code}" + (f"; {removed}" if left else ""),
                                cleanup=left)
        except Exception as e:  # a bug; the engine normally wraps these itself
            log.exception("job %s: unexpected error", job_id)
            return self._finish(job_id, JobStatus.FAILED, attempt, from_=OWNED,
                                progress=reporter.flush(),
                                error={"code": "internal_error", "param": None,
                                       "message": f"unexpected {type(e).__name__}: {e}"[:2000]},
                                message="failed: internal_error")
        finally:
            watchdog.cancel()
            watcher.stop()
            engine_log.removeHandler(handler)
        progress = dict(reporter.flush(), stage="done", fraction=1.0, eta_seconds=0.0)
        res = result.to_dict()
        # Engine warnings already became events through the log handler above.
        message = "succeeded"
        if res.get("resumed"):
            r = res["resumed"]
            message = (f"succeeded (resumed: {r['shards_kept']} shard(s) verified and kept, "
                       f"{r['tensors_skipped']} tensor(s) not merged again)")
        return self._finish(job_id, JobStatus.SUCCEEDED, attempt, from_=OWNED, progress=progress,
                            result=res, message=message)

    def _hand_back(self, job_id: str, attempt: int, progress: dict, stop) -> str | None:
        """The engine stopped on a pause request and kept its committed shards."""
        if self._lost.is_set():
            log.warning("job %s: attempt %s stopped; the job belongs to a newer attempt now", job_id, attempt)
            return None
        job = self.store.get(job_id)
        if job is not None and job.status == JobStatus.CANCELLING:  # cancelled meanwhile: finish that instead
            self._discard_output(job)
            return self._finish(job_id, JobStatus.CANCELLED, attempt, from_={JobStatus.CANCELLING}, progress=progress,
                                message="cancelled; partial output removed")
        handoffs = (job.handoffs if job else 0) + 1
        try:
            self._with_redis_retries(lambda: self.store.transition(
                job_id, JobStatus.QUEUED, from_={JobStatus.RUNNING}, attempt=attempt,
                fields={"worker": "", "enqueued_at": "", "handoffs": handoffs, "progress": progress},
                message=f"worker {self.worker_name} is shutting down: job handed back to the queue; "
                        f"{getattr(stop, 'kept', 0)} committed shard(s) kept for the next attempt"))
        except (StaleAttempt, IllegalTransition) as e:
            log.warning("job %s: cannot hand it back: %s", job_id, e)
            return None
        self._send(job_id, job.queue if job else None)
        log.info("job %s handed back to the queue", job_id)
        return JobStatus.QUEUED

    def _send(self, job_id: str, queue: str | None) -> None:
        """Publish a merge message for a queued job to its own queue (the reaper does it
        if this fails)."""
        if self.enqueue is None:
            return
        try:
            send_once(self.store, self.enqueue, job_id, queue or self.settings.queue)
        except Exception as e:
            log.warning("job %s: cannot queue it again (the reaper will): %s", job_id, e)

    def _discard_output(self, job) -> bool:
        """Remove the partial output of a job that ended without its worker, or whose own
        cleanup failed: its journalled shards, the objects its run could not remove
        (``cleanup_files``), its index and its unfinished uploads. Once that succeeds the
        cleanup is over (and the job's output reservation released); if the storage fails
        again the job stays ``cleanup: pending`` and the reaper retries it later."""
        from drmerge.spec import parse_spec

        entries = list(job.shards) + [{"name": n} for n in job.cleanup_files]
        try:
            from drmerge.pipeline import discard_partial_output

            removed = discard_partial_output(parse_spec(job.spec), entries, self.settings.s3_options())
        except Exception as e:
            log.warning("job %s: cannot remove its partial output yet: %s", job.id, e)
            try:
                self.store.schedule_cleanup(job.id, job.cleanup_files,
                                            due=time.time() + self.settings.cleanup_backoff_base_s)
                self.store.add_event(job.id, "cleanup", f"could not remove the partial output yet ({e}); "
                                     "it is retried later"[:2000], outcome="retry")
            except Exception as e2:
                log.warning("job %s: cannot record the cleanup retry: %s", job.id, e2)
            return False
        try:
            self.store.end_cleanup(job.id, "done", f"removed partial output: {', '.join(removed)[:1500]}" if removed
                                   else "no partial output left to remove")
        except Exception as e:
            log.warning("job %s: cannot record the end of its cleanup: %s", job.id, e)
        return True

    def _finish(self, job_id: str, status: str, attempt: int | None, *, from_: set[str], message: str,
                progress: dict | None = None, result: dict | None = None, error: dict | None = None,
                cleanup: list[str] | None = None) -> str | None:
        """Record how the job ended. ``cleanup`` (a list, even empty) marks its output for a
        later cleanup, listing objects that may remain besides its journalled shards."""
        fields: dict = {}
        if progress is not None:
            fields["progress"] = progress
        if result is not None:
            fields["result"] = result
        if error is not None:
            fields["error"] = error
        due = None
        if cleanup is not None:
            fields["cleanup"] = "pending"
            fields["cleanup_files"] = list(cleanup)
            due = time.time() + self.settings.cleanup_backoff_base_s
        try:
            self._with_redis_retries(lambda: self.store.transition(job_id, status, from_=from_, attempt=attempt,
                                                                   fields=fields, message=message, cleanup_due=due))
        except StaleAttempt:
            log.warning("job %s: attempt %s was superseded; not recording %s", job_id, attempt, status)
            return None
        except IllegalTransition as e:
            log.warning("job %s: cannot record %s: %s", job_id, status, e)
            return None
        log.info("job %s %s", job_id, status)
        return status

    @staticmethod
    def _with_redis_retries(fn, budget_s: float = 120.0):
        """The outcome of a merge that took hours must not be lost to a Redis blip (a
        failover, a restart): retry the write with backoff for a couple of minutes."""
        import redis

        deadline = time.monotonic() + budget_s
        delay = 0.5
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("Redis unavailable (%s); retrying in %.1fs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def _watchdog(self, job_id: str, attempt: int, limit: int) -> None:
        """The engine is stuck inside one tensor far past the time limit: record the
        timeout and end the process (the supervisor restarts the worker)."""
        log.critical("job %s is stuck %ss past its %ss limit; exiting the worker", job_id, WATCHDOG_GRACE_S, limit)
        try:
            self._finish(job_id, JobStatus.FAILED, attempt, from_=OWNED, message="watchdog: stuck",
                         error={"code": "timeout", "param": None,
                                "message": f"the merge exceeded the {limit}s time limit and did not stop; "
                                           "its worker was restarted (partial output may remain)"})
        finally:
            os._exit(70)

"""The Celery task's state is the job's outcome, as Flower and `celery events` see it: a
real worker process, the Celery events it sends on the real broker, and the broker's own
bookkeeping of unacknowledged messages (a failed merge is acked, never redelivered)."""

from __future__ import annotations

import threading
import time

import pytest

from service.jobs.queue import make_celery


class TaskEvents:
    """Every Celery event on the broker, collected by a background receiver."""

    def __init__(self, settings):
        self.app = make_celery(settings)
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.receiver = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the event receiver did not start"

    def _run(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, task_id: str) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e.get("uuid") == task_id]

    def wait_for(self, task_id: str, type_: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.of(task_id) if e["type"] == type_]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {type_} event for {task_id}; got {[e['type'] for e in self.of(task_id)]}")

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)


@pytest.fixture
def task_events(service_stack):
    events = TaskEvents(service_stack.settings)
    time.sleep(0.3)  # the subscription is live before anything is sent (pub/sub keeps nothing)
    yield events
    events.close()


def _unacked(service_stack, job_id: str) -> bool:
    """Whether the broker still holds the job's message as delivered but unacknowledged
    (kombu's Redis transport keeps those in the ``unacked`` hash until acked)."""
    import redis

    r = redis.Redis.from_url(service_stack.settings.redis_url)
    try:
        return any(job_id.encode() in v for v in r.hvals("unacked"))
    finally:
        r.close()


def test_a_failed_merge_is_a_failed_task_and_is_acked(service_stack, family, s3_bucket, task_events):
    spec = family.spec("merged/celery-fail/")
    spec["models"][0] = {"model": f"s3://{s3_bucket}/missing/"}
    job = service_stack.submit(spec)
    done = service_stack.wait(job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "input_not_found"
    failed = task_events.wait_for(job["id"], "task-failed")
    assert "JobFailed" in failed["exception"] and "input_not_found" in failed["exception"]
    assert not [e for e in task_events.of(job["id"]) if e["type"] == "task-succeeded"]
    # Acked: the broker holds no copy to redeliver, and no worker took it a second time.
    deadline = time.monotonic() + 10
    while _unacked(service_stack, job["id"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _unacked(service_stack, job["id"])
    time.sleep(1.0)
    assert service_stack.job(job["id"])["attempts"] == 1
    assert len([e for e in task_events.of(job["id"]) if e["type"] == "task-received"]) == 1


def test_a_succeeded_merge_is_a_successful_task(service_stack, family, task_events):
    job = service_stack.submit(family.spec("merged/celery-ok/"))
    assert service_stack.wait(job["id"])["status"] == "succeeded"
    ok = task_events.wait_for(job["id"], "task-succeeded")
    assert "succeeded" in ok.get("result", "")
    assert not [e for e in task_events.of(job["id"]) if e["type"] == "task-failed"]


def test_a_cancelled_merge_is_not_a_successful_task(service_stack, slow_family, task_events):
    job = service_stack.submit(slow_family.spec("merged/celery-cancel/"))
    service_stack.wait_for(job["id"], lambda j: j["status"] == "running")
    assert service_stack.http.post(f"/v1/merges/{job['id']}/cancel").status_code in (200, 202)
    assert service_stack.wait(job["id"])["status"] == "cancelled"
    failed = task_events.wait_for(job["id"], "task-failed")
    assert "JobCancelled" in failed["exception"]

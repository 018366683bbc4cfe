"""drmerge_client against the real service (uvicorn, Redis, a worker, S3): typed jobs,
auto-pagination, wait with a progress callback, the live stream, download links, and
its retries: a lost answer to a create is retried with the same Idempotency-Key (one
job, not two), 429 waits for Retry-After, a connection that never opens is retried, a
call that is not safe to repeat is not."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from drmerge_client import ApiError, Client, Event, Job, JobStatus, Progress, ProgressUpdate
from tests.support.servers import DroppingProxy, free_port
from tests.e2e.test_service_api import spec


def _client(stack, key=None, **kw) -> Client:
    return Client(stack.api_url, api_key=key or stack.api_key, **kw)


def _fresh_tenant(stack) -> str:
    return stack.new_key(f"c-{uuid.uuid4().hex[:10]}")


def test_create_wait_stream_and_download(service_stack, slow_family):
    updates: list[Job] = []
    events: list[Event] = []
    with _client(service_stack) as c:
        job = c.create(slow_family.spec("merged/client/"), metadata={"via": "client"})
        assert isinstance(job, Job) and job.status is JobStatus.QUEUED and job.metadata == {"via": "client"}
        assert job.created_at.tzinfo is not None and not job.terminal
        done = c.wait(job.id, poll_s=0.1, on_progress=updates.append, on_event=events.append)
        assert done.status is JobStatus.SUCCEEDED and done.terminal and done.result.files
        assert done.progress.fraction == 1.0 and done.progress.eta_seconds is None
        fractions = [u.progress.fraction for u in updates]
        assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)
        assert [e.id for e in events] == sorted({e.id for e in events})  # each event once, in order
        assert [e.data["to"] for e in events if e.type == "status"][-1] == "succeeded"
        # The same job live (it has ended: the whole log, then the final job).
        items = list(c.stream(job.id))
        assert isinstance(items[-1], Job) and items[-1].status is JobStatus.SUCCEEDED
        assert [i.id for i in items if isinstance(i, Event)] == [e.id for e in c.events(job.id)]
        assert any(isinstance(i, ProgressUpdate) and isinstance(i.progress, Progress) for i in items)
        resumed = list(c.stream(job.id, last_event_id=events[-2].id))
        assert [i.id for i in resumed if isinstance(i, Event)] == [events[-1].id]
        for link in c.download_links(job.id):
            body = httpx.get(link.url, timeout=30).content
            assert hashlib.sha256(body).hexdigest() == link.sha256
            assert link.expires_at > datetime.now(timezone.utc)


def test_list_walks_every_page_with_filters(idle_stack):
    with _client(idle_stack, _fresh_tenant(idle_stack)) as c:
        made = [c.create(spec(), metadata={"batch": "b1" if i % 2 else "b0"}) for i in range(5)]
        assert [j.id for j in c.list(page_size=2)] == [j.id for j in reversed(made)]
        odd = [j.id for j in reversed(made) if j.metadata["batch"] == "b1"]
        assert [j.id for j in c.list(metadata={"batch": "b1"}, page_size=1)] == odd
        assert [j.id for j in c.list(page_size=2, limit=3)] == [j.id for j in reversed(made)][:3]
        assert [j.id for j in c.list(created_after=made[3].created_at)] == [made[4].id, made[3].id]
        cancelled = c.cancel(made[0].id)
        assert cancelled.status is JobStatus.CANCELLED
        assert [j.id for j in c.list(status=JobStatus.CANCELLED)] == [made[0].id]
        with pytest.raises(ApiError) as e:
            c.get("mrg_01aaaaaaaaaaaaaaaaaaaaaaaa")
        assert e.value.status == 404 and e.value.code == "not_found"


def test_a_create_whose_answer_was_lost_is_retried_with_the_same_key(idle_stack):
    key = _fresh_tenant(idle_stack)
    with DroppingProxy(idle_stack.api_url) as proxy, Client(proxy.url, api_key=key, sleep=lambda s: None) as c:
        proxy.arm(1, after_bytes=0, request_prefix=b"POST ")  # the first answer never arrives
        job = c.create(spec(), idempotency_key="retry-me-1")
        assert proxy.cuts_made == 1
        jobs = list(c.list())
        assert [j.id for j in jobs] == [job.id]  # the retry found the job the first try made


def test_each_create_gets_its_own_idempotency_key(idle_stack):
    with _client(idle_stack, _fresh_tenant(idle_stack)) as c:
        body = spec()
        a = c.create(body, idempotency_key="mine-1")
        assert c.create(body, idempotency_key="mine-1").id == a.id  # your key: a replay, the same job
        with pytest.raises(ApiError) as e:
            c.create(body)  # a fresh key: a second job, refused only because the first one writes there
        assert e.value.code == "output_busy"


def test_429_waits_for_retry_after_then_gives_up(strict_stack):
    key = _fresh_tenant(strict_stack)
    slept: list[float] = []
    with Client(strict_stack.api_url, api_key=key, retries=2, max_retry_after_s=0.25, sleep=slept.append) as c:
        for _ in range(3):  # STRICT_LIMITS: 3 queued jobs per tenant
            c.create(spec())
        with pytest.raises(ApiError) as e:
            c.create(spec())
    assert e.value.status == 429 and e.value.code == "quota_exceeded"
    assert slept == [0.25, 0.25]  # Retry-After (30 s) honoured, cut to the client's cap


def test_connection_failures_are_retried_with_backoff(tmp_path):
    slept: list[float] = []
    with Client(f"http://127.0.0.1:{free_port()}", api_key="x", retries=3, backoff_s=0.1, sleep=slept.append) as c:
        with pytest.raises(ApiError) as e:
            c.get("mrg_01aaaaaaaaaaaaaaaaaaaaaaaa")
    assert e.value.code == "unreachable" and e.value.status is None
    assert len(slept) == 3 and all(0 <= s <= 8 for s in slept)


def test_a_call_not_safe_to_repeat_is_not_retried_once_sent(idle_stack):
    with DroppingProxy(idle_stack.api_url) as proxy, \
            Client(proxy.url, api_key=idle_stack.api_key, sleep=lambda s: None) as c:
        proxy.arm(1, after_bytes=0, request_prefix=b"POST ")
        with pytest.raises(ApiError) as e:
            c._request("POST", "/v1/merges", idempotent=False, json={"spec": spec()})
        assert e.value.code == "unreachable" and proxy.cuts_made == 1
    # it did reach the server: retrying it would have made a second job


def test_bad_urls_and_non_api_answers(tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    with pytest.raises(ApiError) as e:
        Client("ftp://example", api_key="x")
    assert e.value.code == "invalid_request"
    (tmp_path / "readyz").write_text("<html>some other server</html>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{server.server_port}", api_key="x", retries=0) as c:
            with pytest.raises(ApiError) as e:
                c.readyz()
    finally:
        server.shutdown()
    assert e.value.code == "invalid_response" and "drmerge API" in e.value.detail

"""Webhook delivery with retries, against a real HTTP receiver on loopback and a real
Redis (signing, URL rules and backoff alone: tests/unit/test_webhooks.py)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.settings import Settings
from service.webhooks import WebhookDeliverer, verify


class Receiver:
    """A loopback HTTP server that answers with the next scripted status code (then 200)
    and records every request."""

    def __init__(self):
        self.codes: list[int] = []
        self.requests: list[tuple[dict, bytes]] = []
        self.redirect_to: str | None = None  # sent as Location with every answer
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                if outer.redirect_to:
                    self.send_header("location", outer.redirect_to)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def settings(**kw) -> Settings:
    # The receiver is a loopback http server: the operator setting that allows it is on.
    base = dict(webhook_backoff_base_s=0.05, webhook_backoff_max_s=0.2, webhook_max_attempts=3, webhook_timeout_s=5,
                webhook_poll_s=0.05, webhook_allow_http_loopback=True)
    base.update(kw)
    return Settings(**base)


def finished_job(store, url: str, secret: str | None = "whsec_" + "dGVzdC1zZWNyZXQtYnl0ZXM="):
    webhook = {"url": url, **({"secret": secret} if secret else {})}
    job, _ = store.create({"method": "drm"}, f"s3://bkt/{uuid.uuid4().hex}/", webhook=webhook,
                          metadata={"run": "7"})
    store.transition(job.id, "running", attempt=0, fields={"attempts": 1, "started_at": time.time()})
    store.transition(job.id, "succeeded", fields={"result": {"output": "s3://bkt/o/", "files": []}})
    return job.id, secret


def deliver_until_settled(deliverer, store, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliverer.deliver_due()
        state = store.require(job_id).webhook_state or {}
        if state.get("status") in ("delivered", "failed"):
            return state
        time.sleep(0.02)
    raise AssertionError(f"webhook for {job_id} did not settle: {store.require(job_id).webhook_state}")


def test_delivered_once_with_a_valid_signature(store, receiver):
    job_id, secret = finished_job(store, receiver.url)
    d = WebhookDeliverer(store, settings())
    state = deliver_until_settled(d, store, job_id)
    assert state["status"] == "delivered" and state["attempts"] == 1
    (headers, body), = receiver.requests
    assert verify(secret, headers, body)
    assert headers["webhook-id"] == f"msg_{job_id}" and headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["type"] == "merge.succeeded"
    assert payload["data"]["id"] == job_id and payload["data"]["status"] == "succeeded"
    assert payload["data"]["metadata"] == {"run": "7"}
    assert secret not in body.decode() and "secret" not in payload["data"]["webhook"]
    assert d.deliver_due() == 0  # nothing left
    assert any(e["type"] == "webhook" for e in store.events(job_id))
    d.stop()


def test_retried_with_backoff_until_the_receiver_recovers(store, receiver):
    receiver.codes = [500, 503]
    job_id, secret = finished_job(store, receiver.url)
    d = WebhookDeliverer(store, settings())
    state = deliver_until_settled(d, store, job_id)
    assert state["status"] == "delivered" and state["attempts"] == 3
    assert len(receiver.requests) == 3
    ids = {h["webhook-id"] for h, _ in receiver.requests}
    assert ids == {f"msg_{job_id}"}  # the same id on every retry: receivers dedupe on it
    assert all(verify(secret, h, b) for h, b in receiver.requests)
    warnings = [e["message"] for e in store.events(job_id) if e["type"] == "warning"]
    assert len(warnings) == 2 and "HTTP 500" in warnings[0]
    d.stop()


def test_gives_up_after_max_attempts(store, receiver):
    receiver.codes = [500] * 10
    job_id, _ = finished_job(store, receiver.url)
    d = WebhookDeliverer(store, settings(webhook_max_attempts=2))
    state = deliver_until_settled(d, store, job_id)
    assert state["status"] == "failed" and state["attempts"] == 2 and "HTTP 500" in state["last_error"]
    assert len(receiver.requests) == 2
    d.stop()


def test_410_gone_stops_retries(store, receiver):
    receiver.codes = [410]
    job_id, _ = finished_job(store, receiver.url)
    d = WebhookDeliverer(store, settings())
    state = deliver_until_settled(d, store, job_id)
    assert state["status"] == "failed" and state["attempts"] == 1
    d.stop()


def test_unreachable_receiver_is_retried(store, receiver):
    url = receiver.url
    receiver.close()  # nothing listens there any more
    job_id, _ = finished_job(store, url)
    d = WebhookDeliverer(store, settings(webhook_max_attempts=2, webhook_timeout_s=1))
    state = deliver_until_settled(d, store, job_id)
    assert state["status"] == "failed" and state["attempts"] == 2 and "Connect" in state["last_error"]
    d.stop()


def test_service_secret_is_used_when_the_job_has_none(store, receiver):
    job_id, _ = finished_job(store, receiver.url, secret=None)
    d = WebhookDeliverer(store, settings(webhook_secret="service-wide-secret"))
    deliver_until_settled(d, store, job_id)
    (headers, body), = receiver.requests
    assert verify("service-wide-secret", headers, body)
    d.stop()


def test_background_loop_delivers(store, receiver):
    job_id, secret = finished_job(store, receiver.url)
    d = WebhookDeliverer(store, settings()).start()
    try:
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(receiver.requests) == 1
    finally:
        d.stop()

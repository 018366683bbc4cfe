"""Webhook SSRF guard at delivery time: the deliverer connects to the address that was
checked, and checks again (the address rules themselves: tests/unit/test_netguard.py).

These tests use real HTTP(S) receivers on loopback and a real Redis. There is no DNS
here, so a test that needs a host name to resolve gives the resolver its answers; that
is also how DNS rebinding (a different answer at delivery than at submit) is staged.
"""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from service.settings import Settings
from service.webhooks import WebhookDeliverer, check_url, verify
from tests.integration.test_webhooks import Receiver, deliver_until_settled, finished_job
from tests.integration.test_webhooks import settings as webhook_settings
from tests.unit.test_netguard import PUBLIC, answer


# ------------------------------------------------------------------- at delivery time


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_dns_rebinding_is_caught_at_delivery(store, receiver):
    """The host resolved to a public address when the job was submitted and to
    loopback when its webhook is due: nothing is sent."""
    port = receiver.server.server_port
    url = f"https://hooks.rebind.test:{port}/hook"
    assert check_url(url, Settings(), answer(PUBLIC)) is None  # what submit saw
    job_id, _ = finished_job(store, url)
    rebinding = answer("127.0.0.1")
    d = WebhookDeliverer(store, webhook_settings(webhook_allow_http_loopback=False), resolver=rebinding)
    state = deliver_until_settled(d, store, job_id)
    d.stop()
    assert rebinding.calls == [("hooks.rebind.test", port)]  # resolved again at delivery
    assert state["status"] == "failed" and state["attempts"] == 1 and "loopback" in state["last_error"]
    assert receiver.requests == []
    assert any("gave up" in e["message"] and "loopback" in e["message"] for e in store.events(job_id))


def test_delivery_connects_to_the_checked_address(store, receiver):
    """`hooks.pinned.test` resolves nowhere but in our resolver, so the POST can only
    arrive if it went to the address the check returned; the Host header keeps the name."""
    port = receiver.server.server_port
    job_id, secret = finished_job(store, f"http://hooks.pinned.test:{port}/hook")
    d = WebhookDeliverer(store, webhook_settings(), resolver=answer("127.0.0.1"))
    state = deliver_until_settled(d, store, job_id)
    d.stop()
    assert state["status"] == "delivered", state
    (headers, body), = receiver.requests
    assert headers["host"] == f"hooks.pinned.test:{port}" and verify(secret, headers, body)


def test_redirects_are_not_followed(store, receiver):
    target = Receiver()
    try:
        receiver.redirect_to = target.url
        receiver.codes = [302] * 5
        job_id, _ = finished_job(store, receiver.url)
        d = WebhookDeliverer(store, webhook_settings(webhook_max_attempts=2))
        state = deliver_until_settled(d, store, job_id)
        d.stop()
        assert state["status"] == "failed" and "HTTP 302" in state["last_error"]
        assert len(receiver.requests) == 2 and target.requests == []
    finally:
        target.close()


def _self_signed(tmp_path, hostname: str):
    """A self-signed certificate for ``hostname`` (openssl CLI; no extra Python package)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / f"{hostname}.crt", tmp_path / f"{hostname}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={hostname}",
                    "-addext", f"subjectAltName=DNS:{hostname}"], check=True, capture_output=True, timeout=30)
    return str(cert), str(key)


class TLSReceiver:
    def __init__(self, cert: str, key: str):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("cert_for, delivered", [("hooks.tls.test", True), ("someone-else.test", False)])
def test_https_to_a_pinned_address_still_verifies_the_certificate_for_the_name(store, tmp_path, cert_for,
                                                                               delivered):
    """Connecting to the checked IP must not weaken TLS: the certificate is verified
    against the URL's host name (sent as SNI), so a certificate for another name fails."""
    cert, key = _self_signed(tmp_path, cert_for)
    tls = TLSReceiver(cert, key)
    try:
        s = webhook_settings(webhook_allow_http_loopback=False, webhook_allowed_networks="127.0.0.1/32",
                             webhook_max_attempts=1)
        client = httpx.Client(verify=ssl.create_default_context(cafile=cert), follow_redirects=False,
                              trust_env=False, timeout=5)
        job_id, _ = finished_job(store, f"https://hooks.tls.test:{tls.port}/hook")
        d = WebhookDeliverer(store, s, client=client, resolver=answer("127.0.0.1"))
        state = deliver_until_settled(d, store, job_id)
        d.stop()
        if delivered:
            assert state["status"] == "delivered", state
            assert tls.requests[0][0]["host"] == f"hooks.tls.test:{tls.port}"
        else:
            assert state["status"] == "failed" and "certificate" in state["last_error"].lower(), state
            assert tls.requests == []
    finally:
        tls.close()


def test_metadata_address_at_delivery_is_refused_even_inside_allowed_networks(store, receiver):
    job_id, _ = finished_job(store, "https://hooks.meta.test/hook")
    s = webhook_settings(webhook_allowed_networks="169.254.0.0/16")
    d = WebhookDeliverer(store, s, resolver=answer("169.254.169.254"))
    started = time.monotonic()
    state = deliver_until_settled(d, store, job_id)
    d.stop()
    assert state["status"] == "failed" and "metadata" in state["last_error"]
    assert time.monotonic() - started < 5  # refused, not attempted and timed out

"""Webhook SSRF guard (service.netguard): which addresses a webhook may reach, checked
at submit and again at delivery, connecting to the address that was checked.

Delivery tests use real HTTP(S) receivers on loopback and a real Redis. There is no DNS
here, so a test that needs a host name to resolve gives the resolver its answers; that
is also how DNS rebinding (a different answer at delivery than at submit) is staged.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from service.netguard import Policy, WebhookURLError, check_webhook_url, embedded_ipv4
from service.settings import Settings
from service.webhooks import WebhookDeliverer, check_url, verify
from tests.integration.test_webhooks import Receiver, deliver_until_settled, finished_job
from tests.integration.test_webhooks import settings as webhook_settings

PUBLIC = "93.184.215.14"


def answer(*addresses):
    calls = []

    def resolver(host, port):
        calls.append((host, port))
        return list(addresses)

    resolver.calls = calls
    return resolver


STRICT = Policy()
LOOPBACK_OK = Policy(allow_http_loopback=True)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "fe80::1",
    "fc00::1", "fd12:3456::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "100.64.0.1",
    "192.0.2.1", "198.18.0.1", "240.0.0.1",
    # cloud metadata services
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192",
    # IPv4 dressed as IPv6: mapped, IPv4-compatible, 6to4, NAT64
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::7f00:1", "2002:7f00:1::1", "64:ff9b::a00:1",
    "64:ff9b::a9fe:a9fe",
    # IPv4-translated (::ffff:0:a.b.c.d) and other ::/8 forms ipaddress calls global
    "::ffff:0:7f00:1", "::ffff:0:a9fe:a9fe", "::1:a9fe:a9fe", "0:0:1::a00:1", "::2:7f00:1",
    # outside 2000::/3, or special-purpose inside it
    "4000::1", "5f00::1", "2001:2::1", "2001:10::1", "2001:20::1", "2001:db8::1", "3fff::1", "100::1",
])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(WebhookURLError, match="does not call"):
        check_webhook_url("https://hooks.example.com/h", STRICT, answer(address))


def test_public_ipv6_addresses_are_accepted():
    for address in ("2606:4700:4700::1111", "2a00:1450:4001:81c::200e", "2001:4860:4860::8888"):
        assert check_webhook_url("https://hooks.example.com/h", STRICT, answer(address)).address == address


def test_public_addresses_are_accepted_and_pinned():
    resolver = answer(PUBLIC)
    target = check_webhook_url("https://Hooks.Example.com/h?x=1#frag", STRICT, resolver)
    assert resolver.calls == [("hooks.example.com", 443)]
    assert target.url == f"https://{PUBLIC}:443/h?x=1" and target.address == PUBLIC
    assert target.hostname == "hooks.example.com" and target.host_header == "hooks.example.com"
    v6 = check_webhook_url("https://hooks.example.com:8443/", STRICT, answer("2606:4700::1111"))
    assert v6.url == "https://[2606:4700::1111]:8443/" and v6.host_header == "hooks.example.com:8443"
    assert embedded_ipv4(ipaddress.ip_address("2002:0808:0808::1")) == ipaddress.ip_address("8.8.8.8")
    assert check_webhook_url("https://hooks.example.com/", STRICT, answer("2002:808:808::1")).address


def test_one_bad_address_among_good_ones_is_enough_to_refuse():
    with pytest.raises(WebhookURLError, match="10.0.0.7"):
        check_webhook_url("https://hooks.example.com/h", STRICT, answer(PUBLIC, "10.0.0.7"))


@pytest.mark.parametrize("url", [
    # the system resolver reads all of these as 127.0.0.1 (or this host)
    "https://localhost/h", "https://127.1/h", "https://2130706433/h", "https://0x7f.0.0.1/h", "https://0177.0.0.1/h",
    "https://[::ffff:127.0.0.1]/h", "https://[::1]/h", "https://0.0.0.0/h", "https://[::]:8443/h",
    "https://169.254.169.254/latest/meta-data/", "https://[fd00:ec2::254]/latest/meta-data/",
])
def test_loopback_and_metadata_in_any_spelling_are_refused(url):
    with pytest.raises(WebhookURLError):
        check_webhook_url(url, STRICT)


@pytest.mark.parametrize("url, why", [
    ("http://hooks.example.com/h", "https://"),
    ("ftp://hooks.example.com/h", "https://"),
    ("file:///etc/passwd", "https://"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "https://"),
    ("https://user:pw@hooks.example.com/h", "credentials"),
    ("https://hooks.example.com:99999/h", "valid URL"),
    ("https://hooks.example.com:0/h", "port 0"),
    ("https://[fe80::1%25eth0]/h", "zone"),
    ("https://hooks.example.com/a b", "spaces"),
    ("https://hooks.example.com/\r\nX-Injected: 1", "control"),
    ("https:///h", "https://"),
    ("https://" + "a" * 3000 + ".example.com/", "at most"),
])
def test_malformed_or_unsafe_urls_are_refused(url, why):
    with pytest.raises(WebhookURLError, match=why):
        check_webhook_url(url, LOOPBACK_OK, answer(PUBLIC))


def test_http_is_only_for_loopback_and_only_when_the_operator_allows_it():
    with pytest.raises(WebhookURLError, match="https"):
        check_webhook_url("http://127.0.0.1:9/h", STRICT)
    assert check_webhook_url("http://127.0.0.1:9/h", LOOPBACK_OK).url == "http://127.0.0.1:9/h"
    assert check_webhook_url("http://localhost:9/h", LOOPBACK_OK).host_header == "localhost:9"
    with pytest.raises(WebhookURLError, match="https"):  # a public host still needs TLS
        check_webhook_url("http://hooks.example.com/h", LOOPBACK_OK, answer(PUBLIC))
    with pytest.raises(WebhookURLError, match="private"):  # the flag opens loopback, nothing else
        check_webhook_url("https://10.0.0.1/h", LOOPBACK_OK)


def test_allowed_networks_open_private_ranges_but_never_metadata():
    policy = Policy.from_settings(Settings(webhook_allowed_networks="10.20.0.0/16, 169.254.0.0/16, fd00::/8"))
    assert check_webhook_url("https://10.20.3.4/h", policy).address == "10.20.3.4"
    with pytest.raises(WebhookURLError):
        check_webhook_url("https://10.21.0.1/h", policy)
    with pytest.raises(WebhookURLError, match="metadata"):
        check_webhook_url("https://169.254.169.254/h", policy)
    with pytest.raises(WebhookURLError, match="metadata"):
        check_webhook_url("https://[fd00:ec2::254]/h", policy)
    with pytest.raises(WebhookURLError, match="https"):  # allowed, but still not over plain http
        check_webhook_url("http://10.20.3.4/h", policy)


def test_unresolvable_hosts_are_refused_at_submit():
    with pytest.raises(WebhookURLError, match="does not resolve") as e:
        check_webhook_url("https://no-such-host.invalid/h", STRICT)
    assert e.value.unresolved
    assert "does not resolve" in check_url("https://no-such-host.invalid/h", Settings())


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

"""Webhook signing (Standard Webhooks), URL rules and the retry backoff (delivery with
retries against a real receiver and a real Redis: tests/integration/test_webhooks.py)."""

from __future__ import annotations

import time

import pytest

from service.settings import Settings
from service.webhooks import backoff_delay, check_url, sign, signing_key, verify


def test_signature_matches_the_standard_webhooks_test_vector():
    # The vector published with the Standard Webhooks reference libraries.
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_rejects_tampering_stale_timestamps_and_wrong_secrets():
    body, now = b'{"a":1}', int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": sign("k" * 10, "msg_1", now, body)}
    assert verify("k" * 10, headers, body)
    assert not verify("k" * 10, headers, body + b" ")
    assert not verify("x" * 10, headers, body)
    assert not verify("k" * 10, dict(headers, **{"webhook-id": "msg_2"}), body)
    assert not verify("k" * 10, headers, body, now=now + 3600)
    assert not verify("k" * 10, {}, body)
    # several signatures (secret rotation): any valid one is enough
    assert verify("k" * 10, dict(headers, **{"webhook-signature": "v1,bad " + headers["webhook-signature"]}), body)
    assert signing_key("plain-string") == b"plain-string"
    with pytest.raises(ValueError):
        signing_key("whsec_not base64!")


def test_url_rules():
    public = lambda host, port: ["93.184.215.14"]  # noqa: E731  (no DNS in tests: answer for it)
    strict, local = Settings(), Settings(webhook_allow_http_loopback=True)
    assert check_url("https://hooks.example.com/x", strict, public) is None
    assert "https" in check_url("ftp://x/y", strict, public)
    assert "https" in check_url("http://hooks.example.com/x", strict, public)
    assert "credentials" in check_url("https://u:p@example.com/", strict, public)
    assert "loopback" in check_url("http://127.0.0.1:9/x", strict)
    assert check_url("http://127.0.0.1:9/x", local) is None
    # (service.netguard's own tests cover every address class)


def test_backoff_doubles_and_is_capped():
    assert 0.8 <= backoff_delay(1, 1, 100) <= 1.2
    assert 6.4 <= backoff_delay(4, 1, 100) <= 9.6
    assert backoff_delay(20, 1, 100) <= 120

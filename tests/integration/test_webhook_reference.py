"""Our webhook deliveries as a receiver using the Standard Webhooks reference library
(`standardwebhooks`, from PyPI) checks them: a real delivery (real Redis job store, a
loopback receiver), verified by code we did not write.

service/webhooks.py keeps its own sign/verify (a few lines of HMAC): the library reads a
plain string secret as base64, while ours takes any string as its UTF-8 bytes (documented
in the API), and its verify has a fixed tolerance and clock; so it checks us here rather
than replacing us."""

from __future__ import annotations

import json

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from service.webhooks import WebhookDeliverer
from tests.integration.test_webhooks import Receiver, deliver_until_settled, finished_job, settings


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.mark.parametrize("secret, reference_key", [
    ("whsec_" + "dGVzdC1zZWNyZXQtYnl0ZXM=", "whsec_" + "dGVzdC1zZWNyZXQtYnl0ZXM="),  # the library reads whsec_ itself
    ("a plain string secret", b"a plain string secret"),  # ours: its UTF-8 bytes are the key
])
def test_the_reference_library_verifies_a_real_delivery(store, receiver, secret, reference_key):
    job_id, _ = finished_job(store, receiver.url, secret=secret)
    d = WebhookDeliverer(store, settings())
    try:
        assert deliver_until_settled(d, store, job_id)["status"] == "delivered"
    finally:
        d.stop()
    (headers, body), = receiver.requests
    payload = Webhook(reference_key).verify(body, headers)
    assert payload == json.loads(body) and payload["data"]["id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(reference_key).verify(body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(b"another key").verify(body, headers)

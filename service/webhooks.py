"""Webhooks on terminal job states, signed the Standard Webhooks way, retried with backoff.

Why a Redis delivery queue and not a Celery task: a GPU worker runs one merge at a time
for hours, so a webhook task queued behind it would wait hours. Instead the job store
puts the job id in the webhook due queue (service.jobs.webhook_queue) in the same Lua script that makes the job
terminal (so no terminal job is ever missed), and a small delivery loop in every API
process and every worker claims due ids with a lease (a crashed deliverer's claim
expires and someone else retries). Delivery is at least once; receivers dedupe on the
``webhook-id`` header, which stays the same across retries.

Signature (https://www.standardwebhooks.com): ``webhook-signature: v1,<base64 HMAC-SHA256
of "{webhook-id}.{webhook-timestamp}.{body}">``. A secret of the form ``whsec_<base64>``
is used as the base64-decoded key, any other string as its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import threading
import time

import httpx

from .jobs.model import iso
from .jobs.store import JobStore
from .netguard import Policy, WebhookURLError, check_webhook_url

log = logging.getLogger("drmerge.webhooks")


def signing_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers, body: bytes, tolerance_s: int = 300, now: float | None = None) -> bool:
    """Check a received webhook (what a receiver does; the tests use it too)."""
    try:
        msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
        sigs = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, s) for s in sigs)


def check_url(url: str, settings, resolver=None) -> str | None:
    """Why ``url`` cannot receive webhooks under ``settings``, or None if it can
    (service.netguard has the rules)."""
    try:
        check_webhook_url(url, Policy.from_settings(settings), resolver)
    except WebhookURLError as e:
        return str(e)
    return None


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Delay after failed attempt ``attempt`` (1-based): base * 2^(attempt-1), capped,
    with +-20% jitter so many failing receivers do not retry in lockstep."""
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay * random.uniform(0.8, 1.2)


class WebhookDeliverer:
    """Claims due deliveries from the job store and POSTs them. ``deliver_due`` does one
    pass (tests call it directly); ``start`` runs passes in a daemon thread."""

    def __init__(self, store: JobStore, settings, client: httpx.Client | None = None, resolver=None):
        self.store = store
        self.settings = settings
        self.policy = Policy.from_settings(settings)
        self.resolver = resolver  # None: the system resolver (tests inject answers)
        # No redirects (a 3xx is a failed attempt: following one would skip the address
        # check) and no proxies from the environment (the checked address is the one we
        # connect to).
        self.client = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                                             trust_env=False, headers={"user-agent": "drmerge-webhooks/1"})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def deliver_due(self, max_items: int = 100) -> int:
        lease = self.settings.webhook_timeout_s * 2 + 5
        n = 0
        while n < max_items:
            job_id = self.store.webhooks.claim_due(lease)
            if job_id is None:
                break
            n += 1
            try:
                self._deliver(job_id)
            except Exception:  # keep the loop alive; the lease expires and it is retried
                log.exception("webhook delivery for %s crashed", job_id)
        return n

    def _deliver(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or not job.webhook or not job.terminal:
            self.store.webhooks.schedule(job_id, (job.webhook_state if job else None) or {}, None)
            return
        state = dict(job.webhook_state or {})
        attempt = int(state.get("attempts", 0)) + 1
        secret = job.webhook.get("secret") or self.settings.webhook_secret
        now = time.time()
        ts = int(now)
        msg_id = f"msg_{job.id}"
        body = json.dumps({"type": f"merge.{job.status}", "timestamp": iso(now), "data": job.public()},
                          separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts)}
        if secret:
            headers["webhook-signature"] = sign(secret, msg_id, ts, body)
        error = None
        gone = False
        try:
            # Checked again now, not only at submit: DNS may answer differently today.
            target = check_webhook_url(job.webhook["url"], self.policy, self.resolver)
        except WebhookURLError as e:
            target = None
            error, gone = f"url {e}", not e.unresolved  # a refused address never becomes acceptable
        if target is not None:
            headers["host"] = target.host_header
            try:
                resp = self.client.post(target.url, content=body, headers=headers,
                                        extensions={"sni_hostname": target.hostname})
                if 200 <= resp.status_code < 300:
                    error = None
                else:
                    error = f"receiver answered HTTP {resp.status_code}"
                    gone = resp.status_code == 410  # Standard Webhooks: 410 Gone means stop
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"[:500]
        state.update(attempts=attempt, last_attempt_at=now, last_error=error)
        if error is None:
            state.update(status="delivered", delivered_at=time.time(), next_attempt_at=None)
            self.store.webhooks.schedule(job.id, state, None)
            self.store.add_event(job.id, "webhook", f"webhook delivered (attempt {attempt})", attempt=attempt)
            return
        if gone or attempt >= self.settings.webhook_max_attempts:
            state.update(status="failed", next_attempt_at=None)
            self.store.webhooks.schedule(job.id, state, None)
            self.store.add_event(job.id, "warning", f"webhook delivery gave up after attempt {attempt}: {error}",
                                 attempt=attempt)
            return
        due = time.time() + backoff_delay(attempt, self.settings.webhook_backoff_base_s,
                                          self.settings.webhook_backoff_max_s)
        state.update(status="retrying", next_attempt_at=due)
        self.store.webhooks.schedule(job.id, state, due)
        self.store.add_event(job.id, "warning", f"webhook attempt {attempt} failed ({error}); "
                             f"retrying in {due - time.time():.1f}s", attempt=attempt)

    # --- background loop -------------------------------------------------------------------
    def start(self) -> "WebhookDeliverer":
        self._thread = threading.Thread(target=self._run, name="drmerge-webhooks", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.deliver_due()
            except Exception:  # Redis briefly away: try again next tick
                log.warning("webhook loop: cannot reach the job store", exc_info=True)
                busy = 0
            if not busy:
                self._stop.wait(self.settings.webhook_poll_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.client.close()

"""Secrets stay secret: a webhook signing secret and an API key, used through a whole
merge with a failing-then-recovering webhook receiver (and a merge that fails), never
appear in any response, event, webhook body or log line of the API and worker."""

from __future__ import annotations

import os
import uuid

from service.webhooks import verify
from tests.integration.test_webhooks import Receiver


def test_no_secret_in_responses_events_webhooks_or_logs(service_stack, family, s3_bucket):
    sentinel = f"SENTINEL-{uuid.uuid4().hex}-webhook-secret"
    receiver = Receiver()
    receiver.codes = [500]  # one failed attempt: a warning event with the receiver's answer
    seen: list[str] = []
    try:
        http = service_stack.http

        def keep(r):
            seen.append(r.text)
            seen.append(str(dict(r.headers)))
            return r

        good = keep(http.post("/v1/merges", json={"spec": family.spec(f"merged/leak-{uuid.uuid4().hex[:6]}/"),
                                                  "webhook": {"url": receiver.url, "secret": sentinel}})).json()
        bad_spec = family.spec(f"merged/leak-bad-{uuid.uuid4().hex[:6]}/")
        bad_spec["models"][0] = {"model": f"s3://{s3_bucket}/missing/"}
        bad = keep(http.post("/v1/merges", json={"spec": bad_spec,
                                                 "webhook": {"url": receiver.url, "secret": sentinel}})).json()
        # refused requests that carry the secret do not echo it either
        keep(http.post("/v1/merges", json={"spec": {"nope": 1}, "webhook": {"url": receiver.url, "secret": sentinel}}))
        keep(http.post("/v1/merges", json={"spec": family.spec("merged/x/"),
                                           "webhook": {"url": "https://10.0.0.1/", "secret": sentinel}}))
        keep(http.post("/v1/merges", json={"spec": family.spec("merged/y/"),
                                           "webhook": {"url": receiver.url, "secret": sentinel * 10}}))
        keep(http.post("/v1/merges", json={"spec": family.spec("merged/z/"),
                                           "webhook": {"url": receiver.url, "secret": "whsec_" + sentinel}}))
        for job in (good, bad):
            done = service_stack.wait_for(job["id"], lambda j: (j.get("webhook") or {}).get("status") == "delivered",
                                          timeout=120)
            keep(http.get(f"/v1/merges/{job['id']}"))
            keep(http.get(f"/v1/merges/{job['id']}/events"))
            assert done["status"] in ("succeeded", "failed")
        keep(http.get("/v1/merges", params={"limit": 100}))
        keep(http.post(f"/v1/merges/{good['id']}/cancel"))
        keep(http.get("/metrics"))
        assert service_stack.job(bad["id"])["status"] == "failed"
        assert any(e["type"] == "warning" and "HTTP 500" in e["message"]
                   for e in service_stack.store.events(good["id"]) + service_stack.store.events(bad["id"]))
        # the secret was really used: each delivery verifies with it
        assert receiver.requests and all(verify(sentinel, h, b) for h, b in receiver.requests if "webhook-id" in h)
        webhook_bodies = [b.decode() for _, b in receiver.requests]
        events = [str(service_stack.store.events(j["id"])) for j in (good, bad)]
    finally:
        receiver.close()
    logs = []
    for name in ("api.log", "worker.log"):
        path = os.path.join(service_stack.log_dir, name)
        with open(path, encoding="utf-8", errors="replace") as f:
            logs.append(f.read())
    assert len(logs[1]) > 0  # the worker did log the merges
    for what, texts in (("responses", seen), ("webhook bodies", webhook_bodies), ("events", events),
                        ("logs", logs)):
        blob = "\n".join(texts)
        assert sentinel not in blob, what
        assert service_stack.api_key not in blob and service_stack.api_key[4:24] not in blob, what

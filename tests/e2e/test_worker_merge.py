"""Merges end to end: HTTP API (uvicorn) -> Redis -> Celery worker process -> S3, with
results compared bit for bit to a local engine run, every failure code a user can cause,
cancellation, and webhooks."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from service.jobs.status import TERMINAL
from service.webhooks import verify
from tests.integration.test_webhooks import Receiver
from tests.support.checkpoints import _family, list_keys, local_merge, upload_folder, write_checkpoint


def output_keys(s3_client, job) -> list[str]:
    bucket, _, prefix = job["spec"]["output"][len("s3://"):].partition("/")
    return list_keys(s3_client, bucket, prefix)


def no_pending_uploads(s3_client, bucket) -> bool:
    return not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


# ------------------------------------------------------------------------ success


def test_merge_through_the_service_equals_a_local_merge_bit_for_bit(service_stack, s3_client, s3_bucket, tmp_path):
    family = _family(tmp_path, s3_client, s3_bucket, n_layers=4, dim=320)  # ~1.7 MB per model
    spec = family.spec("merged/run-1/", shard_size="1MB", parameters={"drop_rate": 0.7})
    job = service_stack.submit(spec, metadata={"case": "bit-for-bit"})
    done = service_stack.wait(job["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    names = [f["name"] for f in result["files"]]
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) >= 2
    assert "config.json" in names
    keys = output_keys(s3_client, done)
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == sorted(names + ["drmerge.json"])
    expected = local_merge(spec, family, tmp_path / "local-out")
    assert sorted(expected) == sorted(names)
    for f in result["files"]:
        body = s3_client.get_object(Bucket=s3_bucket, Key=f"merged/run-1/{f['name']}")["Body"].read()
        assert body == expected[f["name"]], f["name"]
        assert hashlib.sha256(body).hexdigest() == f["sha256"] and len(body) == f["size"]
    marker = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="merged/run-1/drmerge.json")["Body"].read())
    assert marker["spec"]["output"] == spec["output"]
    # the job record tells the whole story
    assert done["progress"]["fraction"] == 1.0 and done["progress"]["stage"] == "done"
    assert done["progress"]["tensors_done"] == done["progress"]["tensors_total"] == result["tensors"]
    assert done["progress"]["bytes_read"] > 0 and done["progress"]["bytes_written"] > 0
    assert done["started_at"] <= done["finished_at"] and done["attempts"] == 1 and done["error"] is None
    assert done["metadata"] == {"case": "bit-for-bit"}
    events = service_stack.http.get(f"/v1/merges/{job['id']}/events").json()["data"]
    statuses = [e["to"] for e in events if e["type"] == "status"]
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert statuses == ["queued", "running", "succeeded"]
    assert stages[0] == "planning" and "merging" in stages and stages[-1] == "done"


def test_progress_moves_while_a_merge_runs(service_stack, slow_family, s3_client):
    job = service_stack.submit(slow_family.spec("merged/progress/"))
    seen = []

    def record(j):
        seen.append(j)
        return j["status"] in TERMINAL

    done = service_stack.wait_for(job["id"], record, timeout=180, interval=0.02)
    assert done["status"] == "succeeded", done
    running = [j["progress"] for j in seen if j["status"] == "running" and j["progress"]["stage"] == "merging"]
    partial = sorted({p["tensors_done"] for p in running if 0 < p["tensors_done"] < p["tensors_total"]})
    assert len(partial) >= 2, running[-3:]  # it moved, and we saw it move
    fractions = [p["fraction"] for p in running]
    assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)
    reads = [p["bytes_read"] for p in running]
    assert reads == sorted(reads) and reads[-1] > reads[0]
    assert any(p["eta_seconds"] is not None and p["eta_seconds"] > 0 for p in running)
    metrics = service_stack.http.get("/metrics").text
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.splitlines() if ln and ln[0] != "#"}
    assert values['drmerge_jobs{status="succeeded"}'] >= 1
    assert values["drmerge_bytes_read_total"] >= done["progress"]["bytes_read"]
    assert values["drmerge_bytes_written_total"] >= done["progress"]["bytes_written"]
    assert values['drmerge_job_duration_seconds_count{status="succeeded"}'] >= 1
    assert values["drmerge_workers_live"] == 1


# -------------------------------------------------------------------------- failures


def assert_failed(service_stack, s3_client, job, code: str, param=...):
    done = service_stack.wait(job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == code, done["error"]
    assert done["error"]["message"]
    if param is not ...:
        assert done["error"]["param"] == param, done["error"]
    assert output_keys(s3_client, done) == []  # nothing half-written
    assert done["result"] is None and done["finished_at"]
    return done


def test_missing_input_objects_fail_with_input_not_found(service_stack, family, s3_client, s3_bucket):
    spec = family.spec("merged/missing/")
    spec["models"].append({"model": f"s3://{s3_bucket}/does-not-exist/"})
    done = assert_failed(service_stack, s3_client, service_stack.submit(spec), "input_not_found")
    assert "does-not-exist" in done["error"]["message"]
    assert no_pending_uploads(s3_client, s3_bucket)


def test_missing_bucket_fails_with_input_not_found(service_stack, family, s3_client):
    spec = family.spec("merged/nobucket/")
    spec["base_model"] = "s3://drmerge-no-such-bucket-4711/base/"
    assert_failed(service_stack, s3_client, service_stack.submit(spec), "input_not_found")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_fails_with_corrupt_checkpoint(service_stack, family, s3_client, s3_bucket, tmp_path,
                                                          damage):
    good = open(os.path.join(family.local["ft-2"], "model.safetensors"), "rb").read()
    bad = b"\x00garbage that is not safetensors" * 3 if damage == "garbage" else good[: len(good) - 100]
    s3_client.put_object(Bucket=s3_bucket, Key="ft-2/model.safetensors", Body=bad)
    assert_failed(service_stack, s3_client, service_stack.submit(family.spec(f"merged/{damage}/")),
                  "corrupt_checkpoint")


def test_incompatible_checkpoints_fail(service_stack, family, s3_client, s3_bucket, tmp_path):
    import torch

    odd = {"layers.0.proj.weight": torch.zeros(3, 3)}
    folder = write_checkpoint(tmp_path / "odd", odd)
    uri = upload_folder(s3_client, folder, s3_bucket, "odd")
    spec = family.spec("merged/incompatible/")
    spec["models"][1] = {"model": uri}
    assert_failed(service_stack, s3_client, service_stack.submit(spec), "incompatible_checkpoints")


def test_existing_output_fails_unless_overwrite(service_stack, family, s3_client, s3_bucket):
    first = service_stack.wait(service_stack.submit(family.spec("merged/twice/"))["id"])
    assert first["status"] == "succeeded"
    before = {k: s3_client.head_object(Bucket=s3_bucket, Key=k)["ETag"] for k in output_keys(s3_client, first)}
    second = service_stack.wait(service_stack.submit(family.spec("merged/twice/"))["id"])
    assert second["status"] == "failed" and second["error"]["code"] == "output_exists"
    assert second["error"]["param"] == "output"
    after = {k: s3_client.head_object(Bucket=s3_bucket, Key=k)["ETag"] for k in output_keys(s3_client, first)}
    assert after == before  # the failed job did not touch the earlier merge
    third = service_stack.wait(service_stack.submit(family.spec("merged/twice/", overwrite=True))["id"])
    assert third["status"] == "succeeded", third
    assert sorted(output_keys(s3_client, third)) == sorted(before)


# -------------------------------------------------------------------------- cancel


def test_cancel_a_running_merge_stops_it_and_leaves_no_output(service_stack, slow_family, s3_client, s3_bucket):
    spec = slow_family.spec("merged/cancelled/", shard_size="1MB")
    job = service_stack.submit(spec)
    service_stack.wait_for(job["id"], lambda j: j["status"] == "running" and j["progress"]["tensors_done"] >= 3,
                           timeout=120, interval=0.02)
    r = service_stack.http.post(f"/v1/merges/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled"), r.text
    done = service_stack.wait(job["id"])
    assert done["status"] == "cancelled", done
    assert done["progress"]["tensors_done"] < done["progress"]["tensors_total"]
    assert done["error"] is None and done["result"] is None
    assert output_keys(s3_client, done) == []
    assert no_pending_uploads(s3_client, s3_bucket)
    statuses = [e["to"] for e in service_stack.http.get(f"/v1/merges/{job['id']}/events").json()["data"]
                if e["type"] == "status"]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]


def test_a_job_cancelled_while_queued_never_starts(service_stack, slow_family, family, s3_client):
    blocker = service_stack.submit(slow_family.spec("merged/blocker/"))
    service_stack.wait_for(blocker["id"], lambda j: j["status"] == "running", timeout=60)
    queued = service_stack.submit(family.spec("merged/never/"))
    assert service_stack.job(queued["id"])["status"] == "queued"  # the only worker is busy
    r = service_stack.http.post(f"/v1/merges/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    service_stack.http.post(f"/v1/merges/{blocker['id']}/cancel")
    assert service_stack.wait(blocker["id"])["status"] == "cancelled"
    # the worker now receives the cancelled job's message, and drops it
    queue = service_stack.settings.queue
    deadline = time.monotonic() + 30
    while service_stack.store.r.llen(queue) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service_stack.store.r.llen(queue) == 0
    deadline = time.monotonic() + 10
    while f"{queued['id']} is already cancelled" not in service_stack.log_tail(20000) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"{queued['id']} is already cancelled" in service_stack.log_tail(20000)
    final = service_stack.job(queued["id"])
    assert final["status"] == "cancelled" and final["started_at"] is None and final["attempts"] == 0
    assert output_keys(s3_client, final) == []
    statuses = [e["to"] for e in service_stack.http.get(f"/v1/merges/{queued['id']}/events").json()["data"]]
    assert statuses == ["queued", "cancelled"]


# -------------------------------------------------------------------------- webhook


def test_webhook_is_signed_and_retried_until_delivered(service_stack, family):
    receiver = Receiver()
    receiver.codes = [500]  # the first delivery fails
    secret = "whsec_" + "ZTJlLXdlYmhvb2stc2VjcmV0"
    try:
        job = service_stack.submit(family.spec("merged/hooked/"), webhook={"url": receiver.url, "secret": secret},
                                   metadata={"pipeline": "nightly"})
        done = service_stack.wait_for(job["id"], lambda j: (j.get("webhook") or {}).get("status") == "delivered",
                                      timeout=60)
        assert done["status"] == "succeeded"
        assert done["webhook"]["attempts"] == 2 and done["webhook"]["delivered_at"]
        assert len(receiver.requests) == 2
        for headers, body in receiver.requests:
            assert verify(secret, headers, body)
            assert headers["webhook-id"] == f"msg_{job['id']}"
        payload = json.loads(receiver.requests[-1][1])
        assert payload["type"] == "merge.succeeded"
        assert payload["data"]["id"] == job["id"] and payload["data"]["result"]["files"]
        assert payload["data"]["metadata"] == {"pipeline": "nightly"}
        assert secret not in receiver.requests[-1][1].decode()
    finally:
        receiver.close()

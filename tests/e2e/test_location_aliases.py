"""Aliases of one location, tried against the real service (uvicorn API, Redis, SeaweedFS,
a Celery worker process): issue 18, items 1, 2 and 16 (the CLI's side:
tests/unit/test_location_aliases.py).

Before the fix: an output spelled ``s3://b//ft/`` with overwrite rewrote the input
``s3://b/ft/``; ``.../busy2/`` and ``.../busy2//`` ran at once and cancelling one deleted
the other's shards; ``..`` passed submit and failed at run time as a storage error."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from tests.e2e.test_service_api import assert_problem
from tests.support.checkpoints import list_keys, object_fingerprints


def fresh_tenant(stack) -> tuple[str, str]:
    name = f"alias-{uuid.uuid4().hex[:8]}"
    return name, stack.new_key(name, allow=["*"])


def tenant_jobs(stack, tenant: str) -> int:
    return stack.store.r.zcard(stack.store.keys.tenant(tenant))


def key_of(uri: str) -> str:
    return uri[len("s3://"):].partition("/")[2]


# ------------------------------------------------------------------ (a) item 1


def test_an_alias_of_an_input_is_refused_and_the_input_is_untouched(service_stack, family, s3_client):
    victim = family.uris["ft-1"]  # s3://<bucket>/ft-1/
    before = object_fingerprints(s3_client, family.bucket)
    name, key = fresh_tenant(service_stack)
    queued_before = service_stack.store.r.llen(service_stack.settings.queue)
    aliases = [
        (f"s3://{family.bucket}//{key_of(victim)}", " is the input models[0].model "),    # the report, verbatim
        (f"s3://{family.bucket}/{key_of(victim)}/", " is the input models[0].model "),
        (f"s3://{family.bucket}/{key_of(victim).rstrip('/')}", " is the input models[0].model "),
        (f"s3://{family.bucket}//{key_of(victim)}merged/", " lies inside the input models[0].model "),
        (f"s3://{family.bucket}//", " contains the input base_model "),   # overwrite would clear every input
        (f"s3://{family.bucket}//{key_of(family.uris['base'])}", " is the input base_model "),
    ]
    with service_stack.client(key) as c:
        for output, how in aliases:
            r = c.post("/v1/merges", json={"spec": family.spec(overwrite=True) | {"output": output}})
            body = assert_problem(r, 422, "invalid_spec", "spec.output")
            assert how in body["detail"], (output, body["detail"])
            canonical = victim if "ft-1" in output else family.uris["base"]
            assert canonical in body["detail"]  # both locations are named
    assert tenant_jobs(service_stack, name) == 0
    assert service_stack.store.r.llen(service_stack.settings.queue) == queued_before
    assert object_fingerprints(s3_client, family.bucket) == before


def test_a_worker_refuses_an_aliased_spec_that_reached_it(service_stack, family, s3_client):
    """Defence in depth: a job whose stored spec still holds the alias (queued before this
    fix, or written by another client of the store) fails invalid_spec in the worker,
    which parses the spec again, before it opens the output."""
    from service.jobs.queue import enqueue, make_celery

    victim = family.uris["ft-1"]
    before = object_fingerprints(s3_client, family.bucket)
    raw = family.spec(overwrite=True) | {"output": f"s3://{family.bucket}//{key_of(victim)}"}
    job, _ = service_stack.store.create(raw, f"s3://{family.bucket}/elsewhere-{uuid.uuid4().hex[:6]}/",
                                        tenant=service_stack.tenant)
    celery = make_celery(service_stack.settings)
    try:
        enqueue(celery, job.id, queue=service_stack.settings.queue)
        service_stack.store.mark_enqueued(job.id)
    finally:
        celery.close()
    done = service_stack.wait(job.id)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_spec", done
    assert done["error"]["param"] == "output" and " is the input models[0].model " in done["error"]["message"]
    assert object_fingerprints(s3_client, family.bucket) == before


# ------------------------------------------------------------------ (b) item 2


def test_aliases_and_nested_outputs_of_an_active_job_are_409(service_stack, slow_family, s3_client):
    bucket = slow_family.bucket
    c = service_stack.http  # the stack's own tenant, whose jobs service_stack.wait can follow
    other_name, other_key = fresh_tenant(service_stack)
    with service_stack.client(other_key) as other:
        first = service_stack.submit(slow_family.spec("merged/busy2/", shard_size="10KB"))
        own_jobs = tenant_jobs(service_stack, service_stack.tenant)
        service_stack.wait_for(first["id"], lambda j: j["status"] == "running", timeout=60)
        for output, how in [("merged/busy2//", None), ("merged/busy2", None), ("/merged/busy2/", None),
                            ("merged/busy2/sub/", "which contains"), ("merged/", "inside"), ("/merged//", "inside")]:
            r = c.post("/v1/merges", json={"spec": slow_family.spec(output, overwrite=True)})
            body = assert_problem(r, 409, "output_busy", "spec.output")
            assert body["job_id"] == first["id"], output
            assert f"s3://{bucket}/merged/busy2/" in body["detail"]
            assert how is None or how in body["detail"], body["detail"]
            # another tenant gets the same refusal through the alias, without the job or its location
            r = other.post("/v1/merges", json={"spec": slow_family.spec(output, overwrite=True)})
            body = assert_problem(r, 409, "output_busy", "spec.output")
            assert "job_id" not in body and first["id"] not in body["detail"]
            if how is not None:  # only its own output is named
                canonical = f"s3://{bucket}/{output.strip('/')}/".replace(f"{bucket}//", f"{bucket}/")
                assert body["detail"] == (f"another job is already writing to a location that overlaps "
                                          f"{canonical}; try again when it has ended")
        assert tenant_jobs(service_stack, service_stack.tenant) == own_jobs
        assert tenant_jobs(service_stack, other_name) == 0
        # a sibling whose name merely starts the same is another place: accepted, and its
        # cancel (queued behind the first job on the only worker) touches nothing of it
        sibling = c.post("/v1/merges", json={"spec": slow_family.spec("merged/busy2x/")})
        assert sibling.status_code == 202, sibling.text
        assert c.post(f"/v1/merges/{sibling.json()['id']}/cancel").json()["status"] == "cancelled"
    done = service_stack.wait(first["id"], timeout=180)
    assert done["status"] == "succeeded", done
    prefix = "merged/busy2/"
    marker = json.loads(s3_client.get_object(Bucket=bucket, Key=prefix + "drmerge.json")["Body"].read())
    assert len(marker["files"]) >= 3  # several shards: what the concurrent job's cancel used to delete
    for f in marker["files"]:  # every file the marker lists is there, with its bytes
        body = s3_client.get_object(Bucket=bucket, Key=prefix + f["name"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == f["sha256"] and len(body) == f["size"], f["name"]
    assert sorted(list_keys(s3_client, bucket, prefix)) == sorted(
        [prefix + f["name"] for f in marker["files"]] + [prefix + "drmerge.json"])
    # once the first job has ended, the alias is an ordinary second job on a full output
    finished = object_fingerprints(s3_client, bucket, prefix)
    again = service_stack.wait(service_stack.submit(slow_family.spec("merged/busy2//"))["id"])
    assert again["status"] == "failed" and again["error"]["code"] == "output_exists", again
    assert again["spec"]["output"] == f"s3://{bucket}/merged/busy2/"  # the job record holds the canonical form
    assert object_fingerprints(s3_client, bucket, prefix) == finished


# ------------------------------------------------------------------ (c) item 16


@pytest.mark.parametrize("where", ["output", "model", "base_model"])
def test_dot_dot_inside_an_allowed_prefix_is_422_at_submit(service_stack, family, where):
    name = f"alias-{uuid.uuid4().hex[:8]}"
    key = service_stack.new_key(name, allow=[f"s3://{family.bucket}"])
    spec = family.spec("merged/dots/")
    if where == "output":
        spec["output"], param = f"s3://{family.bucket}/merged/x/../dots/", "spec.output"
    elif where == "model":
        spec["models"][1] = {"model": f"s3://{family.bucket}/ft-1/../ft-2/"}
        param = "spec.models[1].model"
    else:
        spec["base_model"], param = f"s3://{family.bucket}/./base/", "spec.base_model"
    with service_stack.client(key) as c:
        body = assert_problem(c.post("/v1/merges", json={"spec": spec}), 422, "invalid_spec", param)
    assert "segment" in body["detail"]
    assert tenant_jobs(service_stack, name) == 0  # refused at submit, not a storage_error at run time

"""Storage allow lists through HTTP (the rules themselves: tests/unit/test_allowlist.py):
a key may name only the S3 prefixes it was given (403 ``access_denied`` at submit, before
any job exists), ``.``/``..`` segments are refused outright (422 ``invalid_spec``); local
paths only under the operator's root, only for keys allowed any location, never out of
the root by ``..`` or a symlink."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.e2e.test_service_api import assert_problem


# --------------------------------------------------------------------- through HTTP


def tenant() -> str:
    return f"acl-{uuid.uuid4().hex[:8]}"


def spec(base="s3://bkt-a/team/base/", models=("s3://bkt-a/team/ft-1/", "s3://bkt-a/team/ft-2/"), output=None):
    return {"base_model": base, "models": [{"model": m} for m in models], "method": "drm",
            "output": output or f"s3://bkt-a/team/out/{uuid.uuid4().hex}/"}


def jobs_in_store(stack, name):
    return stack.store.r.zcard(stack.store.keys.tenant(name))


@pytest.mark.parametrize("changes, param", [
    ({"output": "s3://bkt-a/teamx/out/"}, "spec.output"),
    ({"output": "s3://bkt-a//teamx/out/"}, "spec.output"),
    ({"output": "s3://bkt-b/team/out/"}, "spec.output"),
    ({"output": "s3://bkt-shared/models/out/"}, "spec.output"),  # a read-only entry
    ({"base": "s3://bkt-a/secrets/base/"}, "spec.base_model"),
    ({"models": ("s3://bkt-a/team/ft-1/", "s3://bkt-a//bkt-b/ft/")}, "spec.models[1].model"),
    ({"models": ("s3://bkt-a/team-2/ft/",)}, "spec.models[0].model"),
])
def test_locations_outside_the_key_are_403_before_any_job_exists(strict_stack, changes, param):
    name = tenant()
    key = strict_stack.new_key(name, allow=["s3://bkt-a/team"], allow_read=["s3://bkt-shared/models"])
    queue_before = strict_stack.store.r.llen(strict_stack.settings.queue)
    with strict_stack.client(key) as c:
        body = assert_problem(c.post("/v1/merges", json={"spec": spec(**changes)}), 403, "access_denied", param)
        assert "may not" in body["detail"]
        assert c.get("/v1/merges").json()["data"] == []
        ok = c.post("/v1/merges", json={"spec": spec(base="s3://bkt-shared/models/base/")})
        assert ok.status_code == 202, ok.text  # the same key inside its lists is fine
    assert jobs_in_store(strict_stack, name) == 1
    assert strict_stack.store.r.llen(strict_stack.settings.queue) == queue_before + 1


def test_a_key_without_allow_entries_reads_jobs_but_submits_nothing(strict_stack):
    key = strict_stack.new_key(tenant(), allow=())
    with strict_stack.client(key) as c:
        assert c.get("/v1/merges").status_code == 200
        assert_problem(c.post("/v1/merges", json={"spec": spec()}), 403, "access_denied", "spec.base_model")


def test_uris_the_engine_would_refuse_are_422_not_403(strict_stack):
    with strict_stack.client(strict_stack.new_key(tenant(), allow=["s3://bkt-a/team"])) as c:
        r = c.post("/v1/merges", json={"spec": spec(output="s3://bkt-a/team/a//b/")})
        assert_problem(r, 422, "invalid_spec", "spec.output")


@pytest.mark.parametrize("changes, param", [
    # issue 18 item 16: '..' used to pass an allow list it stayed inside, then fail at run time
    ({"output": "s3://bkt-a/team/x/../out/"}, "spec.output"),
    ({"output": "s3://bkt-a/team/../elsewhere/out/"}, "spec.output"),  # was 403: one rule now, 422
    ({"models": ("s3://bkt-a/team/ft-1/", "s3://bkt-a/team/../../bkt-b/ft/")}, "spec.models[1].model"),  # was 403
    ({"base": "s3://bkt-a/team/./base/"}, "spec.base_model"),
])
def test_dot_segments_are_422_before_any_job_exists(strict_stack, changes, param):
    name = tenant()
    with strict_stack.client(strict_stack.new_key(name, allow=["s3://bkt-a/team"])) as c:
        body = assert_problem(c.post("/v1/merges", json={"spec": spec(**changes)}), 422, "invalid_spec", param)
        assert "segment" in body["detail"]
    assert jobs_in_store(strict_stack, name) == 0


# --------------------------------------------------------------------- local paths


def local_spec(root, output):
    return {"base_model": os.path.join(root, "base"), "models": [os.path.join(root, "ft")], "method": "drm",
            "output": output}


def test_local_paths_need_a_key_allowed_any_location(strict_stack):
    root = strict_stack.local_root
    with strict_stack.client(strict_stack.new_key(tenant(), allow=["s3://bkt-a/team"])) as c:
        r = c.post("/v1/merges", json={"spec": local_spec(root, os.path.join(root, "out-1"))})
        assert_problem(r, 403, "access_denied", "spec.base_model")
    with strict_stack.client(strict_stack.new_key(tenant(), allow=["*"])) as c:
        r = c.post("/v1/merges", json={"spec": local_spec(root, os.path.join(root, "out", uuid.uuid4().hex))})
        assert r.status_code == 202, r.text


def test_local_paths_cannot_leave_the_root(strict_stack, tmp_path):
    root = strict_stack.local_root
    outside = tmp_path / "outside"
    outside.mkdir()
    link = os.path.join(root, f"link-{uuid.uuid4().hex[:6]}")
    os.symlink(outside, link)  # inside the root by name, outside by where it leads
    with strict_stack.client(strict_stack.new_key(tenant(), allow=["*"])) as c:
        for output, param in [(os.path.join(root, "..", "escaped"), "spec.output"),
                              (os.path.join(link, "merged"), "spec.output"),
                              ("relative/out", "spec.output"),
                              (str(outside / "merged"), "spec.output"),
                              ("/etc/drmerge-out", "spec.output")]:
            r = c.post("/v1/merges", json={"spec": local_spec(root, output)})
            assert_problem(r, 422, "invalid_spec", param)
        r = c.post("/v1/merges", json={"spec": dict(local_spec(root, os.path.join(root, "o")),
                                                     base_model=os.path.join(link, "base"))})
        assert_problem(r, 422, "invalid_spec", "spec.base_model")

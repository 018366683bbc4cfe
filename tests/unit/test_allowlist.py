"""Storage allow lists: a key may name only the S3 prefixes it was given (403
``access_denied`` at submit, before any job exists), matched on path segments and on
canonical locations, so ``//`` spellings are caught and ``.``/``..`` segments are
refused outright (422 ``invalid_spec``); local paths only under the operator's root, only
for keys allowed any location, never out of the root by ``..`` or a symlink."""

from __future__ import annotations

import os
import uuid

import pytest

from drmerge.errors import MergeError
from service.allowlist import AccessList, AllowListError
from tests.e2e.test_service_api import assert_problem


def acl(*allow, read=()):
    return AccessList.parse(allow, read)


@pytest.mark.parametrize("uri, ok", [
    ("s3://bkt/team/", True),
    ("s3://bkt/team", True),
    ("s3://bkt/team/ft-1/", True),
    ("s3://bkt//team/", True),          # the engine reads this as team/ (leading slashes dropped)
    ("s3://bkt///team/ft-1//", True),    # canonical: s3://bkt/team/ft-1/
    ("s3://bkt/teamx/", False),         # a prefix of the name is not a path prefix
    ("s3://bkt//teamx/", False),
    ("s3://bkt/tea/", False),
    ("s3://bkt/", False),
    ("s3://bkt//", False),
    ("s3://bkt/other/", False),
    ("s3://bkt/Team/", False),          # S3 keys are case-sensitive
    ("s3://bkt-other/team/", False),
])
def test_prefix_matching_on_path_segments(uri, ok):
    assert acl("s3://bkt/team").allows(uri, write=True) is ok


@pytest.mark.parametrize("uri", [
    "s3://bkt/team/./ft/",              # S3 keeps '.', SeaweedFS refuses it, proxies drop it
    "s3://bkt/team/../other/",          # resolved, it leaves team/
    "s3://bkt/team/x/../ft/",           # resolved, it stays inside: still two readings
    "s3://bkt/team/x/../../other/",
    "s3://bkt/../team/",                # climbs out of the bucket
    "s3://bkt/./team/",
    "s3://bkt/team/a//b/",              # AWS keeps '//', SeaweedFS collapses it
    "s3://bkt/team\\..\\other/",        # SeaweedFS reads a backslash as '/'
    "s3://bk/team/",                    # not a valid bucket name
])
def test_spellings_that_storages_read_differently_are_invalid_whatever_the_list(uri):
    for access in (acl("s3://bkt/team"), acl("*"), acl()):
        with pytest.raises(MergeError) as e:
            access.allows(uri, write=True)
        assert e.value.code == "invalid_spec"


def test_whole_bucket_any_location_and_read_only_entries():
    whole = acl("s3://bkt")
    assert whole.allows("s3://bkt/anything/at/all/", write=True)
    assert not whole.allows("s3://bkt2/x/", write=True)
    assert acl("*").allows("s3://whatever/x/", write=True)
    mixed = acl("s3://out/team", read=["s3://models/base"])
    assert mixed.allows("s3://models/base/llama/", write=False)
    assert not mixed.allows("s3://models/base/llama/", write=True)
    assert mixed.allows("s3://out/team/run/", write=True)
    assert not acl().allows("s3://out/team/run/", write=False)  # no entries: nothing


@pytest.mark.parametrize("entry", ["gs://b/x", "s3://", "s3://B/x", "s3://b/a/../c", "s3://b/./c", "s3://b/a//c",
                                   "s3://bkt/a\\b", "/local/path", "", 42])
def test_malformed_entries_are_refused_when_the_key_is_made(entry):
    with pytest.raises(AllowListError):
        acl(entry)


def test_entries_are_stored_normalised():
    assert acl("s3://bkt/team", "*").write_entries == ("*", "s3://bkt/team/")
    assert acl(read=["s3://bkt//shared//"]).read_entries == ("s3://bkt/shared/",)


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

"""API keys and tenants through the real API process: every /v1 route needs a key; bad,
missing and revoked keys are 401; one tenant never sees, cancels or replays another's
jobs; the admin CLI creates, lists and revokes keys; Redis holds no usable key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import httpx
import pytest

from tests.e2e.test_service_api import assert_problem, spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = "mrg_01aaaaaaaaaaaaaaaaaaaaaaaa"
V1_ROUTES = [("POST", "/v1/merges"), ("GET", "/v1/merges"), ("GET", f"/v1/merges/{JOB}"),
             ("POST", f"/v1/merges/{JOB}/cancel"), ("GET", f"/v1/merges/{JOB}/events"), ("GET", "/v1/nothing"),
             ("DELETE", "/v1/merges")]


def tenant_name() -> str:
    return f"team-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def anon(idle_stack):
    with idle_stack.client() as c:
        yield c


def assert_unauthorized(r, detail_part: str | None = None):
    body = assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    if detail_part:
        assert detail_part in body["detail"], body
    return body


@pytest.mark.parametrize("method, path", V1_ROUTES)
def test_every_v1_route_needs_a_key(anon, method, path):
    r = anon.request(method, path, json={"spec": spec()} if method == "POST" else None)
    assert_unauthorized(r, "Authorization: Bearer")


@pytest.mark.parametrize("header", [
    "drm_" + "a" * 43,                       # no scheme
    "Basic " + "a" * 20,                     # another scheme
    "Bearer",                                # no token
    "Bearer drm_short",                      # not a key's shape
    "Bearer " + "drm_" + "a" * 43,           # a key's shape, but no such key
    "Bearer " + "drm_" + "a" * 42 + "\u00e9",  # non-ASCII
    "Bearer " + "x" * 5000,                  # oversized
])
def test_malformed_and_unknown_keys_are_401(idle_stack, header):
    with idle_stack.client() as c:
        r = c.get("/v1/merges", headers={"authorization": header.encode("utf-8")})
    assert_unauthorized(r)


def test_the_key_is_checked_before_the_body_is_read(anon):
    r = anon.post("/v1/merges", content=b"{not json", headers={"content-type": "application/json"})
    assert_unauthorized(r)
    r = anon.post("/v1/merges", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert_unauthorized(r)  # not 413: an anonymous caller learns nothing about limits either


def test_health_metrics_and_docs_need_no_key(anon):
    for path in ("/livez", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert anon.get(path).status_code == 200, path
    schema = anon.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and "drmerge keys create" in scheme["description"]
    assert schema["paths"]["/v1/merges"]["post"]["security"] == [{"apiKey": []}]
    assert "401" in schema["paths"]["/v1/merges/{job_id}"]["get"]["responses"]


def test_a_revoked_key_is_refused_from_its_next_request(idle_stack):
    key, rec = idle_stack.keys.create(tenant_name(), allow=["*"])
    with idle_stack.client(key) as c:
        assert c.get("/v1/merges").status_code == 200
        job = c.post("/v1/merges", json={"spec": spec()}).json()
        assert idle_stack.keys.revoke(rec.id).revoked
        assert_unauthorized(c.get("/v1/merges"), "revoked")
        assert_unauthorized(c.get(f"/v1/merges/{job['id']}"), "revoked")
        assert_unauthorized(c.post(f"/v1/merges/{job['id']}/cancel"), "revoked")
    assert idle_stack.store.get(job["id"]).status == "queued"  # the revoked key changed nothing


def test_tenants_never_see_each_others_jobs(idle_stack):
    a_key, b_key = idle_stack.new_key(tenant_name()), idle_stack.new_key(tenant_name())
    with idle_stack.client(a_key) as a, idle_stack.client(b_key) as b:
        a_body = {"spec": spec()}
        a_job = a.post("/v1/merges", json=a_body, headers={"Idempotency-Key": "shared"}).json()
        b_job = b.post("/v1/merges", json={"spec": spec()}).json()
        missing = b.get(f"/v1/merges/{JOB}")
        for r in (b.get(f"/v1/merges/{a_job['id']}"), b.get(f"/v1/merges/{a_job['id']}/events"),
                  b.post(f"/v1/merges/{a_job['id']}/cancel")):
            body = assert_problem(r, 404, "not_found")
            # word for word what a job that does not exist gets: existence does not leak
            assert body["detail"].replace(a_job["id"], JOB) == missing.json()["detail"]
            assert body.keys() == missing.json().keys()
        assert a.get(f"/v1/merges/{a_job['id']}").json()["status"] == "queued"  # B's cancel did nothing
        for params in ({"limit": 100}, {"limit": 100, "status": "queued"}):
            a_ids = {j["id"] for j in a.get("/v1/merges", params=params).json()["data"]}
            b_ids = {j["id"] for j in b.get("/v1/merges", params=params).json()["data"]}
            assert a_ids == {a_job["id"]} and b_ids == {b_job["id"]}
        # a cursor from A's world shows B nothing of A's
        page = b.get("/v1/merges", params={"after": a_job["id"], "limit": 100}).json()
        assert a_job["id"] not in {j["id"] for j in page["data"]}
        # the same Idempotency-Key in another tenant is another key: a new job, no conflict
        b_again = b.post("/v1/merges", json={"spec": spec()}, headers={"Idempotency-Key": "shared"})
        assert b_again.status_code == 202 and b_again.json()["id"] != a_job["id"]
        assert "idempotent-replayed" not in b_again.headers
        replay = a.post("/v1/merges", json=a_body, headers={"Idempotency-Key": "shared"})
        assert replay.status_code == 202 and replay.json()["id"] == a_job["id"]  # A's key is still A's
        assert replay.headers["idempotent-replayed"] == "true"
    assert idle_stack.store.get(a_job["id"]).tenant != idle_stack.store.get(b_job["id"]).tenant


def test_status_filter_walks_the_smaller_index(idle_stack):
    """A tenant's status filter is correct whichever index is smaller (its own jobs, or
    all jobs in that status) and pages without gaps."""
    busy, quiet = idle_stack.new_key(tenant_name()), idle_stack.new_key(tenant_name())
    with idle_stack.client(busy) as a, idle_stack.client(quiet) as q:
        a_ids = [a.post("/v1/merges", json={"spec": spec()}).json()["id"] for _ in range(7)]
        for job_id in a_ids[::2]:
            assert a.post(f"/v1/merges/{job_id}/cancel").status_code == 200
        q_id = q.post("/v1/merges", json={"spec": spec()}).json()["id"]
        seen, after = [], None
        while True:
            page = a.get("/v1/merges", params={"status": "cancelled", "limit": 2,
                                               **({"after": after} if after else {})}).json()
            seen += [j["id"] for j in page["data"]]
            if not page["has_more"]:
                break
            after = page["next_after"]
        assert seen == a_ids[::2][::-1]
        assert [j["id"] for j in q.get("/v1/merges", params={"status": "queued"}).json()["data"]] == [q_id]
        assert q.get("/v1/merges", params={"status": "cancelled"}).json()["data"] == []


def test_output_busy_names_no_job_of_another_tenant(idle_stack):
    out = f"s3://bkt-models/out/{uuid.uuid4().hex}/"
    with idle_stack.client(idle_stack.new_key(tenant_name())) as a, \
            idle_stack.client(idle_stack.new_key(tenant_name())) as b:
        first = a.post("/v1/merges", json={"spec": spec(out)}).json()
        body = assert_problem(b.post("/v1/merges", json={"spec": spec(out)}), 409, "output_busy")
        assert "job_id" not in body and first["id"] not in json.dumps(body)
        own = assert_problem(a.post("/v1/merges", json={"spec": spec(out)}), 409, "output_busy")
        assert own["job_id"] == first["id"]


def test_metrics_carry_no_tenant_data(idle_stack):
    tenant = tenant_name()
    with idle_stack.client(idle_stack.new_key(tenant)) as c:
        c.post("/v1/merges", json={"spec": spec(), "metadata": {"secret-project": "x"}})
        text = c.get("/metrics").text
    assert tenant not in text and "tenant" not in text and "secret-project" not in text


def test_redis_holds_only_digests_of_keys(idle_stack):
    key, rec = idle_stack.keys.create(tenant_name(), allow=["s3://bkt-models/team"])
    r = idle_stack.store.r
    dump = []
    for k in r.scan_iter(f"{idle_stack.store.p}:*"):
        kind = r.type(k)
        if kind == "hash":
            dump.append(json.dumps(r.hgetall(k)))
        elif kind == "string":
            dump.append(r.get(k))
        dump.append(k)
    blob = "\n".join(dump)
    assert rec.id in blob and key not in blob and key[4:] not in blob and key[4:20] not in blob


# ------------------------------------------------------------------------- admin CLI


def drmerge_keys(stack, *args, pepper: str | None = ...):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DRMERGE_REDIS_URL=stack.settings.redis_url, DRMERGE_KEY_PREFIX=stack.settings.key_prefix)
    env.pop("DRMERGE_API_KEY_PEPPER", None)
    if pepper is ...:
        pepper = stack.settings.api_key_pepper.get_secret_value()
    if pepper is not None:
        env["DRMERGE_API_KEY_PEPPER"] = pepper
    return subprocess.run([sys.executable, "-m", "drmerge_ops", "keys", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_keys_cli_create_list_revoke(idle_stack):
    tenant = tenant_name()
    made = drmerge_keys(idle_stack, "create", "--tenant", tenant, "--allow", "s3://bkt-models/team",
                        "--allow-read", "s3://bkt-shared")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert made.stdout == key + "\n" and re.fullmatch(r"drm_[A-Za-z0-9_-]{43}", key)  # the key alone
    key_id = re.search(r"key_[0-9a-f]{16}", made.stderr).group(0)
    with idle_stack.client(key) as c:
        assert c.get("/v1/merges").status_code == 200
        listed = drmerge_keys(idle_stack, "list", "--json")
        assert listed.returncode == 0 and key not in listed.stdout
        (rec,) = [k for k in json.loads(listed.stdout) if k["id"] == key_id]
        assert rec["tenant"] == tenant and rec["allow"] == ["s3://bkt-models/team/"]
        assert rec["allow_read"] == ["s3://bkt-shared/"] and rec["created_at"] and rec["revoked_at"] is None
        table = drmerge_keys(idle_stack, "list")
        assert key_id in table.stdout and tenant in table.stdout and key not in table.stdout
        gone = drmerge_keys(idle_stack, "revoke", key_id)
        assert gone.returncode == 0 and "revoked" in gone.stdout
        assert_unauthorized(c.get("/v1/merges"), "revoked")
    (rec,) = [k for k in json.loads(drmerge_keys(idle_stack, "list", "--json").stdout) if k["id"] == key_id]
    assert rec["revoked_at"] is not None


@pytest.mark.parametrize("args, pepper, message", [
    (("revoke", "key_0000000000000000"), ..., "not_found"),
    (("create", "--tenant", "Bad Name!"), ..., "tenant name"),
    (("create", "--tenant", "ok", "--allow", "gs://bkt/x"), ..., "s3://"),
    (("create", "--tenant", "ok", "--allow", "s3://bkt/a/../b"), ..., "'..'"),
    (("create", "--tenant", "ok", "--allow-read", "*"), ..., "'*'"),
    (("create", "--tenant", "ok"), None, "DRMERGE_API_KEY_PEPPER"),
])
def test_keys_cli_errors(idle_stack, args, pepper, message):
    r = drmerge_keys(idle_stack, *args, pepper=pepper)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr, r.stderr


# --------------------------------------------------------------- auth off, misconfigured


def test_auth_disabled_serves_one_default_tenant(redis_server, s3_server, tmp_path):
    from drmerge_ops.processes import service_env, start_api, stop_process
    from tests.support.servers import free_port

    port = free_port()
    env = service_env(redis_server.url, s3_server.env(), auth="disabled", key_prefix=f"noauth{uuid.uuid4().hex[:6]}",
                      queue="noauth-idle")
    api = start_api(env, port, str(tmp_path / "api.log"))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            job = http.post("/v1/merges", json={"spec": spec()})
            assert job.status_code == 202, job.text
            assert http.get(f"/v1/merges/{job.json()['id']}").status_code == 200
            assert [j["id"] for j in http.get("/v1/merges").json()["data"]] == [job.json()["id"]]
    finally:
        stop_process(api, 10)
    assert "DRMERGE_AUTH=disabled" in (tmp_path / "api.log").read_text()


def test_api_without_a_pepper_refuses_to_start(redis_server, s3_server, tmp_path):
    from drmerge_ops.processes import StackError, service_env, start_api
    from tests.support.servers import free_port

    env = service_env(redis_server.url, s3_server.env(), queue="nopepper")
    env["DRMERGE_API_KEY_PEPPER"] = ""
    with pytest.raises(StackError, match="DRMERGE_API_KEY_PEPPER"):
        start_api(env, free_port(), str(tmp_path / "api.log"), timeout=60)

"""Reading jobs over real HTTP (uvicorn, Redis, a worker, S3): ETag revalidation, list
filters, unknown query parameters refused, the server-sent event stream and its resume,
presigned download links, and docs that need no CDN."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx

from drmerge_client.sse import parse as parse_sse
from tests.e2e.test_service_api import assert_problem, spec


def _tenant_client(stack):
    """A client of a tenant of its own, so listings see only this test's jobs."""
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    return stack.client(stack.new_key(tenant))


def _submit(c, **body) -> dict:
    r = c.post("/v1/merges", json={"spec": spec(), **body})
    assert r.status_code == 202, r.text
    return r.json()


# ------------------------------------------------------------------------- ETag / 304


def test_job_and_list_reads_revalidate_with_etags(idle_stack):
    with _tenant_client(idle_stack) as c:
        job = _submit(c)
        r = c.get(f"/v1/merges/{job['id']}")
        etag = r.headers["etag"]
        assert r.status_code == 200 and re.fullmatch(r'"[0-9a-f]{32}"', etag)
        assert "no-cache" in r.headers["cache-control"] and "authorization" in r.headers["vary"].lower()
        same = c.get(f"/v1/merges/{job['id']}", headers={"if-none-match": etag})
        assert same.status_code == 304 and same.content == b"" and same.headers["etag"] == etag
        assert c.get(f"/v1/merges/{job['id']}", headers={"if-none-match": f'"x", W/{etag}'}).status_code == 304
        listed = c.get("/v1/merges")
        assert listed.status_code == 200 and c.get("/v1/merges", headers={
            "if-none-match": listed.headers["etag"]}).status_code == 304
        # A change makes a new tag: the poller gets the new state.
        assert c.post(f"/v1/merges/{job['id']}/cancel").status_code == 200
        changed = c.get(f"/v1/merges/{job['id']}", headers={"if-none-match": etag})
        assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
        assert changed.headers["etag"] != etag
        assert c.get("/v1/merges", headers={"if-none-match": listed.headers["etag"]}).status_code == 200


# ------------------------------------------------------------------------- list filters


def test_list_filters_by_metadata_and_creation_time(idle_stack):
    with _tenant_client(idle_stack) as c:
        a = _submit(c, metadata={"team": "nlp", "run": "1"})
        b = _submit(c, metadata={"team": "nlp", "run": "2"})
        time.sleep(0.01)
        cut = datetime.now(timezone.utc)
        time.sleep(0.01)
        d = _submit(c, metadata={"team": "vision", "run": "1"})

        def ids(**params):
            r = c.get("/v1/merges", params=params)
            assert r.status_code == 200, r.text
            return [j["id"] for j in r.json()["data"]]

        assert ids() == [d["id"], b["id"], a["id"]]
        assert ids(**{"metadata[team]": "nlp"}) == [b["id"], a["id"]]
        assert ids(**{"metadata[team]": "nlp", "metadata[run]": "1"}) == [a["id"]]
        assert ids(**{"metadata[team]": "nobody"}) == []
        assert ids(created_after=cut.isoformat()) == [d["id"]]
        assert ids(created_before=cut.isoformat()) == [b["id"], a["id"]]
        # A job's own created_at bounds it: at-or-after includes it, before excludes it.
        assert ids(created_after=b["created_at"], created_before=d["created_at"]) == [b["id"]]
        assert ids(created_before=(cut - timedelta(days=1)).isoformat()) == []
        # Filters and the cursor go together: page by page, nothing lost or repeated.
        first = c.get("/v1/merges", params={"metadata[team]": "nlp", "limit": 1}).json()
        assert first["has_more"] and [j["id"] for j in first["data"]] == [b["id"]]
        rest = ids(**{"metadata[team]": "nlp", "limit": 1, "after": first["next_after"]})
        assert rest == [a["id"]]
        assert ids(status="cancelled", **{"metadata[team]": "nlp"}) == []
        assert_problem(c.get("/v1/merges", params={"created_after": "yesterday"}), 422, "invalid_request",
                       "created_after")
        assert_problem(c.get("/v1/merges?metadata[a][b]=1"), 422, "invalid_request", "metadata[a][b]")


def test_unknown_query_parameters_are_refused_by_name(idle_stack):
    with _tenant_client(idle_stack) as c:
        job = _submit(c)
        body = assert_problem(c.get("/v1/merges", params={"stauts": "failed"}), 422, "invalid_request", "stauts")
        assert "unknown query parameter" in body["detail"] and "status" in body["detail"]
        for path in (f"/v1/merges/{job['id']}", f"/v1/merges/{job['id']}/events", "/livez", "/readyz",
                     "/metrics"):
            assert_problem(c.get(path, params={"verbose": "1"}), 422, "invalid_request", "verbose")
        assert_problem(c.post(f"/v1/merges/{job['id']}/cancel?force=true"), 422, "invalid_request", "force")
        assert_problem(c.post("/v1/merges?dry_run=1", json={"spec": spec()}), 422, "invalid_request", "dry_run")
        assert c.get(f"/v1/merges/{job['id']}/events", params={"after": 0, "limit": 5}).status_code == 200


# ------------------------------------------------------------------------- event stream


def _read_stream(c, job_id: str, headers=None, timeout: float = 120.0) -> list:
    """Every server-sent event until the server closes the stream."""
    out = []
    with c.stream("GET", f"/v1/merges/{job_id}/events", headers={"accept": "text/event-stream", **(headers or {})},
                  timeout=httpx.Timeout(30, read=timeout)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        for msg in parse_sse(r.iter_lines()):
            out.append(msg)
    return out


def test_event_stream_carries_progress_and_state_changes_then_ends(service_stack, slow_family):
    job = service_stack.submit(slow_family.spec("merged/sse/"))
    with service_stack.client(service_stack.api_key) as c:
        msgs = _read_stream(c, job["id"])
    logged = [m for m in msgs if m.id is not None]
    ids = [int(m.id) for m in logged]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] == 1
    for m in logged:
        ev = json.loads(m.data)
        assert ev["type"] == m.event and ev["id"] == int(m.id) and ev["at"].endswith("Z")
    states = [json.loads(m.data)["to"] for m in logged if m.event == "status"]
    assert states[0] == "queued" and "running" in states and states[-1] == "succeeded"
    progress = [json.loads(m.data) for m in msgs if m.event == "progress"]
    fractions = [p["progress"]["fraction"] for p in progress]
    assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions), fractions
    assert progress[-1]["status"] == "succeeded"
    assert msgs[-1].event == "end"
    final = json.loads(msgs[-1].data)
    assert final["id"] == job["id"] and final["status"] == "succeeded" and final["result"]["files"]
    # Resumed after event 2: exactly the later events, then the end again.
    with service_stack.client(service_stack.api_key) as c:
        again = _read_stream(c, job["id"], headers={"last-event-id": "2"}, timeout=30)
    assert [int(m.id) for m in again if m.id is not None] == [i for i in ids if i > 2]
    assert again[-1].event == "end"
    # Another tenant's job is not there, streamed or not.
    with service_stack.client(service_stack.new_key(f"other-{uuid.uuid4().hex[:6]}")) as other:
        r = other.get(f"/v1/merges/{job['id']}/events", headers={"accept": "text/event-stream"})
        assert_problem(r, 404, "not_found")


# ------------------------------------------------------------------------- downloads


def test_presigned_download_links_of_a_succeeded_job(service_stack, family):
    job = service_stack.submit(family.spec("merged/downloads/"))
    done = service_stack.wait(job["id"])
    assert done["status"] == "succeeded"
    r = service_stack.http.get(f"/v1/merges/{job['id']}/files")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["expires_in"] == service_stack.settings.download_url_ttl_s
    names = [f["name"] for f in done["result"]["files"]]
    assert [d["name"] for d in body["data"]] == names and "model.safetensors" in names
    for link in body["data"]:
        assert link["url"].startswith(service_stack.settings.s3_endpoint_url)
        assert "X-Amz-Expires=900" in link["url"] and "X-Amz-Signature=" in link["url"]
        got = httpx.get(link["url"], timeout=30)  # no API key, no S3 credentials: the URL is the permission
        assert got.status_code == 200, got.text
        assert hashlib.sha256(got.content).hexdigest() == link["sha256"] and len(got.content) == link["size"]
    tampered = body["data"][0]["url"].replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(tampered, timeout=30).status_code == 403
    with service_stack.client(service_stack.new_key(f"other-{uuid.uuid4().hex[:6]}")) as other:
        assert_problem(other.get(f"/v1/merges/{job['id']}/files"), 404, "not_found")


def test_no_download_links_before_success(idle_stack):
    with _tenant_client(idle_stack) as c:
        job = _submit(c)
        body = assert_problem(c.get(f"/v1/merges/{job['id']}/files"), 409, "job_not_succeeded")
        assert body["job_status"] == "queued"


# ------------------------------------------------------------------------- offline docs


def test_docs_load_their_assets_from_the_api_itself(idle_stack):
    for page in ("/docs", "/redoc"):
        r = httpx.get(idle_stack.api_url + page, timeout=30)
        assert r.status_code == 200
        refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert refs and not re.search(r"https?://", r.text), r.text  # nothing from outside
        for ref in refs:
            asset = httpx.get(idle_stack.api_url + ref, timeout=30)
            assert asset.status_code == 200 and len(asset.content) > 1000, ref

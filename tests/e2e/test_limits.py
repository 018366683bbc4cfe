"""Request limits through the real API process (``strict_stack``: 64 KiB bodies, 4 models,
300-character strings, 3 queued jobs per tenant; ``idle_stack``: the defaults). Every
refusal is problem+json with a code and, where there is one, the param; none is a 500."""

from __future__ import annotations

import json
import uuid

import pytest

from service.limits import json_depth_exceeds
from tests.e2e.test_service_api import assert_problem, spec
from tests.support.stack import STRICT_LIMITS


def tenant() -> str:
    return f"lim-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(strict_stack):
    with strict_stack.client(strict_stack.new_key(tenant())) as c:
        yield c


def test_a_body_over_the_limit_is_413_from_its_content_length(client):
    big = {"spec": spec(), "metadata": {"pad": "x" * 500}, "padding": "y" * STRICT_LIMITS["max_body_bytes"]}
    r = client.post("/v1/merges", json=big)
    body = assert_problem(r, 413, "payload_too_large")
    assert str(STRICT_LIMITS["max_body_bytes"]) in body["detail"]


def test_a_chunked_body_is_counted_as_it_arrives(client):
    def chunks():
        yield b'{"spec": {"models": ["'
        for _ in range(100):
            yield b"a" * 1024  # 100 KiB in all, with no Content-Length
        yield b'"]}}'

    r = client.post("/v1/merges", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "payload_too_large")


def test_a_body_just_under_the_limit_is_judged_on_its_merits(client):
    padding = STRICT_LIMITS["max_body_bytes"] - 2000
    r = client.post("/v1/merges", json={"spec": spec(), "metadata": {"k": "v"}, "pad": "x" * padding})
    assert_problem(r, 422, "invalid_request", "pad")


def test_too_many_models_is_422_with_the_param(client, idle_stack):
    models = [{"model": f"s3://bkt-models/ft-{i}/"} for i in range(STRICT_LIMITS["max_models"] + 1)]
    body = assert_problem(client.post("/v1/merges", json={"spec": spec(models=models)}), 422, "invalid_spec",
                          "spec.models")
    assert "at most 4 models" in body["detail"]
    ok = client.post("/v1/merges", json={"spec": spec(models=models[:4])})
    assert ok.status_code == 202, ok.text
    # 10,000 models against the defaults (16 models, 1 MiB): refused, fast, with the param
    many = [{"model": f"s3://bkt-models/ft-{i}/"} for i in range(10_000)]
    r = idle_stack.http.post("/v1/merges", json={"spec": spec(models=many)})
    body = assert_problem(r, 422, "invalid_spec", "spec.models")
    assert "at most 16 models" in body["detail"] and "10000" in body["detail"]


@pytest.mark.parametrize("changes, param", [
    ({"output": "s3://bkt-models/" + "o" * 400 + "/"}, "spec.output"),
    ({"models": [{"model": "s3://bkt-models/" + "m" * 400 + "/"}]}, "spec.models[0].model"),
    ({"select": {"linear": [".*weight$", "a" * 301]}}, "spec.select.linear[1]"),
    ({"method": "m" * 5000}, "spec.method"),
])
def test_long_strings_in_a_spec_are_422_with_the_param(client, changes, param):
    body = assert_problem(client.post("/v1/merges", json={"spec": spec(**changes)}), 422, "invalid_spec", param)
    assert "at most 300 characters" in body["detail"]


def test_long_keys_in_a_spec_are_refused(client):
    r = client.post("/v1/merges", json={"spec": spec(**{"k" * 400: 1})})
    assert_problem(r, 422, "invalid_spec")


@pytest.mark.parametrize("depth", [40, 1_000, 10_000])
def test_deeply_nested_json_is_422_not_a_crash(client, depth):
    for body in ('{"spec": ' + "[" * depth + "]" * depth + "}", '{"metadata": ' + '{"a":' * depth + "1"
                 + "}" * depth + "}"):
        r = client.post("/v1/merges", content=body.encode(), headers={"content-type": "application/json"})
        detail = assert_problem(r, 422, "invalid_request")["detail"]
        assert "nested deeper" in detail


def test_half_a_million_levels_within_the_default_body_limit(idle_stack):
    depth = 500_000  # 1 MB of brackets: Python's own parser would hit its recursion limit
    r = idle_stack.http.post("/v1/merges", content=b'{"spec":' + b"[" * depth + b"]" * (depth - 10),
                             headers={"content-type": "application/json"})
    assert_problem(r, 422, "invalid_request")


def test_brackets_inside_strings_do_not_count_as_nesting(client):
    r = client.post("/v1/merges", json={"spec": spec(), "metadata": {"note": "[[[[{{{{" * 20 + '\\"]]'}})
    assert r.status_code == 202, r.text
    assert not json_depth_exceeds(json.dumps({"a": "[" * 100}).encode(), 3)
    assert json_depth_exceeds(b'[[[["]]]]"]]]]', 3) and not json_depth_exceeds(b'[[["[[["]]]', 3)


def test_metadata_limits_and_unicode_round_trip(client):
    meta = {"équipe": "nlp-研究", "emoji": "🚀" * 100, "rtl": "\u202eabc"}
    r = client.post("/v1/merges", json={"spec": spec(output="s3://bkt-models/out/ü-" + uuid.uuid4().hex + "/"),
                                        "metadata": meta})
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/merges/{r.json()['id']}").json()
    assert job["metadata"] == meta and "/ü-" in job["spec"]["output"]
    assert_problem(client.post("/v1/merges", json={"spec": spec(), "metadata": {"k" * 65: "v"}}), 422,
                   "invalid_request")
    assert_problem(client.post("/v1/merges", json={"spec": spec(), "metadata": {"k": "v" * 513}}), 422,
                   "invalid_request", "metadata.k")
    assert_problem(client.post("/v1/merges", json={"spec": spec(), "metadata": {f"k{i}": "v" for i in range(17)}}),
                   422, "invalid_request", "metadata")


def test_oversized_headers_and_ids_are_problems(client):
    assert_problem(client.post("/v1/merges", json={"spec": spec()}, headers={"Idempotency-Key": "k" * 256}), 422,
                   "invalid_request", "Idempotency-Key")
    assert_problem(client.get("/v1/merges/mrg_" + "z" * 5000), 404, "not_found")
    assert_problem(client.get("/v1/merges/mrg_x/events", params={"after": str(10 ** 30)}), 404, "not_found")
    assert_problem(client.get("/v1/merges", params={"limit": str(10 ** 30)}), 422, "invalid_request", "limit")


def test_queued_jobs_per_tenant_are_capped_with_429_and_retry_after(strict_stack):
    limit = STRICT_LIMITS["max_queued_per_tenant"]
    with strict_stack.client(strict_stack.new_key(tenant())) as a, \
            strict_stack.client(strict_stack.new_key(tenant())) as b:
        first = {"spec": spec()}
        ids = [a.post("/v1/merges", json=first, headers={"Idempotency-Key": "first"}).json()["id"]]
        ids += [a.post("/v1/merges", json={"spec": spec()}).json()["id"] for _ in range(limit - 1)]
        r = a.post("/v1/merges", json={"spec": spec()})
        body = assert_problem(r, 429, "quota_exceeded")
        assert int(r.headers["retry-after"]) > 0 and body["limit"] == limit and f"{limit} queued" in body["detail"]
        # a retry of a job already accepted is not a new job: it still comes back
        again = a.post("/v1/merges", json=first, headers={"Idempotency-Key": "first"})
        assert again.status_code == 202 and again.json()["id"] == ids[0]
        # the quota is the tenant's own: another tenant is unaffected
        assert b.post("/v1/merges", json={"spec": spec()}).status_code == 202
        # a job that leaves the queue frees its place
        assert a.post(f"/v1/merges/{ids[1]}/cancel").status_code == 200
        assert a.post("/v1/merges", json={"spec": spec()}).status_code == 202
        assert_problem(a.post("/v1/merges", json={"spec": spec()}), 429, "quota_exceeded")
    assert len([j for j in strict_stack.store.list(limit=100, tenant=None)[0] if j.id in ids]) == limit


def test_the_queue_quota_holds_under_concurrent_submits(strict_stack):
    from concurrent.futures import ThreadPoolExecutor

    key = strict_stack.new_key(tenant())

    def submit(_):
        with strict_stack.client(key) as c:
            return c.post("/v1/merges", json={"spec": spec()}).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(submit, range(12)))
    assert codes.count(202) == STRICT_LIMITS["max_queued_per_tenant"] and codes.count(429) == 12 - codes.count(202)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:9/hook", "https"),
    ("https://127.0.0.1:9/hook", "loopback"),
    ("https://localhost/hook", "loopback"),
    ("https://2130706433/hook", "loopback"),
    ("https://169.254.169.254/latest/meta-data/iam/", "metadata"),
    ("https://[::ffff:10.0.0.1]/hook", "private"),
    ("https://10.0.0.8/hook", "private"),
    ("https://no-such-host.invalid/hook", "does not resolve"),
])
def test_webhooks_to_non_public_places_are_refused_at_submit(strict_stack, url, why):
    name = tenant()
    with strict_stack.client(strict_stack.new_key(name)) as c:
        body = assert_problem(c.post("/v1/merges", json={"spec": spec(), "webhook": {"url": url}}), 422,
                              "invalid_request", "webhook.url")
    assert why in body["detail"]
    assert strict_stack.store.r.zcard(strict_stack.store.keys.tenant(name)) == 0


def test_wrong_content_types_and_methods_are_problems_not_crashes(client):
    for r in (client.post("/v1/merges", content=b"spec=1", headers={"content-type": "text/plain"}),
              client.post("/v1/merges", content=b"\xff\xfe{", headers={"content-type": "application/json"}),
              client.post("/v1/merges", content=b"", headers={"content-type": "application/json"}),
              client.post("/v1/merges", content=b"null", headers={"content-type": "application/json"}),
              client.post("/v1/merges", content=b'{"spec": {"output": "\\ud800"}}',
                          headers={"content-type": "application/json"}),
              client.put("/v1/merges"), client.patch("/v1/merges/mrg_x")):
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")

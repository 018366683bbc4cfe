"""The HTTP API through a real uvicorn process whose queue no worker consumes (jobs stay
queued): validation and problem+json, idempotency, listing, cancel of queued jobs,
probes, metrics, docs."""

from __future__ import annotations

import uuid

import pytest

from drmerge import methods

PROBLEM = "application/problem+json"


def spec(output: str | None = None, **kw) -> dict:
    s = {"base_model": "s3://bkt-models/base/",
         "models": [{"model": "s3://bkt-models/ft-a/"}, {"model": "s3://bkt-models/ft-b/", "weight": 0.5}],
         "method": "drm", "output": output or f"s3://bkt-models/out/{uuid.uuid4().hex}/"}
    s.update(kw)
    return s


def assert_problem(r, status: int, code: str, param=...):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"].endswith("/" + code) and body["title"] and body["detail"]
    if param is not ...:
        assert body["param"] == param, body
    return body


# ------------------------------------------------------------------ submit and read


def test_submit_returns_202_and_a_queued_job(idle_stack):
    r = idle_stack.http.post("/v1/merges", json={"spec": spec(), "metadata": {"team": "nlp"}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["id"].startswith("mrg_") and job["object"] == "merge" and job["status"] == "queued"
    assert r.headers["location"] == f"/v1/merges/{job['id']}"
    assert job["metadata"] == {"team": "nlp"} and job["started_at"] is None and job["result"] is None
    # the spec comes back normalized: defaults filled in, weights as floats
    assert job["spec"]["parameters"]["drop_rate"] == 0.8 and job["spec"]["models"][0]["weight"] == 1.0
    assert job["progress"] == {"stage": None, "tensors_done": 0, "tensors_total": 0, "bytes_read": 0,
                               "bytes_written": 0, "fraction": 0.0, "eta_seconds": None}
    got = idle_stack.http.get(f"/v1/merges/{job['id']}")
    assert got.status_code == 200 and got.json() == job
    # the message reached the broker queue (nobody consumes it here)
    assert idle_stack.store.r.llen(idle_stack.settings.queue) >= 1


def test_unknown_and_malformed_ids_are_404(idle_stack):
    for path in ("/v1/merges/mrg_01aaaaaaaaaaaaaaaaaaaaaaaa", "/v1/merges/nope", "/v1/merges/mrg_x/events"):
        assert_problem(idle_stack.http.get(path), 404, "not_found")
    assert_problem(idle_stack.http.post("/v1/merges/mrg_01aaaaaaaaaaaaaaaaaaaaaaaa/cancel"), 404, "not_found")
    assert_problem(idle_stack.http.get("/v2/nothing"), 404, "not_found")
    assert_problem(idle_stack.http.delete("/v1/merges"), 405, "method_not_allowed")


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("body, param", [
    ({"spec": spec(parameters={"drop_rate": 1.5})}, "spec.parameters.drop_rate"),
    ({"spec": spec(parameters={"direction": "diagonal"})}, "spec.parameters.direction"),
    ({"spec": spec(parameters={"drop_rat": 0.5})}, "spec.parameters.drop_rat"),
    ({"spec": spec(method="magic")}, "spec.method"),
    ({"spec": spec(models=[])}, "spec.models"),
    ({"spec": spec(models=[{"model": "s3://bkt-models/a/", "weight": "heavy"}])}, "spec.models[0].weight"),
    ({"spec": spec(models=[{"model": "s3://bkt-models/a/"}, {"model": "gs://b/c/"}])}, "spec.models[1].model"),
    ({"spec": spec(output="s3://bkt-models/base/")}, "spec.output"),
    ({"spec": {k: v for k, v in spec().items() if k != "output"}}, "spec.output"),
    ({"spec": spec(unknown_key=1)}, "spec.unknown_key"),
    ({"spec": spec(output="/tmp/merged")}, "spec.output"),  # local paths: refused by the service
    ({"spec": spec(base_model="./base")}, "spec.base_model"),
    ({"spec": "base_model: x"}, "spec"),
    ({"metadata": {}}, "spec"),
])
def test_invalid_specs_are_422_invalid_spec_with_param(idle_stack, body, param):
    assert_problem(idle_stack.http.post("/v1/merges", json=body), 422, "invalid_spec", param)


@pytest.mark.parametrize("method", list(methods.names()))
def test_parameters_of_another_method_are_422_naming_the_key(idle_stack, method):
    """Every method validates its own parameters (drmerge/methods): one that belongs to
    another method is refused, never ignored, for every method and every such key."""
    own = set(methods.get(method).Params.model_fields)
    others = {k: v for m in methods.all_methods() for k, v in m.Params().model_dump().items() if k not in own}
    assert others
    for key, value in sorted(others.items()):
        body = {"spec": spec(method=method, parameters={key: value})}
        problem = assert_problem(idle_stack.http.post("/v1/merges", json=body), 422, "invalid_spec",
                                 f"spec.parameters.{key}")
        assert f"does not apply to method {method!r}" in problem["detail"], problem


def test_base_model_is_optional_only_for_linear_and_adapter_output(idle_stack):
    """The engine's rule (spec.parse_spec), over HTTP: an adapter output (LoRA adapters
    merged into one adapter) needs no base; a full-output DRM merge does."""
    no_base = {k: v for k, v in spec().items() if k != "base_model"}
    job = idle_stack.submit(dict(no_base, output_format="adapter", adapter_rank=16))
    assert job["status"] == "queued" and job["spec"]["base_model"] is None
    assert job["spec"]["output_format"] == "adapter" and job["spec"]["adapter_rank"] == 16
    job = idle_stack.submit(dict(no_base, method="linear", output=f"s3://bkt-models/out/{uuid.uuid4().hex}/"))
    assert job["spec"]["base_model"] is None
    for body in (no_base, dict(no_base, output_format="full"), dict(no_base, method="ties")):
        problem = assert_problem(idle_stack.http.post("/v1/merges", json={"spec": body}), 422, "invalid_spec",
                                 "spec.base_model")
        assert problem["detail"].startswith("base_model: is required for method") and "adapter" in problem["detail"]


def test_openapi_spec_schema_agrees_on_base_model(idle_stack):
    jsonschema = pytest.importorskip("jsonschema")
    schema = idle_stack.http.get("/openapi.json").json()["components"]["schemas"]["MergeRequest"]["properties"]["spec"]
    assert "output_format: adapter" in schema["properties"]["base_model"]["description"]
    no_base = {k: v for k, v in spec().items() if k != "base_model"}
    for ok in (spec(), dict(no_base, output_format="adapter"), dict(no_base, method="linear")):
        jsonschema.validate(ok, schema)
    for bad in (no_base, dict(no_base, output_format="full")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("body, param", [
    ({"spec": spec(), "extra": True}, "extra"),
    ({"spec": spec(), "metadata": {"n": 1}}, "metadata.n"),
    ({"spec": spec(), "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"spec": spec(), "metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"spec": spec(), "webhook": {"url": "ftp://x.example/h"}}, "webhook.url"),
    # IPv4-translated and other ::/8 spellings of metadata and private addresses (SSRF)
    ({"spec": spec(), "webhook": {"url": "https://[::ffff:0:a9fe:a9fe]/h", "secret": "x" * 16}}, "webhook.url"),
    ({"spec": spec(), "webhook": {"url": "https://[::1:a9fe:a9fe]/h", "secret": "x" * 16}}, "webhook.url"),
    ({"spec": spec(), "webhook": {"url": "https://[0:0:1::a00:1]/h", "secret": "x" * 16}}, "webhook.url"),
    ({"spec": spec(), "webhook": {"url": "http://127.0.0.1:9/h", "secret": "short"}}, "webhook.secret"),
    ({"spec": spec(), "webhook": {"url": "http://127.0.0.1:9/h", "secret": "whsec_###notbase64###"}},
     "webhook.secret"),
    ({"spec": spec(), "webhook": {"url": "http://127.0.0.1:9/h", "sekret": "x" * 10}}, "webhook.sekret"),
])
def test_invalid_requests_are_422_invalid_request(idle_stack, body, param):
    assert_problem(idle_stack.http.post("/v1/merges", json=body), 422, "invalid_request", param)


def test_body_that_is_not_json_is_a_problem(idle_stack):
    r = idle_stack.http.post("/v1/merges", content=b"{not json", headers={"content-type": "application/json"})
    body = assert_problem(r, 422, "invalid_request")
    assert "JSON" in body["detail"]


def test_bad_query_parameters_are_problems(idle_stack):
    assert_problem(idle_stack.http.get("/v1/merges", params={"limit": 0}), 422, "invalid_request", "limit")
    assert_problem(idle_stack.http.get("/v1/merges", params={"limit": 101}), 422, "invalid_request", "limit")
    assert_problem(idle_stack.http.get("/v1/merges", params={"status": "done"}), 422, "invalid_request", "status")
    assert_problem(idle_stack.http.get("/v1/merges", params={"after": "x"}), 422, "invalid_request", "after")


# ---------------------------------------------------------------------- idempotency


def test_same_idempotency_key_and_body_gives_the_same_job(idle_stack):
    key = f"key-{uuid.uuid4()}"
    body = {"spec": spec(), "metadata": {"a": "1"}}
    first = idle_stack.http.post("/v1/merges", json=body, headers={"Idempotency-Key": key})
    again = idle_stack.http.post("/v1/merges", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in first.headers
    assert len(idle_stack.store.list(limit=100)[0]) == len({j.id for j in idle_stack.store.list(limit=100)[0]})
    # key order in the JSON does not matter
    reordered = {"metadata": {"a": "1"}, "spec": dict(reversed(list(body["spec"].items())))}
    third = idle_stack.http.post("/v1/merges", json=reordered, headers={"Idempotency-Key": key})
    assert third.json()["id"] == first.json()["id"]


def test_same_idempotency_key_with_another_body_is_422(idle_stack):
    key = f"key-{uuid.uuid4()}"
    first = idle_stack.http.post("/v1/merges", json={"spec": spec()}, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    r = idle_stack.http.post("/v1/merges", json={"spec": spec()}, headers={"Idempotency-Key": key})
    body = assert_problem(r, 422, "idempotency_key_reused", "Idempotency-Key")
    assert first.json()["id"] in body["detail"]


def test_a_second_active_job_on_the_same_output_is_409(idle_stack):
    out = f"s3://bkt-models/out/{uuid.uuid4().hex}/"
    first = idle_stack.submit(spec(out))
    body = assert_problem(idle_stack.http.post("/v1/merges", json={"spec": spec(out)}), 409, "output_busy",
                          "spec.output")
    assert body["job_id"] == first["id"]
    idle_stack.http.post(f"/v1/merges/{first['id']}/cancel")
    assert idle_stack.http.post("/v1/merges", json={"spec": spec(out)}).status_code == 202


# --------------------------------------------------------------------------- listing


def test_list_pagination_and_status_filter(idle_stack):
    ids = [idle_stack.submit(spec())["id"] for _ in range(5)]
    cancelled = ids[1]
    assert idle_stack.http.post(f"/v1/merges/{cancelled}/cancel").status_code == 200
    page = idle_stack.http.get("/v1/merges", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] and len(page["data"]) == 2
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    assert page["next_after"] == ids[-2]
    seen = []
    after = None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = idle_stack.http.get("/v1/merges", params=params).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
    assert seen[:5] == ids[::-1]  # newest first, no gaps, no repeats
    assert len(seen) == len(set(seen))
    only = idle_stack.http.get("/v1/merges", params={"status": "cancelled", "limit": 100}).json()["data"]
    assert cancelled in [j["id"] for j in only] and all(j["status"] == "cancelled" for j in only)
    queued = idle_stack.http.get("/v1/merges", params={"status": "queued", "limit": 100}).json()["data"]
    assert cancelled not in [j["id"] for j in queued] and set(ids) - {cancelled} <= {j["id"] for j in queued}


# --------------------------------------------------------------------------- cancel


def test_cancel_a_queued_job_is_immediate_and_final(idle_stack):
    job = idle_stack.submit(spec())
    r = idle_stack.http.post(f"/v1/merges/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] and r.json()["started_at"] is None
    again = idle_stack.http.post(f"/v1/merges/{job['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    events = idle_stack.http.get(f"/v1/merges/{job['id']}/events").json()
    assert [(e["type"], e.get("from"), e.get("to")) for e in events["data"]] == [
        ("status", None, "queued"), ("status", "queued", "cancelled")]
    assert events["data"][0]["at"].endswith("Z") and not events["has_more"]


def test_cancel_a_finished_job_is_409(idle_stack):
    job = idle_stack.submit(spec())
    store = idle_stack.store
    store.transition(job["id"], "running", attempt=0, fields={"attempts": 1})
    store.transition(job["id"], "failed", fields={"error": {"code": "input_not_found", "message": "m", "param": None}})
    body = assert_problem(idle_stack.http.post(f"/v1/merges/{job['id']}/cancel"), 409, "job_not_cancellable")
    assert "failed" in body["detail"]


# ------------------------------------------------------------------------ webhooks


def test_webhook_secret_is_write_only(idle_stack):
    secret = "whsec_" + "bXktdmVyeS1zZWNyZXQta2V5"
    job = idle_stack.submit(spec(), webhook={"url": "http://127.0.0.1:9/x", "secret": secret})
    assert job["webhook"] == {"url": "http://127.0.0.1:9/x", "status": "waiting", "attempts": 0,
                              "last_error": None, "delivered_at": None}
    for r in (idle_stack.http.get(f"/v1/merges/{job['id']}"), idle_stack.http.get("/v1/merges?limit=100"),
              idle_stack.http.get(f"/v1/merges/{job['id']}/events")):
        assert secret not in r.text and "bXktdmVyeS1zZWNyZXQta2V5" not in r.text


# --------------------------------------------------------------------- ops endpoints


def test_livez_and_readyz(idle_stack):
    assert idle_stack.http.get("/livez").json() == {"status": "ok"}
    r = idle_stack.http.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["checks"]["redis"]["ok"] and body["checks"]["s3"]["ok"]
    assert body["workers"]["live"] == 0  # no worker on this stack, and that is not a failure


def test_metrics_use_the_dashboard_names(idle_stack):
    idle_stack.submit(spec())
    text = idle_stack.http.get("/metrics").text
    for name in ("drmerge_jobs{status=\"queued\"}", "drmerge_job_duration_seconds_bucket", "drmerge_queue_depth",
                 "drmerge_bytes_written_total", "drmerge_bytes_read_total", "drmerge_workers_live"):
        assert name in text, name
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['drmerge_jobs{status="queued"}'] >= 1
    assert values["drmerge_queue_depth"] >= 1 and values["drmerge_workers_live"] == 0


def test_openapi_and_docs(idle_stack):
    schema = idle_stack.http.get("/openapi.json").json()
    assert {"/v1/merges", "/v1/merges/{job_id}", "/v1/merges/{job_id}/cancel", "/v1/merges/{job_id}/events",
            "/livez", "/readyz", "/metrics"} <= set(schema["paths"])
    post = schema["paths"]["/v1/merges"]["post"]
    assert "202" in post["responses"] and "422" in post["responses"]
    assert any(p["name"] == "Idempotency-Key" for p in post["parameters"])
    assert "swagger" in idle_stack.http.get("/docs").text.lower()


def test_redis_outage_is_503_unavailable(s3_server, tmp_path):
    import httpx

    from drmerge_ops.processes import service_env, start_api, stop_process
    from tests.support.servers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    port = free_port()
    api = start_api(service_env(dead, s3_server.env(), queue="nowhere", api_key_pepper="p" * 32), port,
                    str(tmp_path / "api.log"))
    try:
        # A well-formed key: checking it needs Redis, so the answer is 503, not 401.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"authorization": "Bearer drm_" + "k" * 43}) as http:
            assert http.get("/livez").status_code == 200  # alive, just not ready
            r = http.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["redis"]["ok"] is False
            assert r.json()["checks"]["s3"]["ok"] is True
            body = assert_problem(http.post("/v1/merges", json={"spec": spec()}), 503, "unavailable")
            assert "Redis" in body["detail"]
            assert_problem(http.get("/v1/merges"), 503, "unavailable")
    finally:
        stop_process(api, 10)

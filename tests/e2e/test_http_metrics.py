"""HTTP request metrics and drmerge_build_info on a real API process's /metrics, by
route template (one series for every job id), and in step with what the Grafana
dashboard's validator knows (deploy/validation/grafana.py: the names and labels the
dashboard may query)."""

from __future__ import annotations

import platform

from prometheus_client.parser import text_string_to_metric_families

import drmerge
from deploy.validation.grafana import METRICS


def _scrape(stack) -> dict:
    r = stack.http.get("/metrics")
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _requests(families, **labels) -> float:
    fam = families["drmerge_http_requests"]
    return sum(s.value for s in fam.samples if s.name == "drmerge_http_requests_total"
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_requests_are_counted_and_timed_by_route_template(idle_stack):
    before = _scrape(idle_stack)
    ids = ["mrg_01aaaaaaaaaaaaaaaaaaaaaaaa", "mrg_01bbbbbbbbbbbbbbbbbbbbbbbb", "mrg_01cccccccccccccccccccccc"]
    for job_id in ids:
        assert idle_stack.http.get(f"/v1/merges/{job_id}").status_code == 404
    assert idle_stack.http.get("/v1/merges").status_code == 200
    assert idle_stack.http.get("/no/such/route").status_code == 404
    with idle_stack.client() as anonymous:
        assert anonymous.get("/v1/merges").status_code == 401
    after = _scrape(idle_stack)
    one_job = dict(handler="/v1/merges/{job_id}", method="GET", status="404")
    assert _requests(after, **one_job) - _requests(before, **one_job) == 3
    assert _requests(after, handler="/v1/merges", method="GET", status="200") - \
        _requests(before, handler="/v1/merges", method="GET", status="200") == 1
    assert _requests(after, handler="/v1/merges", status="401") - _requests(before, handler="/v1/merges", status="401") == 1
    assert _requests(after, handler="none", status="404") - _requests(before, handler="none", status="404") == 1
    handlers = {s.labels["handler"] for s in after["drmerge_http_requests"].samples}
    assert not any(i in h for h in handlers for i in ids)  # no series per job id
    duration = after["drmerge_http_request_duration_seconds"]
    counts = [s for s in duration.samples if s.name.endswith("_count") and s.labels["handler"] == "/v1/merges/{job_id}"]
    assert counts and sum(s.value for s in counts) >= 3


def test_build_info(idle_stack):
    (sample,) = _scrape(idle_stack)["drmerge_build_info"].samples
    assert sample.value == 1.0
    assert sample.labels == {"version": sample.labels["version"], "python": platform.python_version(),
                             "engine": drmerge.__version__}


def test_the_dashboards_metric_list_matches_the_exporter(idle_stack):
    families = _scrape(idle_stack)
    for name, (kind, labels) in METRICS.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert base in families, f"{name} is not exported"
        assert families[base].type == kind, (name, families[base].type)
        seen = set().union(*(set(s.labels) for s in families[base].samples)) - {"le"}
        assert seen <= labels and (seen or not labels), (name, seen, labels)

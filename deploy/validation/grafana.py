"""Grafana dashboard checks: well-formed panels whose PromQL names only metrics drmerge exports.

Each query is parsed with a real PromQL parser (promql-parser, from PyPI), after
replacing Grafana's interval variables, and every series it selects must be one of
drmerge's metrics (histograms through their _bucket/_sum/_count series), filtered only
on labels that metric has. A renamed metric or a typo then fails here, not as an empty
panel in production. The dashboard must also show each metric the service exports.
"""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser

from .yamlio import DuplicateKeyError, load_json

DASHBOARD = Path("deploy/grafana/drmerge.json")

# The service's metrics: name -> (type, labels). Keep in step with the service's exporter.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "drmerge_jobs": ("gauge", frozenset({"status"})),
    "drmerge_job_duration_seconds": ("histogram", frozenset({"status"})),
    "drmerge_queue_depth": ("gauge", frozenset()),
    "drmerge_bytes_written_total": ("counter", frozenset()),
    "drmerge_bytes_read_total": ("counter", frozenset()),
    "drmerge_workers_live": ("gauge", frozenset()),
    # Per API process (service/metrics.py: prometheus-fastapi-instrumentator and build_info).
    "drmerge_http_requests_total": ("counter", frozenset({"handler", "method", "status"})),
    "drmerge_http_request_duration_seconds": ("histogram", frozenset({"handler", "method", "status"})),
    "drmerge_build_info": ("gauge", frozenset({"version", "python", "engine"})),
}
# Labels Prometheus adds at scrape time (Kubernetes service discovery included).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "piechart", "heatmap", "text", "row"}
GRAFANA_INTERVALS = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|__interval|__range)\}")


def _series() -> dict[str, tuple[str, frozenset[str]]]:
    """Every series name a query may select, with the labels it may filter on."""
    out = {}
    for name, (kind, labels) in METRICS.items():
        if kind == "histogram":
            out[f"{name}_bucket"] = (name, labels | {"le"})
            out[f"{name}_sum"] = (name, labels)
            out[f"{name}_count"] = (name, labels)
        else:
            out[name] = (name, labels)
    return out


def selected_series(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, matcher label names) of every vector selector in a PromQL query."""
    ast = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", expr))
    found: list[tuple[str, set[str]]] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers} if node.matchers else set()
            name = node.name
            if not name:  # {__name__="..."} selectors
                name = next((m.value for m in node.matchers.matchers if m.name == "__name__"), "")
            found.append((name, labels - {"__name__"}))
        return True

    promql_parser.walk(ast, visit)
    return found


def _panels(panels: list) -> list[dict]:
    out = []
    for p in panels or []:
        out.append(p)
        out.extend(_panels(p.get("panels") or []))  # collapsed rows nest their panels
    return out


def check_dashboard(dash: dict) -> list[str]:
    problems = []
    for key in ("title", "uid", "schemaVersion", "panels"):
        if key not in dash:
            problems.append(f"dashboard has no {key}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds_var = variables.get("datasource")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append("dashboard needs a `datasource` variable of type datasource (prometheus), "
                        "so it imports into any Grafana")
    series = _series()
    seen_metrics: set[str] = set()
    ids: set[int] = set()
    for panel in _panels(dash.get("panels") or []):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if not isinstance(panel.get("id"), int) or panel["id"] in ids:
            problems.append(f"{where}: id missing or not unique")
        ids.add(panel.get("id"))
        if not panel.get("title"):
            problems.append(f"{where}: no title")
        if panel.get("type") not in PANEL_TYPES:
            problems.append(f"{where}: unknown panel type {panel.get('type')!r}")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{where}: gridPos must have integer h/w/x/y within 24 columns")
        if panel.get("type") in ("row", "text"):
            continue
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no queries")
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"{where}: datasource is not the ${{datasource}} variable")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{where}: duplicate refId")
        for t in targets:
            expr = t.get("expr")
            if not expr:
                problems.append(f"{where} {t.get('refId')}: no expr")
                continue
            try:
                selected = selected_series(expr)
            except ValueError as exc:
                problems.append(f"{where} {t.get('refId')}: PromQL does not parse ({exc}): {expr}")
                continue
            if not selected:
                problems.append(f"{where} {t.get('refId')}: selects no metric: {expr}")
            for name, labels in selected:
                if name not in series:
                    problems.append(f"{where} {t.get('refId')}: unknown metric {name!r} "
                                    f"(drmerge exports {', '.join(sorted(METRICS))})")
                    continue
                metric, allowed = series[name]
                seen_metrics.add(metric)
                for label in sorted(labels - allowed - TARGET_LABELS):
                    problems.append(f"{where} {t.get('refId')}: {name} has no label {label!r}")
    for missing in sorted(set(METRICS) - seen_metrics):
        problems.append(f"no panel shows {missing}")
    return problems


def check(root: Path) -> list[str]:
    path = root / DASHBOARD
    try:
        dash = load_json(path)
    except FileNotFoundError:
        return [f"{DASHBOARD} is missing"]
    except (ValueError, DuplicateKeyError) as exc:
        return [f"{DASHBOARD}: not valid JSON: {exc}"]
    return [f"{DASHBOARD}: {p}" for p in check_dashboard(dash)]

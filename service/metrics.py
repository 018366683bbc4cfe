"""Prometheus metrics, computed from Redis at scrape time.

Every number lives in Redis (written by the job store's Lua scripts and the workers), so
any API replica serves the same totals and nothing is lost when a process restarts.
Names are fixed: the deploy team's Grafana dashboard uses them.

- drmerge_jobs{status}                     gauge     jobs in each status
- drmerge_job_duration_seconds{status}     histogram run time (started -> finished) of ended jobs
- drmerge_queue_depth                      gauge     merge messages waiting in the broker queue
- drmerge_workers_live                     gauge     workers with a fresh heartbeat
- drmerge_bytes_read_total                 counter   checkpoint bytes read by merges
- drmerge_bytes_written_total              counter   merged bytes written

Beside them, per API process (prometheus-fastapi-instrumentator, by route template, so
``/v1/merges/{job_id}`` is one series however many jobs there are; paths that match no
route are ``handler="none"``):

- drmerge_http_requests_total{handler,method,status}             counter
- drmerge_http_request_duration_seconds{handler,method,status}   histogram (for an event
  stream: the time to its first byte, not how long it stayed open)
- drmerge_build_info{version,python,engine}                      gauge, always 1

Those count what one process served: with ``DRMERGE_API_WORKERS`` above 1, scrape each
process (one per pod, as deploy/k8s does) or sum them in Prometheus.
"""

from __future__ import annotations

import logging
import platform

import redis
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .jobs.status import STATUSES, TERMINAL
from .jobs.store import DURATION_BUCKETS, JobStore

log = logging.getLogger("drmerge.metrics")


def broker_queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Celery Redis-broker queue (kombu keeps one list per priority:
    ``queue`` itself and ``queue\\x06\\x16<n>``)."""
    names = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.llen(n)
    return sum(pipe.execute())


class RedisCollector:
    def __init__(self, store: JobStore, broker: redis.Redis, queue: str, heartbeat_ttl_s: float):
        self.store, self.broker, self.queue, self.ttl = store, broker, queue, heartbeat_ttl_s

    def describe(self):
        return []  # collected lazily, never at registration time

    def collect(self):
        try:
            counts = self.store.counts()
            stats = self.store.stats()
            live = len(self.store.workers.live(self.ttl))
            depth = broker_queue_depth(self.broker, self.queue)
        except redis.RedisError as e:
            log.warning("metrics: Redis unavailable: %s", e)
            return
        jobs = GaugeMetricFamily("drmerge_jobs", "Merge jobs by status.", labels=["status"])
        for s in STATUSES:
            jobs.add_metric([s], counts.get(s, 0))
        yield jobs
        hist = HistogramMetricFamily("drmerge_job_duration_seconds",
                                     "Run time of finished merge jobs (started to finished).", labels=["status"])
        for s in sorted(TERMINAL):
            count = int(stats.get(f"dur:{s}:count", 0))
            buckets = [(str(float(le)), int(stats.get(f"dur:{s}:{le}", 0))) for le in DURATION_BUCKETS]
            buckets.append(("+Inf", count))
            hist.add_metric([s], buckets, float(stats.get(f"dur:{s}:sum", 0.0)))
        yield hist
        yield GaugeMetricFamily("drmerge_queue_depth", "Merge messages waiting in the broker queue.", value=depth)
        yield GaugeMetricFamily("drmerge_workers_live", "Workers with a fresh heartbeat.", value=live)
        yield CounterMetricFamily("drmerge_bytes_read", "Checkpoint bytes read by merges.",
                                  value=int(stats.get("bytes_read", 0)))
        yield CounterMetricFamily("drmerge_bytes_written", "Merged checkpoint bytes written.",
                                  value=int(stats.get("bytes_written", 0)))


# Request latency buckets (seconds): API calls take milliseconds; a submit that checks
# S3 locations or a slow Redis can take seconds.
HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def instrument_http(app, registry: CollectorRegistry) -> None:
    """Count and time every HTTP answer of ``app`` into ``registry``."""
    from prometheus_fastapi_instrumentator import Instrumentator, metrics

    inst = Instrumentator(should_group_status_codes=False, should_ignore_untemplated=False,
                          should_group_untemplated=True, excluded_handlers=["/metrics"], registry=registry)
    inst.add(metrics.requests(metric_namespace="drmerge", registry=registry,
                              metric_doc="HTTP requests answered, by route template, method and status."))
    inst.add(metrics.latency(metric_namespace="drmerge", registry=registry, buckets=HTTP_LATENCY_BUCKETS,
                             should_exclude_streaming_duration=True,
                             metric_doc="Time to answer HTTP requests, by route template, method and status."))
    inst.instrument(app)


def build_info(registry: CollectorRegistry, version: str) -> None:
    """``drmerge_build_info``: which release, Python and merge engine this process runs."""
    from drmerge import __version__ as engine

    Gauge("drmerge_build_info", "The drmerge release, Python version and merge engine version of this API process.",
          labelnames=["version", "python", "engine"], registry=registry).labels(
        version=version, python=platform.python_version(), engine=engine).set(1)

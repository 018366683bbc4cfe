"""Load: many concurrent clients polling job status and listing jobs against ONE API process.

Starts its own Redis and one API process (``drmerge api``, one uvicorn worker) on
loopback, creates ``--tenants`` API keys and ``--jobs-per-tenant`` queued jobs each (no
worker: they stay queued, which is what pollers see most), then runs ``--clients``
asyncio clients for ``--duration`` seconds. Each client holds one tenant's key and, in a
loop with no pause, GETs one of its tenant's jobs (3 of 4 requests) or lists the
tenant's jobs (1 of 4, every other one filtered by status). An error is any exception or
any answer other than 200. Prints throughput and latency percentiles (and JSON with
``--json``).

    python bench/load_api.py                          # the recorded run: 200 clients, 60 s
    python bench/load_api.py --clients 50 --duration 10

Loopback only; bounded in clients, requests in flight (one per client) and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


async def run_clients(api_url: str, tenants: list[tuple[str, list[str]]], clients: int, duration: float,
                      seed: int = 0) -> dict:
    import httpx

    rnd = random.Random(seed)
    latencies: dict[str, list[float]] = {"get": [], "list": []}
    statuses: Counter = Counter()
    errors: list[str] = []
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=api_url, timeout=30, limits=limits) as http:

        async def client(i: int) -> None:
            key, jobs = tenants[i % len(tenants)]
            headers = {"authorization": f"Bearer {key}"}
            n = rnd.randrange(4)
            while time.monotonic() < deadline:
                n += 1
                if n % 4:
                    kind, path, params = "get", f"/v1/merges/{rnd.choice(jobs)}", None
                else:
                    kind, path = "list", "/v1/merges"
                    params = {"limit": 20, **({"status": "queued"} if n % 8 == 0 else {})}
                t0 = time.perf_counter()
                try:
                    r = await http.get(path, params=params, headers=headers)
                    await r.aread()
                except Exception as e:  # counted, never raised: a load run reports, it does not stop
                    errors.append(f"{kind}: {type(e).__name__}: {e}"[:200])
                    continue
                latencies[kind].append(time.perf_counter() - t0)
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    errors.append(f"{kind}: HTTP {r.status_code}: {r.text[:150]}")

        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.monotonic() - started
    every = sorted(latencies["get"] + latencies["list"])
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    out = {"clients": clients, "duration_s": round(elapsed, 1), "requests": len(every) + len(errors),
           "errors": len(errors), "error_samples": errors[:10], "statuses": dict(statuses),
           "throughput_rps": round(len(every) / elapsed, 1),
           "latency_ms": {"p50": ms(percentile(every, 50)), "p90": ms(percentile(every, 90)),
                          "p99": ms(percentile(every, 99)), "max": ms(every[-1]) if every else None,
                          "mean": ms(statistics.fmean(every)) if every else None}}
    for kind, values in latencies.items():
        values.sort()
        out[f"{kind}_latency_ms"] = {"count": len(values), "p50": ms(percentile(values, 50)),
                                     "p99": ms(percentile(values, 99))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--tenants", type=int, default=10)
    ap.add_argument("--jobs-per-tenant", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--api-log", help="copy the API's log here")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 1000 and 0 < args.duration <= 600):
        ap.error("clients 1..1000 and duration up to 600 s")

    import httpx

    from drmerge_ops.devservers import free_port, start_redis
    from drmerge_ops.processes import service_env, start_api, stop_process
    from service.keys import KeyStore
    from service.settings import Settings

    work = tempfile.mkdtemp(prefix="drmerge-load-")
    redis_srv = start_redis(os.path.join(work, "redis"))
    api = None
    try:
        pepper = os.urandom(16).hex()
        # No S3 server: nothing here reads or writes checkpoints (and /readyz is not polled).
        env = service_env(redis_srv.url, {"DRMERGE_S3_ENDPOINT_URL": "http://127.0.0.1:9"}, api_key_pepper=pepper,
                          queue="load-idle", key_prefix="load", api_deliver_webhooks=False)
        keys = KeyStore.from_settings(Settings(redis_url=redis_srv.url, api_key_pepper=pepper, key_prefix="load"))
        port = free_port()
        api = start_api(env, port, os.path.join(work, "api.log"))
        api_url = f"http://127.0.0.1:{port}"
        tenants = []
        with httpx.Client(base_url=api_url, timeout=30) as http:
            for t in range(args.tenants):
                key, _ = keys.create(f"load-{t}", allow=["s3://load-bucket"])
                jobs = []
                for _ in range(args.jobs_per_tenant):
                    spec = {"base_model": "s3://load-bucket/base/", "models": ["s3://load-bucket/a/",
                                                                              "s3://load-bucket/b/"],
                            "output": f"s3://load-bucket/out/{uuid.uuid4().hex}/"}
                    r = http.post("/v1/merges", json={"spec": spec}, headers={"authorization": f"Bearer {key}"})
                    r.raise_for_status()
                    jobs.append(r.json()["id"])
                tenants.append((key, jobs))
        import resource

        api_cpu0, own_cpu0 = process_cpu_s(api.pid), resource.getrusage(resource.RUSAGE_SELF)
        result = asyncio.run(run_clients(api_url, tenants, args.clients, args.duration))
        api_cpu1, own_cpu1 = process_cpu_s(api.pid), resource.getrusage(resource.RUSAGE_SELF)
        ok = result["requests"] - result["errors"]
        if api_cpu0 is not None and api_cpu1 is not None and ok:
            # Box-independent: what one request costs the API process, whatever else runs here.
            result["api_cpu_s"] = round(api_cpu1 - api_cpu0, 1)
            result["api_cpu_ms_per_request"] = round((api_cpu1 - api_cpu0) / ok * 1000, 2)
        result["load_generator_cpu_s"] = round(own_cpu1.ru_utime + own_cpu1.ru_stime - own_cpu0.ru_utime
                                               - own_cpu0.ru_stime, 1)
        result["setup"] = {"api_processes": 1, "uvicorn_workers": 1, "tenants": args.tenants,
                           "jobs": args.tenants * args.jobs_per_tenant, "cpus": os.cpu_count(),
                           "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        if api is not None:
            stop_process(api, 10)
        redis_srv.stop(timeout=5)
        if args.api_log:
            shutil.copy(os.path.join(work, "api.log"), args.api_log)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        lat = result["latency_ms"]
        print(f"{result['clients']} clients, {result['duration_s']} s: {result['requests']} requests, "
              f"{result['errors']} errors, {result['throughput_rps']} req/s; latency p50 {lat['p50']} ms, "
              f"p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms; API CPU "
              f"{result.get('api_cpu_ms_per_request')} ms/request; load average {result['setup']['loadavg_after']}")
        for e in result["error_samples"]:
            print("  error:", e)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

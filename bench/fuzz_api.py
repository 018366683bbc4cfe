"""Fuzz the drmerge HTTP API with Schemathesis, authenticated, and count server errors.

Starts its own Redis, SeaweedFS S3 and one API process on loopback (no worker: jobs stay
queued), creates an API key, runs ``st run`` against ``/openapi.json`` with that key, and
counts what the API answered from its own access log: every request Schemathesis sent,
and every 5xx among them. Exit status 0 only with zero 5xx and at least ``--min-requests``
requests.

    python bench/fuzz_api.py                    # the recorded run (bench/SECURITY.md)
    python bench/fuzz_api.py --max-examples 30  # quicker

tests/e2e/test_fuzz_api.py runs a reduced version of this in the test suite (marked slow).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


def st_command() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "st")
    found = here if os.path.exists(here) else shutil.which("st")
    if not found:
        raise SystemExit("schemathesis is not installed: pip install schemathesis")
    return found


def fuzz(api_url: str, api_key: str, *, max_examples: int, seed: int, workers: int = 1,
         max_time: float | None = None, report_dir: str | None = None, timeout: float = 900) -> dict:
    """Run Schemathesis against ``api_url``; returns its exit code and output tail."""
    cmd = [st_command(), "run", f"{api_url}/openapi.json", "--header", f"Authorization: Bearer {api_key}",
           "--checks", "not_a_server_error", "--max-examples", str(max_examples), "--seed", str(seed),
           "--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all", "--workers", str(workers),
           "--request-timeout", "30", "--no-shrink"]
    if max_time:
        cmd += ["--max-time", str(max_time)]
    if report_dir:
        cmd += ["--report", "junit", "--report-dir", report_dir]
    env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_TELEMETRY="false")
    started = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return {"exit_code": out.returncode, "seconds": round(time.monotonic() - started, 1),
            "output_tail": (out.stdout + out.stderr)[-4000:], "command": " ".join(cmd[:2] + cmd[2:3] + ["..."])}


def count_access_log(path: str) -> dict:
    """Requests and statuses from a uvicorn access log (``--log-level info``)."""
    statuses: Counter = Counter()
    by_route: Counter = Counter()
    server_errors = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _ACCESS.search(line)
            if not m:
                continue
            status = int(m["status"])
            statuses[status] += 1
            route = re.sub(r"mrg_[0-9a-z]{26}", "{id}", m["path"].split("?", 1)[0])
            by_route[f"{m['method']} {route}" if route.startswith("/v1") else f"{m['method']} (other)"] += 1
            if status >= 500:
                server_errors.append(line.strip()[:300])
    return {"requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
            "server_errors": len(server_errors), "server_error_lines": server_errors[:20],
            "routes": dict(by_route.most_common(12))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-examples", type=int, default=150, help="Schemathesis cases per operation and phase")
    ap.add_argument("--seed", type=int, default=20251129)
    ap.add_argument("--workers", type=int, default=1, help="Schemathesis workers (threads)")
    ap.add_argument("--min-requests", type=int, default=1000)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    from drmerge_ops.devservers import free_port, start_redis, start_seaweedfs
    from drmerge_ops.processes import service_env, start_api, stop_process
    from service.keys import KeyStore
    from service.settings import Settings

    work = tempfile.mkdtemp(prefix="drmerge-fuzz-")
    redis_srv = start_redis(os.path.join(work, "redis"))
    s3 = start_seaweedfs(os.path.join(work, "s3"))
    api = None
    try:
        pepper = os.urandom(16).hex()
        env = service_env(redis_srv.url, s3.env(), api_key_pepper=pepper, queue="fuzz-idle", key_prefix="fuzz",
                          webhook_secret="fuzz-default-signing-secret")
        env["DRMERGE_API_DELIVER_WEBHOOKS"] = "false"  # nothing is delivered from a fuzz run
        key, _ = KeyStore.from_settings(Settings(redis_url=redis_srv.url, api_key_pepper=pepper,
                                                 key_prefix="fuzz")).create("fuzz", allow=["*"])
        port = free_port()
        log_path = os.path.join(work, "api.log")
        api = start_api(env, port, log_path, log_level="info")
        result = fuzz(f"http://127.0.0.1:{port}", key, max_examples=args.max_examples, seed=args.seed,
                      workers=args.workers)
        time.sleep(0.5)  # let the last access-log lines reach the file
        result.update(count_access_log(log_path))
    finally:
        if api is not None:
            stop_process(api, 10)
        s3.stop(timeout=5)
        redis_srv.stop(timeout=5)
        shutil.rmtree(work, ignore_errors=True)
    ok = result["server_errors"] == 0 and result["requests"] >= args.min_requests
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["output_tail"][-1500:])
        print(f"\nrequests: {result['requests']}  statuses: {result['statuses']}  5xx: {result['server_errors']}  "
              f"in {result['seconds']}s")
        for line in result["server_error_lines"]:
            print("  5xx:", line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

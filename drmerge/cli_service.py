"""``drmerge`` subcommands for the service: launchers (api, worker, dev) and a client
(submit, status, wait, jobs, cancel, events) for people at a terminal.

Registered by ``drmerge.cli``. Imports stay inside the commands so that ``drmerge merge``
never pays for FastAPI, Celery or httpx.

Exit codes of client commands: 0 ok; ``wait`` (and ``submit --wait``) 0 succeeded,
1 failed, 2 cancelled; 3 the API could not be reached or refused the request. On any
failure the last stderr line is ``error: <code>: <message>``.
"""

from __future__ import annotations

import json
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_API = 0, 1, 2, 3
_WAIT_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


def register(subparsers) -> None:
    p = subparsers.add_parser("api", help="run the HTTP API (uvicorn)")
    p.add_argument("--host", help="listen address (default DRMERGE_API_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default DRMERGE_API_PORT or 8000)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (default DRMERGE_API_WORKERS or 1)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_api)

    p = subparsers.add_parser("worker", help="run a Celery merge worker (one merge at a time)")
    p.add_argument("--hostname", help="worker name (default drmerge@<host>)")
    p.add_argument("--queue", help="queue to consume (default DRMERGE_QUEUE or drmerge)")
    p.add_argument("--pool", default="threads", choices=("threads", "solo"),
                   help="threads (default): the merge runs on a pool thread (one at a time) while the main "
                        "thread keeps answering the broker, so health-check pings work mid-merge; solo runs it "
                        "on the main thread, which cannot answer pings while it merges. Forking pools are not "
                        "offered because CUDA does not survive a fork")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("dev", help="start/stop a local stack: Redis, SeaweedFS S3, API, worker")
    dev = p.add_subparsers(dest="dev_command", required=True)
    up = dev.add_parser("up", help="start the stack in the background (state in .drmerge-dev/)")
    up.add_argument("--demo", action="store_true", help="also upload demo checkpoints and run a DRM merge")
    up.add_argument("--dir", default=".drmerge-dev", help="state directory (default .drmerge-dev)")
    up.add_argument("--port", type=int, default=8000, help="API port (a free one if taken; default 8000)")
    up.set_defaults(func=cmd_dev_up)
    down = dev.add_parser("down", help="stop the stack")
    down.add_argument("--dir", default=".drmerge-dev")
    down.add_argument("--purge", action="store_true", help="also delete the state directory (data and logs)")
    down.set_defaults(func=cmd_dev_down)
    st = dev.add_parser("status", help="show what runs")
    st.add_argument("--dir", default=".drmerge-dev")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_dev_status)

    p = subparsers.add_parser("keys", help="create, list and revoke API keys (admin: talks to Redis directly)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create a key for a tenant; prints the key alone (it is shown only once)")
    kc.add_argument("--tenant", required=True, help="tenant name: lowercase letters, digits, '.', '_', '-'")
    kc.add_argument("--allow", action="append", default=[], metavar="S3_URI",
                    help="S3 location the key may read and write, s3://bucket[/prefix] (repeat; '*' for any). "
                         "Without any --allow the key can read its tenant's jobs but submit none")
    kc.add_argument("--allow-read", action="append", default=[], metavar="S3_URI",
                    help="S3 location the key may read inputs from, but never write (repeat)")
    kc.set_defaults(func=cmd_keys_create)
    kl = keys.add_parser("list", help="list keys: id, tenant, allow, created, revoked (never the keys themselves)")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_keys_list)
    kr = keys.add_parser("revoke", help="revoke a key by id (effective on its next request)")
    kr.add_argument("id")
    kr.set_defaults(func=cmd_keys_revoke)

    p = subparsers.add_parser("submit", help="submit a merge spec (YAML/JSON) to the API; prints the job id")
    p.add_argument("spec", help="spec file, or - for stdin")
    p.add_argument("--metadata", "-m", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--webhook", metavar="URL", help="POST the job here when it ends")
    p.add_argument("--webhook-secret", help="signing secret for the webhook")
    p.add_argument("--idempotency-key", help="retry-safe key (default: a fresh one)")
    p.add_argument("--overwrite", action="store_true", help="set overwrite: true in the spec")
    p.add_argument("--wait", action="store_true", help="then wait like `drmerge wait`")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="show a merge job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("wait", help="follow a job until it ends (exit 0 succeeded, 1 failed, 2 cancelled)")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 3)")
    p.add_argument("--interval", type=float, default=1.0, help="poll interval in seconds")
    p.add_argument("--json", action="store_true", help="print the final job as JSON")
    p.set_defaults(func=cmd_wait)

    p = subparsers.add_parser("jobs", help="list recent merge jobs, newest first")
    p.add_argument("--status", choices=("queued", "running", "cancelling", "succeeded", "failed", "cancelled"))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after", help="cursor: list jobs older than this id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("cancel", help="cancel a merge job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("events", help="show a merge job's event log")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)


# --- launchers ------------------------------------------------------------------------------
def cmd_api(args) -> int:
    import uvicorn

    from service.settings import get_settings

    s = get_settings()
    # SIGTERM: uvicorn stops accepting, lets in-flight requests finish (up to the timeout),
    # then runs the app's shutdown (webhook loop, reaper).
    uvicorn.run("service.app:create_app", factory=True, host=args.host or s.api_host, port=args.port or s.api_port,
                workers=args.workers or s.api_workers, log_level=args.log_level, proxy_headers=True,
                timeout_keep_alive=s.api_keep_alive_s, timeout_graceful_shutdown=s.api_shutdown_timeout_s or None)
    return 0


def cmd_worker(args) -> int:
    from service.settings import get_settings
    from worker.celery_app import celery_app

    s = get_settings()
    if s.worker_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: invalid_request: DRMERGE_WORKER_DEVICE=cuda but no CUDA device is visible", file=sys.stderr)
            return 1
    argv = ["worker", f"--queues={args.queue or s.queue}", "--concurrency=1", f"--pool={args.pool}",
            f"--loglevel={args.log_level}", "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    else:
        argv.append("--hostname=drmerge@%h")
    celery_app.worker_main(argv)
    return 0


def cmd_dev_up(args) -> int:
    from . import devstack

    return devstack.up(args.dir, demo=args.demo, api_port=args.port)


def cmd_dev_down(args) -> int:
    from . import devstack

    return devstack.down(args.dir, purge=args.purge)


def cmd_dev_status(args) -> int:
    from . import devstack

    return devstack.status(args.dir, as_json=args.json)


# --- API keys (admin) -----------------------------------------------------------------------
def _keystore():
    from service.keys import KeyStore
    from service.settings import Settings

    return KeyStore.from_settings(Settings())


def _keys_command(fn) -> int:
    """Runs a keys subcommand; configuration and Redis problems become ``error:`` lines."""
    import redis
    from pydantic import ValidationError

    from service.allowlist import AllowListError
    from service.keys import KeyStoreError

    try:
        return fn()
    except (KeyStoreError, AllowListError) as e:
        print(f"error: invalid_request: {e}", file=sys.stderr)
    except ValidationError as e:
        print(f"error: invalid_request: bad DRMERGE_* setting: {e.errors()[0].get('loc')}: "
              f"{e.errors()[0].get('msg')}", file=sys.stderr)
    except redis.RedisError as e:
        print(f"error: unavailable: cannot reach Redis (DRMERGE_REDIS_URL): {e}", file=sys.stderr)
    return EXIT_FAILED


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def cmd_keys_create(args) -> int:
    def run() -> int:
        key, rec = _keystore().create(args.tenant, allow=args.allow, allow_read=args.allow_read)
        if not rec.allow:
            print(f"note: {rec.id} has no --allow: it can read tenant {rec.tenant!r}'s jobs but submit none",
                  file=sys.stderr)
        print(f"created {rec.id} for tenant {rec.tenant!r}; the key is shown only this once:", file=sys.stderr)
        print(key)
        return EXIT_OK

    return _keys_command(run)


def cmd_keys_list(args) -> int:
    def run() -> int:
        keys = _keystore().list()
        if args.json:
            print(json.dumps([k.public() for k in keys], indent=2))
            return EXIT_OK
        if not keys:
            print("no keys")
            return EXIT_OK
        print(f"{'ID':<20}  {'TENANT':<16}  {'CREATED':<20}  {'REVOKED':<20}  ALLOW")
        for k in keys:
            allow = ", ".join(list(k.allow) + [f"{a} (read)" for a in k.allow_read]) or "-"
            print(f"{k.id:<20}  {k.tenant:<16}  {_when(k.created_at):<20}  {_when(k.revoked_at):<20}  {allow}")
        return EXIT_OK

    return _keys_command(run)


def cmd_keys_revoke(args) -> int:
    def run() -> int:
        rec = _keystore().revoke(args.id)
        if rec is None:
            print(f"error: not_found: no API key {args.id!r} (see `drmerge keys list`)", file=sys.stderr)
            return EXIT_FAILED
        print(f"{rec.id} revoked (tenant {rec.tenant!r})")
        return EXIT_OK

    return _keys_command(run)


# --- client ---------------------------------------------------------------------------------
def _client():
    from .client import Client

    return Client()


def _api_error(e) -> int:
    print(f"error: {e.code}: {e.detail}" + (f" (param: {e.param})" if e.param else ""), file=sys.stderr)
    return EXIT_API


def _run_client(fn) -> int:
    from .client import ApiError

    try:
        return fn()
    except ApiError as e:
        return _api_error(e)


def cmd_submit(args) -> int:
    from .errors import MergeError
    from .spec import parse_spec_text

    try:
        text = sys.stdin.read() if args.spec == "-" else open(args.spec, encoding="utf-8").read()
    except OSError as e:
        print(f"error: invalid_spec: cannot read {args.spec}: {e}", file=sys.stderr)
        return EXIT_FAILED
    try:
        spec = parse_spec_text(text, args.spec)
    except MergeError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    if args.overwrite:
        spec["overwrite"] = True
    metadata = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: invalid_request: --metadata wants KEY=VALUE, got {item!r}", file=sys.stderr)
            return EXIT_FAILED
        metadata[key] = value
    webhook = None
    if args.webhook:
        webhook = {"url": args.webhook, **({"secret": args.webhook_secret} if args.webhook_secret else {})}

    def run() -> int:
        with _client() as c:
            job = c.submit(spec, webhook=webhook, metadata=metadata or None, idempotency_key=args.idempotency_key)
            if args.wait:
                print(job["id"], file=sys.stderr)
                return _wait(c, job["id"], None, 1.0, args.json)
        print(json.dumps(job, indent=2) if args.json else job["id"])
        return EXIT_OK

    return _run_client(run)


def _fmt_bytes(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def describe(job: dict) -> str:
    p = job.get("progress") or {}
    lines = [f"{job['id']}  {job['status']}",
             f"  created  {job.get('created_at')}"]
    if job.get("started_at"):
        lines.append(f"  started  {job['started_at']}")
    if job.get("finished_at"):
        lines.append(f"  finished {job['finished_at']}")
    spec = job.get("spec") or {}
    lines.append(f"  method   {spec.get('method')}  models {len(spec.get('models') or [])}  output {spec.get('output')}")
    if job["status"] in ("running", "cancelling") or p.get("tensors_total"):
        eta = p.get("eta_seconds")
        lines.append(f"  progress {p.get('stage') or '-'}  {p.get('tensors_done', 0)}/{p.get('tensors_total', 0)} tensors"
                     f"  {100 * (p.get('fraction') or 0):.0f}%  read {_fmt_bytes(p.get('bytes_read'))}"
                     f"  written {_fmt_bytes(p.get('bytes_written'))}" + (f"  eta {eta:.0f}s" if eta else ""))
    if job.get("result"):
        r = job["result"]
        lines.append(f"  result   {r.get('output')}  ({len(r.get('files') or [])} files, "
                     f"{_fmt_bytes(r.get('bytes_written'))}, {r.get('seconds', 0):.1f}s)")
        for f in r.get("files") or []:
            lines.append(f"           {f['name']}  {_fmt_bytes(f['size'])}  sha256:{f['sha256'][:16]}...")
    if job.get("error"):
        e = job["error"]
        lines.append(f"  error    {e.get('code')}: {e.get('message')}" + (f" (param: {e['param']})" if e.get("param") else ""))
    if job.get("metadata"):
        lines.append("  metadata " + ", ".join(f"{k}={v}" for k, v in job["metadata"].items()))
    if job.get("webhook"):
        w = job["webhook"]
        lines.append(f"  webhook  {w['url']}  {w['status']} ({w['attempts']} attempts)")
    return "\n".join(lines)


def cmd_status(args) -> int:
    def run() -> int:
        with _client() as c:
            job = c.get(args.id)
        print(json.dumps(job, indent=2) if args.json else describe(job))
        return EXIT_OK

    return _run_client(run)


class _Bar:
    """A live one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width, self.tty = stream, width, stream.isatty()
        self.last_line = None
        self.last_print = 0.0
        self.started = time.monotonic()

    def __call__(self, job: dict) -> None:
        p = job.get("progress") or {}
        frac = p.get("fraction") or 0.0
        filled = int(frac * self.width)
        eta = p.get("eta_seconds")
        line = (f"{job['status']:<10} {(p.get('stage') or '-'):<10} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * frac:5.1f}%  {p.get('tensors_done', 0)}/{p.get('tensors_total', 0)} tensors  "
                f"{_fmt_bytes(p.get('bytes_written'))} written" + (f"  eta {eta:.0f}s" if eta else ""))
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                self.stream.write("\n")
        elif line != self.last_line and (now - self.last_print >= 5 or job["status"] in ("succeeded", "failed", "cancelled")
                                         or self.last_line is None):
            self.stream.write(line + "\n")
            self.last_print = now
        self.last_line = line
        self.stream.flush()


def _wait(c, job_id: str, timeout: float | None, interval: float, as_json: bool) -> int:
    job = c.wait(job_id, poll_s=interval, timeout=timeout, on_update=None if as_json else _Bar())
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        print(describe(job))
    if job["status"] != "succeeded":
        e = job.get("error") or {"code": "cancelled", "message": "the merge was cancelled"}
        print(f"error: {e.get('code')}: {e.get('message')}", file=sys.stderr)
    return _WAIT_EXIT[job["status"]]


def cmd_wait(args) -> int:
    def run() -> int:
        with _client() as c:
            return _wait(c, args.id, args.timeout, args.interval, args.json)

    return _run_client(run)


def cmd_jobs(args) -> int:
    def run() -> int:
        with _client() as c:
            page = c.list(status=args.status, limit=args.limit, after=args.after)
        if args.json:
            print(json.dumps(page, indent=2))
            return EXIT_OK
        if not page["data"]:
            print("no jobs")
            return EXIT_OK
        print(f"{'ID':<30}  {'STATUS':<10}  {'PROGRESS':>8}  {'CREATED':<24}  OUTPUT")
        for j in page["data"]:
            frac = (j.get("progress") or {}).get("fraction") or 0
            print(f"{j['id']:<30}  {j['status']:<10}  {100 * frac:7.0f}%  {j['created_at']:<24}  "
                  f"{(j.get('spec') or {}).get('output', '')}")
        if page.get("has_more"):
            print(f"(more: drmerge jobs --after {page['next_after']})")
        return EXIT_OK

    return _run_client(run)


def cmd_cancel(args) -> int:
    def run() -> int:
        with _client() as c:
            job = c.cancel(args.id)
        print(json.dumps(job, indent=2) if args.json else f"{job['id']}  {job['status']}")
        return EXIT_OK

    return _run_client(run)


def cmd_events(args) -> int:
    def run() -> int:
        with _client() as c:
            evs = c.events(args.id, limit=1000)
        if args.json:
            print(json.dumps(evs, indent=2))
            return EXIT_OK
        for ev in evs["data"]:
            print(f"{ev['at']}  {ev['type']:<8} {ev['message']}")
        return EXIT_OK

    return _run_client(run)

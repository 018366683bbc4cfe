"""The terminal client of the API: ``drmerge submit|status|wait|jobs|cancel|events``,
for people at a terminal and for scripts (drmerge_client does the HTTP).

Exit codes (drmerge_ops.exits): 0 ok; ``wait`` (and ``submit --wait``) 0 succeeded,
1 failed, 2 cancelled; 3 the API could not be reached or refused the request. On any
failure the last stderr line is ``error: <code>: <message>``.
"""

from __future__ import annotations

import json
import sys
import time

from service.jobs.status import OWNED, STATUSES, TERMINAL, JobStatus

from .exits import EXIT_API, EXIT_FAILED, EXIT_OK, WAIT_EXIT


def register(subparsers) -> None:
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
    p.add_argument("--status", choices=[str(s) for s in STATUSES])
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



def _client():
    from drmerge_client import Client

    return Client()


def _api_error(e) -> int:
    print(f"error: {e.code}: {e.detail}" + (f" (param: {e.param})" if e.param else ""), file=sys.stderr)
    return EXIT_API


def _run_client(fn) -> int:
    from drmerge_client import ApiError

    try:
        return fn()
    except ApiError as e:
        return _api_error(e)


def cmd_submit(args) -> int:
    from drmerge.errors import MergeError
    from drmerge.spec import parse_spec_text

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
    if job["status"] in OWNED or p.get("tensors_total"):
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


class ProgressLine:
    """A job's live one-line progress bar on stderr (plain lines when not a terminal);
    the ``on_update`` of ``Client.wait``."""

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
            if job["status"] in TERMINAL:
                self.stream.write("\n")
        elif line != self.last_line and (now - self.last_print >= 5 or job["status"] in TERMINAL
                                         or self.last_line is None):
            self.stream.write(line + "\n")
            self.last_print = now
        self.last_line = line
        self.stream.flush()


def _wait(c, job_id: str, timeout: float | None, interval: float, as_json: bool) -> int:
    job = c.wait(job_id, poll_s=interval, timeout=timeout, on_update=None if as_json else ProgressLine())
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        print(describe(job))
    if job["status"] != JobStatus.SUCCEEDED:
        e = job.get("error") or {"code": "cancelled", "message": "the merge was cancelled"}
        print(f"error: {e.get('code')}: {e.get('message')}", file=sys.stderr)
    return WAIT_EXIT[job["status"]]


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


"""The terminal client of the API: ``drmerge submit|status|wait|jobs|cancel|events``,
for people at a terminal and for scripts (drmerge_client does the HTTP).

Exit codes (drmerge_ops.exits): 0 ok; ``wait`` (and ``submit --wait``) 0 succeeded,
1 failed, 2 cancelled; 3 the API could not be reached or refused the request. On any
failure the last stderr line is ``error: <code>: <message>``.
"""

from __future__ import annotations

import json
import sys

from service.jobs.status import OWNED, STATUSES, JobStatus

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
    p.add_argument("--metadata", "-m", action="append", default=[], metavar="KEY=VALUE",
                   help="only jobs with this metadata (repeat: all must match)")
    p.add_argument("--created-after", metavar="TIME", help="only jobs created at or after this RFC 3339 time")
    p.add_argument("--created-before", metavar="TIME", help="only jobs created before this RFC 3339 time")
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
    p.add_argument("--follow", "-f", action="store_true",
                   help="then follow it live (the server-sent event stream) until the job ends")
    p.add_argument("--json", action="store_true", help="the log as JSON (with --follow: one event per line)")
    p.set_defaults(func=cmd_events)



def _client():
    from drmerge_client import Client

    return Client()


def _run_client(fn) -> int:
    from drmerge_client import ApiError

    try:
        return fn()
    except ApiError as e:
        print(f"error: {e.code}: {e.detail}" + (f" (param: {e.param})" if e.param else ""), file=sys.stderr)
        return EXIT_API


def _pairs(items: list[str], option: str) -> dict[str, str]:
    from drmerge.cli import CommandError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError("invalid_request", f"{option} wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


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
    metadata = _pairs(args.metadata, "--metadata")
    webhook = None
    if args.webhook:
        webhook = {"url": args.webhook, **({"secret": args.webhook_secret} if args.webhook_secret else {})}

    def run() -> int:
        with _client() as c:
            job = c.create(spec, webhook=webhook, metadata=metadata or None, idempotency_key=args.idempotency_key)
            if args.wait:
                print(job.id, file=sys.stderr)
                return _wait(c, job.id, None, 1.0, args.json)
        print(json.dumps(job.raw, indent=2) if args.json else job.id)
        return EXIT_OK

    return _run_client(run)


def _fmt_bytes(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _time(dt) -> str:
    from drmerge_client.models import format_time

    return format_time(dt) or "-"


def percent(job) -> str:
    """The progress column: ``-`` until the tensors are counted; 100% only for a job that
    succeeded (a failed or cancelled one, or one still finalizing, shows at most 99%)."""
    if job.status == JobStatus.SUCCEEDED:
        return "100%"
    if not job.progress.tensors_total:
        return "-"
    return f"{min(99, int(100 * job.progress.fraction))}%"


def eta(job) -> str | None:
    """Time left, only for a job that is running (never for a cancelled or ended one)."""
    if job.status != JobStatus.RUNNING or job.progress.eta_seconds is None:
        return None
    return _fmt_seconds(job.progress.eta_seconds)


def describe(job, warnings: list[str] | None = None) -> str:
    p = job.progress
    lines = [f"{job.id}  {job.status}",
             f"  created  {_time(job.created_at)}"]
    if job.started_at:
        lines.append(f"  started  {_time(job.started_at)}")
    if job.finished_at:
        lines.append(f"  finished {_time(job.finished_at)}")
    spec = job.spec
    lines.append(f"  method   {spec.get('method')}  models {len(spec.get('models') or [])}  output {spec.get('output')}")
    if job.status in OWNED or p.tensors_total:
        left = eta(job)
        lines.append(f"  progress {p.stage or '-'}  {p.tensors_done}/{p.tensors_total} tensors  {percent(job)}"
                     f"  read {_fmt_bytes(p.bytes_read)}  written {_fmt_bytes(p.bytes_written)}"
                     + (f"  eta {left}" if left else ""))
    if job.result:
        r = job.result
        lines.append(f"  result   {r.output}  ({len(r.files)} files, {_fmt_bytes(r.bytes_written)}, "
                     f"{r.seconds or 0:.1f}s)")
        for f in r.files:
            lines.append(f"           {f.name}  {_fmt_bytes(f.size)}  sha256:{f.sha256[:16]}...")
    if job.error:
        e = job.error
        lines.append(f"  error    {e.code}: {e.message}" + (f" (param: {e.param})" if e.param else ""))
    for i, w in enumerate(warnings or ()):
        lines.append(("  warnings " if i == 0 else "           ") + w)
    if job.metadata:
        lines.append("  metadata " + ", ".join(f"{k}={v}" for k, v in job.metadata.items()))
    if job.webhook:
        w = job.webhook
        lines.append(f"  webhook  {w.url}  {w.status} ({w.attempts} attempts)")
    return "\n".join(lines)


def job_warnings(c, job_id: str) -> list[str]:
    return [ev.message for ev in c.events(job_id) if ev.type == "warning"]


def cmd_status(args) -> int:
    def run() -> int:
        with _client() as c:
            job = c.get(args.id)
            warnings = job_warnings(c, args.id)
        print(json.dumps(job.raw, indent=2) if args.json else describe(job, warnings))
        return EXIT_OK

    return _run_client(run)


class JobProgress:
    """``drmerge wait``'s live view on stderr: the job's status, stage and tensor counts on
    a drmerge.progress_bar.TerminalProgress, its warnings above the bar as they come."""

    def __init__(self, stream=None):
        from drmerge.progress_bar import TerminalProgress

        self.bar = TerminalProgress(stream if stream is not None else sys.stderr)
        self.warnings: list[str] = []

    def on_event(self, ev) -> None:
        if ev.type == "warning":
            self.warnings.append(ev.message)
            self.bar.write(f"warning: {ev.message}")

    def on_progress(self, job) -> None:
        p = job.progress
        label = f"{job.status} {p.stage}" if job.status in OWNED and p.stage else str(job.status)
        if job.terminal and job.status != JobStatus.SUCCEEDED:
            # No last redraw of a bar that would read "failed 100%": describe() says how it ended.
            self.bar.write(label)
            self.bar.close(clear=True)
            return
        self.bar.update(label, p.tensors_done, p.tensors_total, note=f"{_fmt_bytes(p.bytes_written)} written",
                        final=job.terminal)


def _wait(c, job_id: str, timeout: float | None, interval: float, as_json: bool) -> int:
    view = None if as_json else JobProgress()
    try:
        job = c.wait(job_id, poll_s=interval, timeout=timeout, on_progress=view and view.on_progress,
                     on_event=view and view.on_event)
    finally:
        if view is not None:
            view.bar.close()
    if as_json:
        print(json.dumps(job.raw, indent=2))
    else:
        print(describe(job))
    if job.status != JobStatus.SUCCEEDED:
        e = job.error
        code, message = (e.code, e.message) if e else ("cancelled", "the merge was cancelled")
        print(f"error: {code}: {message}", file=sys.stderr)
    return WAIT_EXIT[job.status]


def cmd_wait(args) -> int:
    def run() -> int:
        with _client() as c:
            return _wait(c, args.id, args.timeout, args.interval, args.json)

    return _run_client(run)


def cmd_jobs(args) -> int:
    metadata = _pairs(args.metadata, "--metadata")

    def run() -> int:
        with _client() as c:
            page = c.list_page(args.status, metadata=metadata or None, created_after=args.created_after,
                               created_before=args.created_before, limit=args.limit, after=args.after)
        if args.json:
            print(json.dumps(page.raw, indent=2))
            return EXIT_OK
        if not page.data:
            print("no jobs")
            return EXIT_OK
        print(f"{'ID':<30}  {'STATUS':<10}  {'PROGRESS':>8}  {'ETA':>7}  {'CREATED':<24}  OUTPUT")
        for j in page.data:
            print(f"{j.id:<30}  {j.status:<10}  {percent(j):>8}  {eta(j) or '-':>7}  {_time(j.created_at):<24}  "
                  f"{j.spec.get('output', '')}")
        if page.has_more:
            print(f"(more: drmerge jobs --after {page.next_after})")
        return EXIT_OK

    return _run_client(run)


def cmd_cancel(args) -> int:
    def run() -> int:
        with _client() as c:
            job = c.cancel(args.id)
        print(json.dumps(job.raw, indent=2) if args.json else f"{job.id}  {job.status}")
        return EXIT_OK

    return _run_client(run)


def _event_dict(ev) -> dict:
    from drmerge_client.models import format_time

    return {"id": ev.id, "at": format_time(ev.at), "type": ev.type, "message": ev.message, **ev.data}


def _print_event(ev, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_event_dict(ev)), flush=True)
    else:
        print(f"{_time(ev.at)}  {ev.type:<8} {ev.message}", flush=True)


def cmd_events(args) -> int:
    from drmerge_client import Event

    def run() -> int:
        with _client() as c:
            events = list(c.events(args.id))
            if args.json and not args.follow:
                print(json.dumps({"object": "list", "data": [_event_dict(ev) for ev in events], "has_more": False},
                                 indent=2))
                return EXIT_OK
            for ev in events:
                _print_event(ev, args.json)
            if args.follow:
                for item in c.stream(args.id, last_event_id=events[-1].id if events else 0):
                    if isinstance(item, Event):
                        _print_event(item, args.json)
        return EXIT_OK

    return _run_client(run)

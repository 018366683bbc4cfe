"""A job live, as server-sent events (``GET /v1/merges/{id}/events`` with ``Accept:
text/event-stream``).

What goes on the wire, in order::

    retry: 1000                                    (reconnect after 1 s)
    id: 7                                          one per event of the job's log, oldest first:
    event: status                                  its type (status, stage, warning, webhook,
    data: {"id": 7, "type": "status", ...}         resume, cleanup) and the event as JSON
    event: progress                                whenever status or progress moved (no id):
    data: {"status": "running", "progress": {...}}
    : ping                                         a comment every few seconds while idle
    event: end                                     once the job has ended and every event before
    data: {...the job...}                          it was sent; then the stream closes

Resumable: a client that reconnects with ``Last-Event-ID: 7`` (browsers' EventSource do it
by themselves) gets the events after 7, then the current progress. The log lives in Redis
and every API replica reads the same one, so a reconnect may land anywhere.

A plain StreamingResponse that polls the job store: the job's log is already an ordered,
numbered list in Redis, so a poll every ``event_stream_poll_s`` is all a stream needs (no
pub/sub to miss messages from, no extra dependency). On API shutdown uvicorn lets open
streams run for its graceful timeout, then closes them; clients resume with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from .jobs.model import iso
from .jobs.store import JobStore

MEDIA_TYPE = "text/event-stream"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # and no proxy buffering (nginx)
BATCH = 500


def wants_stream(accept: str | None) -> bool:
    return bool(accept) and MEDIA_TYPE in accept.lower()


def last_event_id(header: str | None) -> int | None:
    """The ``Last-Event-ID`` a reconnecting client sends (a non-number: None)."""
    if header is None:
        return None
    header = header.strip()
    return int(header) if header.isdigit() else None


def message(event: str, data: dict, id_: int | None = None) -> str:
    lines = [] if id_ is None else [f"id: {id_}"]
    lines += [f"event: {event}", "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":"))]
    return "\n".join(lines) + "\n\n"


def public_event(ev: dict) -> dict:
    ev = dict(ev)
    ev["at"] = iso(ev.get("at"))
    return ev


async def job_events(store: JobStore, job_id: str, after: int, poll_s: float, ping_s: float) -> AsyncIterator[str]:
    yield f"retry: {int(max(poll_s, 1.0) * 1000)}\n\n"
    last_snapshot = None
    last_sent = time.monotonic()

    def read(after_id: int):
        # The job first, then its log: a transition writes the status and its event in one
        # step, so every event up to the state read is in the log read after it.
        job = store.get(job_id)
        return job, store.events(job_id, after=after_id, limit=BATCH)

    while True:
        job, events = await run_in_threadpool(read, after)
        for ev in events:
            after = int(ev["id"])
            yield message(str(ev.get("type", "event")), public_event(ev), after)
        if job is None:  # removed while we watched
            return
        public = job.public()
        snapshot = {"status": public["status"], "progress": public["progress"]}
        if snapshot != last_snapshot:
            last_snapshot = snapshot
            yield message("progress", snapshot)
        if events:
            last_sent = time.monotonic()
            if len(events) == BATCH:
                continue  # a long backlog: send the rest before sleeping
        if job.terminal:
            yield message("end", public)
            return
        if time.monotonic() - last_sent >= ping_s:
            last_sent = time.monotonic()
            yield ": ping\n\n"
        await asyncio.sleep(poll_s)


def stream_response(store: JobStore, job_id: str, after: int, poll_s: float, ping_s: float) -> StreamingResponse:
    return StreamingResponse(job_events(store, job_id, after, poll_s, ping_s), media_type=MEDIA_TYPE,
                             headers=HEADERS)

"""What the drmerge API returns, as typed, immutable values (dataclasses).

Each has ``from_dict`` for the API's JSON and keeps that JSON in ``raw`` (what ``--json``
prints, and fields a newer server adds before this client knows them). Times are aware
``datetime`` objects in UTC; the status is the service's one ``JobStatus`` enum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.jobs.status import TERMINAL, JobStatus


def parse_time(value: str | None) -> datetime | None:
    """RFC 3339 as the API writes it (``2026-01-02T03:04:05.678Z``)."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime | None) -> str | None:
    """The API's own form: UTC, milliseconds, ``Z``."""
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Progress:
    stage: str | None = None
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    fraction: float = 0.0
    eta_seconds: float | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "Progress":
        d = d or {}
        return cls(stage=d.get("stage"), tensors_done=int(d.get("tensors_done") or 0),
                   tensors_total=int(d.get("tensors_total") or 0), bytes_read=int(d.get("bytes_read") or 0),
                   bytes_written=int(d.get("bytes_written") or 0), fraction=float(d.get("fraction") or 0.0),
                   eta_seconds=d.get("eta_seconds"))


@dataclass(frozen=True)
class ResultFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Result:
    """Where the merged checkpoint is and what it holds (``succeeded`` jobs)."""

    output: str
    files: tuple[ResultFile, ...] = ()
    tensors: int | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    seconds: float | None = None
    warnings: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Result | None":
        if not d:
            return None
        files = tuple(ResultFile(f["name"], int(f["size"]), f["sha256"]) for f in d.get("files") or ())
        return cls(output=d["output"], files=files, tensors=d.get("tensors"), bytes_read=d.get("bytes_read"),
                   bytes_written=d.get("bytes_written"), seconds=d.get("seconds"),
                   warnings=tuple(d.get("warnings") or ()), raw=d)


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable ``code`` (``input_not_found``, ``timeout``, ...)."""

    code: str
    message: str
    param: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "JobError | None":
        if not d:
            return None
        return cls(d.get("code") or "internal_error", d.get("message") or "", d.get("param"))


@dataclass(frozen=True)
class Webhook:
    url: str
    status: str
    attempts: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None


@dataclass(frozen=True)
class Job:
    """A merge job (``GET /v1/merges/{id}``)."""

    id: str
    status: JobStatus
    created_at: datetime
    spec: dict
    progress: Progress
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Result | None = None
    error: JobError | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    webhook: Webhook | None = None
    attempts: int = 0
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        """It ended (succeeded, failed or cancelled) and never changes again."""
        return self.status in TERMINAL

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        wh = d.get("webhook")
        webhook = None
        if wh:
            webhook = Webhook(wh["url"], wh.get("status", "waiting"), int(wh.get("attempts") or 0),
                              wh.get("last_error"), parse_time(wh.get("delivered_at")))
        return cls(id=d["id"], status=JobStatus(d["status"]), created_at=parse_time(d["created_at"]),
                   spec=d.get("spec") or {}, progress=Progress.from_dict(d.get("progress")),
                   started_at=parse_time(d.get("started_at")), finished_at=parse_time(d.get("finished_at")),
                   result=Result.from_dict(d.get("result")), error=JobError.from_dict(d.get("error")),
                   metadata=dict(d.get("metadata") or {}), webhook=webhook, attempts=int(d.get("attempts") or 0),
                   raw=d)


@dataclass(frozen=True)
class Event:
    """One entry of a job's event log: ``type`` is ``status`` (a state change: ``data``
    has ``from`` and ``to``), ``stage``, ``warning``, ``webhook``, ``resume``, ``cleanup``."""

    id: int
    at: datetime
    type: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        rest = {k: v for k, v in d.items() if k not in ("id", "at", "type", "message")}
        return cls(int(d["id"]), parse_time(d["at"]), d["type"], d.get("message") or "", rest)


@dataclass(frozen=True)
class ProgressUpdate:
    """A live update from the event stream (``Client.stream``): the job's status and
    progress now."""

    status: JobStatus
    progress: Progress

    @classmethod
    def from_dict(cls, d: dict) -> "ProgressUpdate":
        return cls(JobStatus(d["status"]), Progress.from_dict(d.get("progress")))


@dataclass(frozen=True)
class DownloadLink:
    """A presigned GET URL of one result file (``Client.download_links``)."""

    name: str
    size: int
    sha256: str
    url: str
    expires_at: datetime

    @classmethod
    def from_dict(cls, d: dict) -> "DownloadLink":
        return cls(d["name"], int(d["size"]), d["sha256"], d["url"], parse_time(d["expires_at"]))


@dataclass(frozen=True)
class Page:
    """One page of ``GET /v1/merges`` (``Client.list`` walks them all for you)."""

    data: tuple[Job, ...]
    has_more: bool
    next_after: str | None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

"""The Python client of the drmerge HTTP API (the ``drmerge`` terminal commands use it).

Needs httpx and tenacity (``pip install 'drmerge[client]'``), and of the project only
service.jobs.status (the one JobStatus enum). The API URL comes from the argument, else
``DRMERGE_API_URL``, else the local dev stack started in the current directory
(``.drmerge-dev/state.json``), else http://127.0.0.1:8000. The API key comes from the
argument, else ``DRMERGE_API_KEY``, else the dev stack's key, but only when the URL is
the dev stack's too (a key is never sent to a server it was not made for). It is sent as
``Authorization: Bearer <key>``.

Retries (tenacity), with exponential backoff and jitter, or the server's ``Retry-After``:
connection failures, 429 and 503 (and 502/504 from a proxy) for calls that are safe to
repeat: every GET; ``cancel`` (cancelling twice is cancelling once: a cancelling or
cancelled job answers with itself); ``create``, because every create carries an
``Idempotency-Key`` (generated per call unless you give one), so a retried create whose
first answer was lost returns the same job instead of making a second. A call that is not
safe to repeat would be retried only when its connection was never made.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from service.jobs.status import JobStatus

from . import sse
from .models import DownloadLink, Event, Job, Page, ProgressUpdate, format_time

log = logging.getLogger("drmerge_client")

DEFAULT_URL = "http://127.0.0.1:8000"
# 429 and 503: the API did not act on it (quota, a dependency down); 502 and 504: a proxy's
# answer, the request may or may not have reached the API. All answers: the request was
# sent, so only calls safe to repeat are retried on them.
_RETRY_STATUSES = (429, 502, 503, 504)
_ETAG_CACHE = 128


class ApiError(Exception):
    """An error answer (problem+json: ``code``, ``detail``, ``param``), or no usable answer
    at all (``status`` None; code ``unreachable``, ``timeout``, ``invalid_request``,
    ``invalid_response``)."""

    def __init__(self, status: int | None, code: str, detail: str, param: str | None = None,
                 problem: dict | None = None):
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail, self.param = status, code, detail, param
        self.problem = problem or {}


class _Retry(Exception):
    """An attempt worth repeating; carries the error to raise if the retries run out."""

    def __init__(self, error: ApiError, retry_after: float | None = None):
        super().__init__(str(error))
        self.error, self.retry_after = error, retry_after


def _dev_state(cwd: str | None = None) -> dict:
    try:
        with open(os.path.join(cwd or os.getcwd(), ".drmerge-dev", "state.json")) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def default_api_url(cwd: str | None = None) -> str:
    url = os.environ.get("DRMERGE_API_URL")
    if url:
        return url
    return _dev_state(cwd).get("api_url") or DEFAULT_URL


def default_api_key(base_url: str, cwd: str | None = None) -> str | None:
    key = os.environ.get("DRMERGE_API_KEY")
    if key:
        return key
    state = _dev_state(cwd)
    if state.get("api_key") and state.get("api_url", "").rstrip("/") == base_url.rstrip("/"):
        return state["api_key"]
    return None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After``: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _time_param(value: datetime | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if value.tzinfo is None:
        raise ValueError("created_after/created_before need an aware datetime (e.g. tzinfo=timezone.utc)")
    return format_time(value.astimezone(timezone.utc))


class Client:
    """``with Client() as c: job = c.create(spec); job = c.wait(job.id, on_progress=print)``.

    ``retries``: further attempts after the first; ``backoff_s``/``max_backoff_s``: the
    exponential backoff between them (full jitter: a random wait up to the doubling bound); ``max_retry_after_s``: the longest
    ``Retry-After`` honoured (longer ones are cut to it)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 max_retry_after_s: float = 60.0, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = (base_url or default_api_url()).rstrip("/")
        try:
            url = httpx.URL(self.base_url)
        except httpx.InvalidURL as e:
            raise ApiError(None, "invalid_request", f"not a URL: {self.base_url!r} ({e})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ApiError(None, "invalid_request", f"the API URL must be http(s)://host[:port], got "
                                                    f"{self.base_url!r} (DRMERGE_API_URL)")
        headers = {"user-agent": "drmerge-client/2", "accept": "application/json"}
        key = api_key if api_key is not None else default_api_key(self.base_url)
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.timeout = timeout
        self.retries = retries
        self.backoff_s, self.max_backoff_s, self.max_retry_after_s = backoff_s, max_backoff_s, max_retry_after_s
        self._sleep = sleep
        self._etags: OrderedDict[str, tuple[str, dict]] = OrderedDict()
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transport ----------------------------------------------------------------------
    def _wait_before_retry(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retry) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after_s)
        return wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s)(state)

    def _request(self, method: str, path: str, *, idempotent: bool = True, ok=(200,), **kw) -> httpx.Response:
        """One API call with the retry policy of the module docstring; an ApiError for an
        error answer, or when no answer came."""

        def once() -> httpx.Response:
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                error = ApiError(None, "unreachable", f"cannot reach the drmerge API at {self.base_url}: "
                                                      f"{type(e).__name__}: {e}")
                never_sent = isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))
                if idempotent or never_sent:
                    raise _Retry(error) from None
                raise error from None
            if idempotent and resp.status_code in _RETRY_STATUSES:
                raise _Retry(self._error(resp), retry_after_seconds(resp.headers.get("retry-after")))
            return resp

        try:
            for attempt in Retrying(stop=stop_after_attempt(self.retries + 1), wait=self._wait_before_retry,
                                    retry=retry_if_exception_type(_Retry), sleep=self._sleep, reraise=True,
                                    before_sleep=lambda s: log.debug("retrying %s %s: %s", method, path,
                                                                     s.outcome.exception())):
                with attempt:
                    resp = once()
        except _Retry as e:
            raise e.error from None
        if resp.status_code not in ok:
            raise self._error(resp)
        return resp

    def _error(self, resp: httpx.Response) -> ApiError:
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        return ApiError(resp.status_code, body.get("code") or f"http_{resp.status_code}",
                        body.get("detail") or resp.text[:500] or resp.reason_phrase, body.get("param"), body)

    def _json(self, resp: httpx.Response):
        try:
            return resp.json()
        except ValueError:
            raise ApiError(resp.status_code, "invalid_response",
                           f"{self.base_url} answered {resp.request.method} {resp.request.url.path} with something "
                           f"that is not JSON ({resp.headers.get('content-type', 'no content type')}); is it a "
                           "drmerge API?") from None

    def _get_json(self, path: str, params=None):
        """GET with ``If-None-Match``: a 304 answers from the copy kept from last time."""
        key = path + ("?" + str(httpx.QueryParams(params)) if params else "")
        cached = self._etags.get(key)
        headers = {"if-none-match": cached[0]} if cached else {}
        resp = self._request("GET", path, params=params, headers=headers, ok=(200, 304))
        if resp.status_code == 304 and cached:
            self._etags.move_to_end(key)
            return cached[1]
        body = self._json(resp)
        etag = resp.headers.get("etag")
        if etag:
            self._etags[key] = (etag, body)
            self._etags.move_to_end(key)
            while len(self._etags) > _ETAG_CACHE:
                self._etags.popitem(last=False)
        return body

    # --- jobs ---------------------------------------------------------------------------
    def create(self, spec: Mapping, *, webhook: Mapping | None = None, metadata: Mapping[str, str] | None = None,
               idempotency_key: str | None = None) -> Job:
        """Submit a merge (``POST /v1/merges``). ``idempotency_key``: yours to reuse when you
        retry yourself; by default a fresh one per call (the client's own retries reuse it)."""
        body: dict = {"spec": dict(spec)}
        if webhook:
            body["webhook"] = dict(webhook)
        if metadata:
            body["metadata"] = dict(metadata)
        key = idempotency_key or f"client-{uuid.uuid4()}"
        resp = self._request("POST", "/v1/merges", json=body, headers={"Idempotency-Key": key}, ok=(200, 202))
        return Job.from_dict(self._json(resp))

    def get(self, job_id: str) -> Job:
        return Job.from_dict(self._get_json(f"/v1/merges/{job_id}"))

    def list_page(self, status: JobStatus | str | None = None, *, metadata: Mapping[str, str] | None = None,
                  created_after: datetime | str | None = None, created_before: datetime | str | None = None,
                  limit: int = 20, after: str | None = None) -> Page:
        """One page of jobs, newest first (``list`` walks every page)."""
        params: dict = {"limit": limit}
        if status:
            params["status"] = str(status)
        if after:
            params["after"] = after
        if created_after is not None:
            params["created_after"] = _time_param(created_after)
        if created_before is not None:
            params["created_before"] = _time_param(created_before)
        for k, v in (metadata or {}).items():
            params[f"metadata[{k}]"] = v
        body = self._get_json("/v1/merges", params)
        return Page(tuple(Job.from_dict(j) for j in body["data"]), bool(body.get("has_more")),
                    body.get("next_after"), body)

    def list(self, status: JobStatus | str | None = None, *, metadata: Mapping[str, str] | None = None,
             created_after: datetime | str | None = None, created_before: datetime | str | None = None,
             page_size: int = 100, limit: int | None = None) -> Iterator[Job]:
        """Every matching job, newest first, fetching pages as you iterate (at most
        ``limit`` jobs if given)."""
        after, seen = None, 0
        while True:
            page = self.list_page(status, metadata=metadata, created_after=created_after,
                                  created_before=created_before, limit=page_size, after=after)
            for job in page.data:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield job
            if not page.has_more or not page.next_after:
                return
            after = page.next_after

    def cancel(self, job_id: str) -> Job:
        resp = self._request("POST", f"/v1/merges/{job_id}/cancel", ok=(200, 202))
        return Job.from_dict(self._json(resp))

    def events(self, job_id: str, after: int = 0, page_size: int = 1000) -> Iterator[Event]:
        """The job's event log after event ``after``, oldest first, every page."""
        while True:
            body = self._get_json(f"/v1/merges/{job_id}/events", {"after": after, "limit": page_size})
            for d in body["data"]:
                ev = Event.from_dict(d)
                after = ev.id
                yield ev
            if not body.get("has_more") or not body["data"]:
                return

    def download_links(self, job_id: str) -> list[DownloadLink]:
        """Presigned, short-lived GET URLs of a succeeded job's files."""
        body = self._get_json(f"/v1/merges/{job_id}/files")
        return [DownloadLink.from_dict(d) for d in body["data"]]

    def stream(self, job_id: str, *, last_event_id: int | None = None,
               reconnect_s: float = 1.0) -> Iterator[Event | ProgressUpdate | Job]:
        """The job live, from ``GET /v1/merges/{id}/events`` as server-sent events: its
        log's ``Event``s (after ``last_event_id``), a ``ProgressUpdate`` whenever progress
        moves, and last the final ``Job``, once it has ended. A dropped connection is
        resumed where it broke (``Last-Event-ID``) after ``reconnect_s``; ``retries``
        failures in a row raise ApiError."""
        last = last_event_id
        failures = 0
        while True:
            headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
            if last is not None:
                headers["last-event-id"] = str(last)
            try:
                with self.http.stream("GET", f"/v1/merges/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 60.0))) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        error = self._error(resp)
                        if resp.status_code not in _RETRY_STATUSES:
                            raise error
                        raise _Retry(error, retry_after_seconds(resp.headers.get("retry-after")))
                    failures = 0
                    for msg in sse.parse(resp.iter_lines()):
                        data = json.loads(msg.data) if msg.data else {}
                        if msg.event == "end":
                            yield Job.from_dict(data)
                            return
                        if msg.event == "progress":
                            yield ProgressUpdate.from_dict(data)
                        elif msg.id is not None:
                            last = int(msg.id)
                            yield Event.from_dict(data)
            except (httpx.TransportError, _Retry) as e:
                failures += 1
                error = e.error if isinstance(e, _Retry) else ApiError(
                    None, "unreachable", f"the event stream of {job_id} broke: {type(e).__name__}: {e}")
                if failures > self.retries:
                    raise error from None
                delay = e.retry_after if isinstance(e, _Retry) and e.retry_after is not None else reconnect_s
                self._sleep(min(delay, self.max_retry_after_s))
                continue
            # The server closed the stream before the job ended (a restart): resume.
            self._sleep(reconnect_s)

    def wait(self, job_id: str, *, on_progress: Callable[[Job], None] | None = None,
             on_event: Callable[[Event], None] | None = None, poll_s: float = 1.0,
             timeout: float | None = None) -> Job:
        """Poll until the job has ended and return it. ``on_event(event)`` for each new log
        event (warnings, stages, state changes), then ``on_progress(job)``, after every
        poll. ApiError ``timeout`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            job = self.get(job_id)
            if on_event is not None:
                for ev in self.events(job_id, after=after):
                    after = ev.id
                    on_event(ev)
            if on_progress is not None:
                on_progress(job)
            if job.terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(None, "timeout", f"job {job_id} is still {job.status} after {timeout}s")
            self._sleep(poll_s)

    # --- service ------------------------------------------------------------------------
    def readyz(self) -> dict:
        resp = self._request("GET", "/readyz", ok=(200, 503))
        return self._json(resp)

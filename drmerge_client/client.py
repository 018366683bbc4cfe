"""A small client for the drmerge HTTP API (used by ``drmerge submit/status/wait/...``, drmerge_ops).

Needs only httpx (and service.jobs.status, the one definition of job statuses). The API URL comes from the argument, else ``DRMERGE_API_URL``, else
the local dev stack started in the current directory (``.drmerge-dev/state.json``),
else http://127.0.0.1:8000. The API key comes from the argument, else ``DRMERGE_API_KEY``,
else the dev stack's key, but only when the URL is the dev stack's too (a key is never
sent to a server it was not made for). It is sent as ``Authorization: Bearer <key>``.

Submissions carry an ``Idempotency-Key`` (a fresh one unless given), so the client can
retry a POST whose answer was lost without creating a second job.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import httpx

from service.jobs.status import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8000"
_RETRY_STATUSES = (502, 503, 504)


class ApiError(Exception):
    """An error answer (problem+json) or no answer at all (code ``unreachable``)."""

    def __init__(self, status: int | None, code: str, detail: str, param: str | None = None,
                 problem: dict | None = None):
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail, self.param = status, code, detail, param
        self.problem = problem or {}


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


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, transport: httpx.BaseTransport | None = None):
        self.base_url = (base_url or default_api_url()).rstrip("/")
        headers = {"user-agent": "drmerge-client/1", "accept": "application/json"}
        key = api_key if api_key is not None else default_api_key(self.base_url)
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.retries = retries
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise ApiError(None, "unreachable", f"cannot reach the drmerge API at {self.base_url}: {e}") from None
            else:
                if resp.status_code not in _RETRY_STATUSES or attempt == self.retries:
                    break
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            raise ApiError(resp.status_code, body.get("code") or f"http_{resp.status_code}",
                           body.get("detail") or resp.text[:500] or resp.reason_phrase, body.get("param"), body)
        return resp

    # --- endpoints ----------------------------------------------------------------------
    def submit(self, spec: dict, *, webhook: dict | None = None, metadata: dict | None = None,
               idempotency_key: str | None = None) -> dict:
        body: dict = {"spec": spec}
        if webhook:
            body["webhook"] = webhook
        if metadata:
            body["metadata"] = metadata
        headers = {"Idempotency-Key": idempotency_key or f"cli-{uuid.uuid4()}"}
        return self._request("POST", "/v1/merges", json=body, headers=headers).json()

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/merges/{job_id}").json()

    def list(self, status: str | None = None, limit: int = 20, after: str | None = None) -> dict:
        params = {"limit": limit}
        if status:
            params["status"] = status
        if after:
            params["after"] = after
        return self._request("GET", "/v1/merges", params=params).json()

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/merges/{job_id}/cancel").json()

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> dict:
        return self._request("GET", f"/v1/merges/{job_id}/events", params={"after": after, "limit": limit}).json()

    def readyz(self) -> dict:
        resp = self.http.get("/readyz")
        return resp.json()

    def wait(self, job_id: str, *, poll_s: float = 1.0, timeout: float | None = None, on_update=None) -> dict:
        """Poll until the job is terminal; ``on_update(job)`` after every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(None, "timeout", f"job {job_id} is still {job['status']} after {timeout}s")
            time.sleep(poll_s)

"""/v1/merges: submit, read, list, cancel, follow (the event log, or its live stream) and
download (presigned URLs) merge jobs."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from drmerge import locations
from drmerge.errors import MergeError
from drmerge.spec import parse_spec

from .. import event_stream, http_cache
from ..auth import Principal, get_principal
from ..deps import get_celery, get_presigner, get_settings_dep, get_store
from ..downloads import SigningUnavailable
from ..jobs.queue import enqueue
from ..jobs.errors import (IdempotencyConflict, IllegalTransition, JobNotFound, JobStoreError, OutputBusy,
                           QuotaExceeded)
from ..jobs.model import Job, is_job_id, iso
from ..jobs.status import JobStatus
from ..jobs.store import JobStore, body_hash
from ..limits import check_spec
from ..netguard import Policy, WebhookURLError, check_webhook_url
from ..problems import Problem
from ..query import QueryFamily
from ..schemas import (PROBLEM_RESPONSES, SUBMIT_PROBLEM_RESPONSES, DownloadList, EventList, MergeJob, MergeList,
                       MergeRequest, Status)
from ..settings import Settings
from ..webhooks import signing_key

log = logging.getLogger("drmerge.api")

router = APIRouter(prefix="/v1/merges", tags=["merges"])

QUOTA_RETRY_AFTER_S = 30


def _check_locations(spec, settings: Settings, principal: Principal) -> None:
    """The service reads and writes S3, and each key only the S3 prefixes it was given
    (403 ``access_denied``; service.allowlist has the matching rules). Local paths would
    name files on whichever worker runs the job, so they are refused unless the operator
    allows one root, and then only to keys that may use any location (``--allow '*'``).
    Every location here is already canonical (parse_spec: real paths, so no ``..`` or
    symlink leads out of the root)."""
    named = ([("spec.base_model", spec.base_model, False)] if spec.base_model else []) + \
            [(f"spec.models[{i}].model", m.model, False) for i, m in enumerate(spec.models)] + \
            [("spec.output", spec.output, True)]
    root = settings.allow_local_root
    for param, uri, write in named:
        if uri.startswith("s3://"):
            try:
                allowed = principal.access.allows(uri, write=write)
            except MergeError as e:
                raise Problem(422, "invalid_spec", f"{param}: {e.message}", param) from None
            if not allowed:
                raise Problem(403, "access_denied", f"{param}: this API key may not {'write' if write else 'read'} "
                              f"{uri}", param)
            continue
        if not root:
            raise Problem(422, "invalid_spec", f"{param}: local paths are not accepted by the service; "
                          f"use s3://bucket/prefix/ (got {uri!r})", param)
        if not principal.access.any_location:  # allow lists name S3 prefixes, never local files
            raise Problem(403, "access_denied", f"{param}: this API key may not use local paths", param)
        if not locations.contains(os.path.realpath(root), uri):
            raise Problem(422, "invalid_spec", f"{param}: local paths must be absolute and inside {root}", param)


def _check_metadata(metadata: dict, settings: Settings) -> None:
    if len(metadata) > settings.max_metadata_keys:
        raise Problem(422, "invalid_request", f"metadata: at most {settings.max_metadata_keys} keys", "metadata")
    for k, v in metadata.items():
        if not k or len(k) > 64:
            raise Problem(422, "invalid_request", "metadata: keys must be 1 to 64 characters", f"metadata.{k}")
        if len(v) > 512:
            raise Problem(422, "invalid_request", "metadata: values must be at most 512 characters", f"metadata.{k}")


def _printable(key) -> str:
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(body: dict) -> None:
    """JSON can escape lone surrogates (``"\\ud800"``); such strings cannot be stored
    (Redis wants UTF-8), become S3 keys or be sent back, so they are refused up front.
    Iterative: the body may be nested as deep as the JSON parser allows."""
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            items = [(k, v, f"{path}.{_printable(k)}" if path else _printable(k)) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(None, v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            items = []
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    code = "invalid_spec" if path == "spec" or path.startswith(("spec.", "spec[")) else "invalid_request"
                    raise Problem(422, code, f"{path}: is not valid Unicode text (it holds a lone surrogate)",
                                  path or None) from None
        for key, v, p in items:
            stack.append((v, p))
            if key is not None:
                stack.append((key, p))


def _not_found(job_id: str) -> Problem:
    return Problem(404, "not_found", f"no merge job {job_id!r}")


def _own_job(store: JobStore, job_id: str, principal: Principal) -> Job:
    """The job if it belongs to the caller's tenant. Another tenant's job is "not found",
    word for word as a missing one, so ids cannot be probed."""
    job = store.get(job_id)
    if job is None or job.tenant != principal.tenant:
        raise _not_found(job_id)
    return job


@router.post("", status_code=202, response_model=MergeJob, summary="Submit a merge",
             responses={**PROBLEM_RESPONSES, **SUBMIT_PROBLEM_RESPONSES,
                        409: PROBLEM_RESPONSES[422] | {"description": "`output_busy`"}})
def create_merge(body: MergeRequest, response: Response,
                 idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255,
                                                      description="Retry-safe submission: the same key and body "
                                                                  "return the same job for 24 h."),
                 store: JobStore = Depends(get_store), settings: Settings = Depends(get_settings_dep),
                 celery=Depends(get_celery), principal: Principal = Depends(get_principal)):
    check_spec(body.spec, settings.max_models, settings.max_spec_string_length)
    _check_text(body.model_dump(mode="python"))
    try:
        spec = parse_spec(body.spec, allow_relative=False)
    except MergeError as e:
        param = f"spec.{e.param}" if e.param else "spec"
        raise Problem(422, "invalid_spec", e.message, param) from None
    _check_locations(spec, settings, principal)
    _check_metadata(body.metadata, settings)
    webhook = None
    if body.webhook is not None:
        try:
            check_webhook_url(body.webhook.url, Policy.from_settings(settings))
        except WebhookURLError as e:
            if e.transient:
                raise Problem(503, "unavailable", f"webhook.url: cannot resolve its host right now ({e}); "
                              "retry later", "webhook.url", headers={"retry-after": "5"}) from None
            raise Problem(422, "invalid_request", f"webhook.url {e}", "webhook.url") from None
        secret = body.webhook.secret
        if secret is None and not settings.webhook_secret:
            raise Problem(422, "invalid_request", "webhook.secret is required: this service has no default "
                          "signing secret (DRMERGE_WEBHOOK_SECRET)", "webhook.secret")
        if secret is not None:
            try:
                signing_key(secret)
            except ValueError as e:
                raise Problem(422, "invalid_request", f"webhook.secret: {e}", "webhook.secret") from None
        webhook = {"url": body.webhook.url, **({"secret": secret} if secret else {})}
    try:
        job, created = store.create(spec.to_dict(), spec.output, metadata=body.metadata, webhook=webhook,
                                    idempotency_key=idempotency_key,
                                    request_hash=body_hash(body.model_dump(mode="json")),
                                    tenant=principal.tenant, max_queued=settings.max_queued_per_tenant,
                                    queue=settings.queue)
    except IdempotencyConflict as e:
        raise Problem(422, "idempotency_key_reused", str(e), "Idempotency-Key") from None
    except OutputBusy as e:
        holder = store.get(e.job_id)
        cleaning = holder is not None and holder.terminal  # it ended; its partial output is still being removed
        if holder is not None and holder.tenant != principal.tenant:  # name no other tenant's job or location
            where = e.output if e.held == e.output else f"a location that overlaps {e.output}"
            what = ("the partial output of another job is still being removed from" if cleaning
                    else "another job is already writing to")
            raise Problem(409, "output_busy", f"{what} {where}; try again when it has ended", "spec.output") from None
        if cleaning:
            raise Problem(409, "output_busy", f"job {e.job_id} {holder.status}, and its partial output in {e.held} "
                          "is still being removed (the storage was unavailable); try again later", "spec.output",
                          job_id=e.job_id) from None
        raise Problem(409, "output_busy", str(e), "spec.output", job_id=e.job_id) from None
    except QuotaExceeded as e:
        raise Problem(429, "quota_exceeded", str(e), headers={"retry-after": str(QUOTA_RETRY_AFTER_S)},
                      limit=settings.max_queued_per_tenant) from None
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    if job.status == JobStatus.QUEUED and job.enqueued_at is None:
        # A replay re-sends a job whose first enqueue never happened (an API crash
        # between create and send); the worker's claim makes a duplicate harmless.
        try:
            enqueue(celery, job.id, queue=job.queue or settings.queue)
            store.mark_enqueued(job.id)
        except Exception as e:
            log.exception("could not enqueue %s", job.id)
            try:
                store.transition(job.id, JobStatus.FAILED, from_={JobStatus.QUEUED},
                                 fields={"error": {"code": "internal_error", "param": None,
                                                   "message": f"the job could not be queued: {e}"}},
                                 message="enqueue failed")
            except JobStoreError:
                pass
            raise Problem(503, "unavailable", "the job queue (broker) is unreachable; retry later",
                          headers={"retry-after": "5"}) from None
        job = store.require(job.id)
    response.headers["Location"] = f"/v1/merges/{job.id}"
    return job.public()


# ?metadata[KEY]=VALUE filters: as many as a job may have keys, of the sizes it may hold.
metadata_filters = QueryFamily("metadata", max_items=16, max_key=64, max_value=512)

_NOT_MODIFIED = {304: {"description": "Not modified: the `ETag` you sent in `If-None-Match` is still current"}}


def _unix(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


@router.get("", response_model=MergeList, summary="List merges, newest first",
            responses={**PROBLEM_RESPONSES, **_NOT_MODIFIED},
            openapi_extra={"parameters": [{
                "name": "metadata[KEY]", "in": "query", "required": False, "schema": {"type": "string"},
                "description": "Only jobs whose metadata KEY is exactly this value (repeat for more keys: all must "
                               "match), e.g. `metadata[team]=nlp`."}]})
def list_merges(request: Request,
                status: Status | None = Query(None, description="Only jobs in this status."),
                limit: int = Query(20, ge=1, le=100),
                after: str | None = Query(None, description="Cursor: the `next_after` of the previous page."),
                created_after: datetime | None = Query(
                    None, description="Only jobs created at or after this time (RFC 3339; no offset means UTC), "
                                      "to the millisecond."),
                created_before: datetime | None = Query(None, description="Only jobs created before this time."),
                metadata: dict[str, str] = Depends(metadata_filters),
                store: JobStore = Depends(get_store), principal: Principal = Depends(get_principal)):
    if after is not None and not is_job_id(after):
        raise Problem(422, "invalid_request", "after: must be a job id (mrg_...)", "after")
    page = store.page(status=status, limit=limit, after=after, tenant=principal.tenant,
                      created_after=_unix(created_after), created_before=_unix(created_before), metadata=metadata)
    return http_cache.json_response(request, {"object": "list", "data": [j.public() for j in page.jobs],
                                              "has_more": page.has_more, "next_after": page.next_after})


@router.get("/{job_id}", response_model=MergeJob, summary="Get a merge",
            responses={**PROBLEM_RESPONSES, **_NOT_MODIFIED})
def get_merge(job_id: str, request: Request, store: JobStore = Depends(get_store),
              principal: Principal = Depends(get_principal)):
    return http_cache.json_response(request, _own_job(store, job_id, principal).public())


@router.post("/{job_id}/cancel", response_model=MergeJob, summary="Cancel a merge",
             responses={**PROBLEM_RESPONSES, 409: {"description": "`job_not_cancellable`: it already ended"},
                        200: {"description": "Cancelled (it was queued, or already cancelled)"}},
             status_code=202)
def cancel_merge(job_id: str, response: Response, store: JobStore = Depends(get_store),
                 principal: Principal = Depends(get_principal)):
    _own_job(store, job_id, principal)
    try:
        job = store.request_cancel(job_id)
    except JobNotFound:
        raise _not_found(job_id) from None
    except IllegalTransition as e:
        raise Problem(409, "job_not_cancellable", f"job {job_id} already {e.current}", job_status=e.current) from None
    except JobStoreError as e:
        raise Problem(409, "job_not_cancellable", str(e)) from None
    if job.status == JobStatus.CANCELLED:
        response.status_code = 200
    return job.public()


@router.get("/{job_id}/events", response_model=EventList, summary="A merge's event log, or its live stream",
            responses={**PROBLEM_RESPONSES, 200: {
                "description": "The log as JSON; with `Accept: text/event-stream`, server-sent events: one per log "
                               "event (`id` = its id), `progress` whenever status or progress move, `end` (the job) "
                               "once it has ended. Resume with `Last-Event-ID`.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
def merge_events(job_id: str, request: Request,
                 after: int = Query(0, ge=0, description="Only events with a larger id."),
                 limit: int = Query(100, ge=1, le=1000, description="Page size (the JSON log only)."),
                 last_event_id: str | None = Header(None, alias="Last-Event-ID",
                                                    description="The stream: resume after this event."),
                 store: JobStore = Depends(get_store), settings: Settings = Depends(get_settings_dep),
                 principal: Principal = Depends(get_principal)):
    _own_job(store, job_id, principal)
    if event_stream.wants_stream(request.headers.get("accept")):
        resume = event_stream.last_event_id(last_event_id)
        return event_stream.stream_response(store, job_id, resume if resume is not None else after,
                                            settings.event_stream_poll_s, settings.event_stream_ping_s)
    events = store.events(job_id, after=after, limit=limit + 1)
    has_more = len(events) > limit
    data = [event_stream.public_event(ev) for ev in events[:limit]]
    return http_cache.json_response(request, {"object": "list", "data": data, "has_more": has_more})


@router.get("/{job_id}/files", response_model=DownloadList, summary="Download links of a merge's result files",
            responses={**PROBLEM_RESPONSES, 409: {"description": "`job_not_succeeded`: it has not succeeded (yet); "
                                                                 "`not_downloadable`: its output is not in S3"}})
def merge_files(job_id: str, response: Response, store: JobStore = Depends(get_store),
                settings: Settings = Depends(get_settings_dep), presigner=Depends(get_presigner),
                principal: Principal = Depends(get_principal)):
    """Presigned GET URLs, valid for `DRMERGE_DOWNLOAD_URL_TTL_S` seconds, of every file of a
    succeeded job's result (the checkpoint's shards, its index, the config and tokenizer
    files copied from the base), with the size and sha256 each must have."""
    job = _own_job(store, job_id, principal)
    if job.status != JobStatus.SUCCEEDED or not job.result:
        raise Problem(409, "job_not_succeeded", f"job {job_id} is {job.status}: download links exist once it has "
                      "succeeded", job_status=str(job.status))
    output = job.result.get("output") or ""
    if not output.startswith("s3://"):
        raise Problem(409, "not_downloadable", f"job {job_id} wrote to a local path on its worker ({output}); "
                      "there is nothing to download over HTTP")
    try:
        links = presigner.links(output, list(job.result.get("files") or []))
    except SigningUnavailable as e:
        raise Problem(503, "unavailable", str(e)) from None
    response.headers["cache-control"] = "no-store"
    return {"object": "list", "data": [dict(link, expires_at=iso(link["expires_at"])) for link in links],
            "expires_in": settings.download_url_ttl_s}

"""Request and response shapes of the HTTP API (they also make the OpenAPI docs).

The spec itself is validated by ``drmerge.spec.parse_spec`` (the one set of rules the CLI
uses too), so here it is only "an object"; the normalized spec comes back in the job.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .jobs.status import STATUSES

# The job statuses as an inline string enum in the OpenAPI document (service.jobs.status).
Status = Literal[tuple(s.value for s in STATUSES)]


def _spec_schema() -> dict:
    """The spec's shape for the OpenAPI document (clients, docs and the fuzzer read it).
    Documentation only: ``drmerge.spec.parse_spec`` is what validates, with the same
    rules as the CLI. ``method`` and ``parameters`` are generated from the method registry
    (each method's parameter class), the rest is built from spec.py's constants, so the
    two cannot drift apart."""
    from drmerge import methods
    from drmerge import spec as s

    location = {"type": "string", "minLength": 6, "maxLength": 1024,
                "pattern": r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
                "description": "s3://bucket/prefix/ (a folder of safetensors files)."}
    patterns = {"type": "array", "maxItems": s.MAX_PATTERNS,
                "items": {"type": "string", "maxLength": s.MAX_PATTERN_LENGTH}}
    registered = methods.all_methods()
    baseless = [m.name for m in registered if not m.needs_base]
    return {
        "type": "object", "additionalProperties": False, "required": ["models", "output"],
        "allOf": [
            # base_model is required unless the method needs none or output_format is adapter (spec.parse_spec)
            {"anyOf": [{"required": ["base_model"]},
                       {"required": ["method"], "properties": {"method": {"enum": baseless}}},
                       {"required": ["output_format"], "properties": {"output_format": {"const": "adapter"}}}]},
            # parameters: those of the chosen method only (the default method's when method is absent)
            *({"if": _chosen(m.name, default=m.name == s.DEFAULT_METHOD),
               "then": {"properties": {"parameters": m.json_schema()}}} for m in registered),
        ],
        "properties": {
            "base_model": {**location, "description": "The pre-trained model. Required, except for "
                                                      f"{', '.join(f'method `{n}`' for n in baseless)} and for "
                                                      "`output_format: adapter` (LoRA adapters merged into one "
                                                      "adapter: the base then only gives tensor shapes)."},
            "models": {"type": "array", "minItems": 1, "maxItems": 16, "items": {"anyOf": [location, {
                "type": "object", "additionalProperties": False, "required": ["model"],
                "properties": {"model": location, "weight": {"type": "number"}}}]}},
            "method": {"enum": list(methods.names()), "default": s.DEFAULT_METHOD,
                       "description": "The merge method. " + " ".join(f"`{m.name}`: {m.summary}" for m in registered)},
            "parameters": {"type": "object", "description": "The method's parameters (its own only: a parameter of "
                                                            "another method is an error); defaults filled in."},
            "select": {"type": "object", "additionalProperties": False,
                       "properties": {"linear": patterns, "exclude": patterns, "ignore": patterns,
                                      "statistics": patterns, "split": _split_schema(patterns)}},
            "dtype": {"enum": list(s.DTYPES)},
            "shard_size": {"anyOf": [{"type": "integer", "minimum": 1024}, {"type": "string", "maxLength": 32}]},
            "overwrite": {"type": "boolean"},
            "output_format": {"enum": list(s.OUTPUT_FORMATS), "default": "full",
                              "description": "`full`: a checkpoint (needs `base_model`); `adapter`: one PEFT LoRA "
                                             "adapter (every model must be a LoRA adapter)."},
            "adapter_rank": {"type": "integer", "minimum": 1, "maximum": 65536,
                             "description": "Rank of the merged adapter (`output_format: adapter` only; default: "
                                            "the sum of the input ranks, at most 64)."},
            "output": {**location, "description": "Where the merged checkpoint goes (must not exist, unless "
                                                  "`overwrite`)."},
        },
    }


def _split_schema(patterns: dict) -> dict:
    """``select.split`` (drmerge/layouts.py ``parse_split``): true (presets), false (no
    splitting), a list of rules, or ``{presets, rules}``."""
    from drmerge import layouts as lay

    count = {"type": "integer", "minimum": 1}
    rule = {"type": "object", "additionalProperties": False, "required": ["pattern"],
            "properties": {"pattern": patterns["items"], "parts": {**count, "minimum": 2, "maximum": lay.MAX_PARTS},
                           "sizes": {"type": "array", "minItems": 2, "maxItems": lay.MAX_PARTS, "items": count},
                           "axis": {"enum": list(lay.AXES)}, "layout": {"enum": list(lay.LAYOUTS)},
                           "groups": {**count, "maximum": lay.MAX_GROUPS},
                           "names": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                                "maxLength": lay.MAX_PART_NAME}}}}
    rules = {"type": "array", "maxItems": lay.MAX_SPLIT_RULES, "items": rule}
    return {"description": "Fused projections merged part by part by the structured methods (DRM): true (the "
                           "presets chosen from config.json; the default), false (none), or rules tried first.",
            "anyOf": [{"type": "boolean"}, rules, {"type": "object", "additionalProperties": False,
                                                   "properties": {"presets": {"type": "boolean"}, "rules": rules}}]}


def _chosen(method: str, default: bool) -> dict:
    """JSON Schema condition: the spec's ``method`` is ``method`` (or absent, for the default)."""
    named = {"required": ["method"], "properties": {"method": {"const": method}}}
    return {"anyOf": [{"not": {"required": ["method"]}}, named]} if default else named


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., max_length=2048, description="http(s) URL that receives a POST on the job's terminal state.",
                     examples=["https://ci.example.com/hooks/drmerge"])
    secret: str | None = Field(None, min_length=8, max_length=256,
                               description="Signing secret (`whsec_<base64>` or any string). Write-only: never "
                                           "returned. Defaults to the service's DRMERGE_WEBHOOK_SECRET.")


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "spec": {"base_model": "s3://models/bert-base/",
                 "models": [{"model": "s3://models/ft-qnli/"}, {"model": "s3://models/ft-sst2/", "weight": 0.8}],
                 "method": "drm", "parameters": {"direction": "vertical", "drop_rate": 0.8},
                 "output": "s3://models/merged/run-42/"},
        "metadata": {"team": "nlp", "run": "42"}}]})
    spec: dict[str, Any] = Field(..., description="The merge spec (docs/DESIGN.md, \"The spec\"); unknown keys are errors.",
                                 json_schema_extra=_spec_schema())
    webhook: WebhookIn | None = None
    metadata: dict[str, str] = Field(default_factory=dict,
                                     description="Your key/values, returned with the job (at most 16; "
                                                 "keys <= 64, values <= 512 characters).")


class Progress(BaseModel):
    stage: str | None = Field(None, description="What the worker is doing: e.g. planning, merging, writing.")
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    fraction: float = Field(0.0, description="0..1, from tensors done.")
    eta_seconds: float | None = Field(None, description="Estimated seconds left, once it can be estimated.")


class ErrorInfo(BaseModel):
    code: str = Field(..., description="Stable code, e.g. input_not_found, corrupt_checkpoint, output_exists.")
    message: str
    param: str | None = None


class ResultFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    size: int
    sha256: str


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")
    output: str
    files: list[ResultFile] = []
    tensors: int | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    seconds: float | None = None
    adapter: dict[str, Any] | None = Field(None, description="`output_format: adapter` only: `rank` and "
                                                             "`energy_kept` (the fraction of the merged deltas' "
                                                             "squared norm the rank truncation kept; per module "
                                                             "in the output's drmerge.json).")
    decisions: dict[str, dict[str, int]] | None = Field(
        None, description="What the method decided per matrix, counted (e.g. DRM `direction: auto`: "
                          "`{direction: {vertical: 10, horizontal: 4}}`; per matrix in the output's drmerge.json).")


class WebhookOut(BaseModel):
    url: str
    status: Literal["waiting", "pending", "retrying", "delivered", "failed"] = Field(
        ..., description="waiting: job not finished; pending/retrying: being delivered; delivered; failed: gave up.")
    attempts: int
    last_error: str | None = None
    delivered_at: str | None = None


class MergeJob(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(..., examples=["mrg_01jdz3k4m5n6p7q8r9s0t1v2w3"])
    object: Literal["merge"] = "merge"
    status: Status
    created_at: str = Field(..., description="RFC 3339, UTC.")
    started_at: str | None = None
    finished_at: str | None = None
    spec: dict[str, Any] = Field(..., description="The normalized spec (defaults filled in).")
    progress: Progress
    result: Result | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, str] = {}
    webhook: WebhookOut | None = None
    attempts: int = Field(0, description="Worker deliveries so far (more than 1 after a worker was lost).")


class MergeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MergeJob]
    has_more: bool
    next_after: str | None = Field(None, description="Pass as `after` to get the next page.")


class Event(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int = Field(..., description="Increasing per job; pass the last one as `after` to tail the log.")
    at: str
    type: str = Field(..., description="status (a state change), stage, warning, webhook.")
    message: str
    status_from: str | None = Field(None, alias="from")
    to: str | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


class DownloadLink(BaseModel):
    name: str
    size: int
    sha256: str = Field(..., description="Check the download against it.")
    url: str = Field(..., description="A presigned GET URL: whoever holds it may download the file until it expires.")
    expires_at: str = Field(..., description="RFC 3339, UTC.")


class DownloadList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DownloadLink]
    expires_in: int = Field(..., description="Seconds each URL stays valid (DRMERGE_DOWNLOAD_URL_TTL_S).")


class ProblemDetail(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    param: str | None = None
    instance: str | None = None


def _problems(descriptions: dict) -> dict:
    return {code: {"model": ProblemDetail, "content": {"application/problem+json": {}}, "description": desc}
            for code, desc in descriptions.items()}


PROBLEM_RESPONSES: dict = _problems({
    401: "No API key, or an invalid or revoked one (`unauthorized`)",
    404: "Unknown job, or another tenant's (`not_found`)",
    422: "Invalid request (`invalid_spec`, `invalid_request`)",
    503: "Redis or the broker is unreachable (`unavailable`)"})
SUBMIT_PROBLEM_RESPONSES: dict = _problems({
    403: "The spec names storage outside the key's allow list (`access_denied`)",
    413: "The request body is too large (`payload_too_large`)",
    429: "The tenant has too many queued jobs (`quota_exceeded`; see Retry-After)"})

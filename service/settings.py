"""Service settings, read once from ``DRMERGE_*`` environment variables.

The API, the worker and ``drmerge dev`` share this one class so that a variable means
the same thing in every process. SETTINGS.md lists every field with its default; keep
the two in step (a test checks it).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRMERGE_", extra="ignore")

    # Where things are.
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for job state and the Celery broker.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, SeaweedFS, ...); unset means AWS.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    api_host: str = Field("127.0.0.1", description="Interface `drmerge api` listens on.")
    api_port: int = Field(8000, description="Port `drmerge api` listens on.")
    api_workers: int = Field(1, description="uvicorn worker processes started by `drmerge api`.")
    api_keep_alive_s: int = Field(
        75, description="Idle keep-alive connections of `drmerge api` close after this; keep it above your load "
                        "balancer's idle timeout.")
    broker_url: str | None = Field(None, description="Celery broker; unset means `redis_url`.")
    queue: str = Field("drmerge", description="Celery queue the merge tasks go to (and a worker consumes). A job "
                                              "keeps the queue it was submitted to: its re-queues, re-sends and "
                                              "cleanup requests go there, whichever process sends them.")
    key_prefix: str = Field("drmerge", description="Prefix of every Redis key the job store writes.")

    # Jobs.
    job_time_limit_s: int = Field(21600, description="A merge running longer than this fails with `timeout`.")
    job_max_attempts: int = Field(3, description="Deliveries of one job before a job whose worker keeps dying fails.")
    worker_device: str = Field("auto", description="`auto` (cuda if present, else cpu), `cpu` or `cuda`.")
    worker_heartbeat_s: float = Field(10.0, description="How often a worker refreshes its heartbeat in Redis.")
    worker_heartbeat_ttl_s: float = Field(30.0, description="A worker whose last heartbeat is older is not counted live.")
    progress_interval_s: float = Field(0.5, description="Least time between two progress writes of one job.")
    job_heartbeat_timeout_s: float = Field(
        120.0, description="A running job whose heartbeat is older than this is re-queued (resuming from its "
                           "committed shards), or failed with `internal_error` once it has lost `job_max_attempts` workers.")
    reaper_interval_s: float = Field(
        15.0, description="How often API and worker processes look for such jobs (one process at a time, by "
                          "lease); 0 turns the reaper off in this process.")
    cleanup_max_attempts: int = Field(
        12, description="Tries at removing a failed job's partial output (the storage was unreachable when it "
                        "failed) before it is given up and left for an operator.")
    cleanup_backoff_base_s: float = Field(30.0, description="Delay before the first such retry; doubles each retry.")
    cleanup_backoff_max_s: float = Field(3600.0, description="Cap on the delay between two cleanup retries.")
    api_shutdown_timeout_s: float = Field(
        30.0, description="On SIGTERM the API stops accepting connections and waits this long for in-flight requests.")
    allow_local_root: str | None = Field(
        None, description="If set, specs may name local paths under this directory (the API refuses local paths otherwise).")
    idempotency_ttl_s: int = Field(86400, description="How long an `Idempotency-Key` is remembered.")
    max_metadata_keys: int = Field(16, description="Most `metadata` entries per job (keys <= 64, values <= 512 chars).")

    # Reading jobs (service/event_stream.py, service/downloads.py).
    event_stream_poll_s: float = Field(
        0.5, gt=0, description="How often an open event stream (`GET /v1/merges/{id}/events` as "
                               "`text/event-stream`) looks for new events and progress.")
    event_stream_ping_s: float = Field(
        15.0, gt=0, description="An idle event stream sends a comment this often, so proxies keep it open.")
    download_url_ttl_s: int = Field(
        900, ge=1, le=604800, description="Presigned download URLs (`GET /v1/merges/{id}/files`) expire after "
                                          "this many seconds (S3 allows at most 7 days).")
    download_endpoint_url: str | None = Field(
        None, description="S3 endpoint written into presigned download URLs, when callers reach S3 by another "
                          "address than the API does; unset means `s3_endpoint_url`.")

    # Webhooks.
    webhook_secret: str | None = Field(
        None, description="Signing secret for jobs that give none (`whsec_<base64>` or any string).")
    webhook_timeout_s: float = Field(10.0, description="Timeout of one webhook POST.")
    webhook_max_attempts: int = Field(12, description="Webhook POSTs before a delivery is given up.")
    webhook_backoff_base_s: float = Field(5.0, description="Delay before the first retry; doubles each retry.")
    webhook_backoff_max_s: float = Field(3600.0, description="Cap on the delay between two retries.")
    webhook_poll_s: float = Field(1.0, description="How often the delivery loop looks for due webhooks.")
    api_deliver_webhooks: bool = Field(True, description="Run a webhook delivery loop in each API process (workers run one too).")
    webhook_allow_http_loopback: bool = Field(
        False, description="Allow `http://` webhook URLs (and addresses) on loopback, for local receivers; "
                           "every other webhook must be `https://`.")
    webhook_allowed_networks: str | None = Field(
        None, description="Comma-separated CIDRs that webhooks may reach although they are not public "
                        "(e.g. `10.20.0.0/16`); cloud metadata addresses stay refused.")

    # Access control and limits (service/auth.py, service/keys.py, service/limits.py).
    auth: str = Field("required", description="`required`: every /v1 request needs an API key; `disabled`: "
                                              "no keys, one tenant (`default`) with any storage location (dev only).")
    api_key_pepper: SecretStr | None = Field(
        None, description="Secret mixed into the HMAC-SHA256 that stores API keys; required when auth is "
                          "required (changing it invalidates every key).")
    max_body_bytes: int = Field(1048576, description="Largest request body; larger is 413 `payload_too_large`.")
    max_models: int = Field(16, description="Most models (`spec.models`) in one job.")
    max_spec_string_length: int = Field(1024, description="Longest string anywhere in a spec (URIs, patterns).")
    max_queued_per_tenant: int = Field(
        100, description="Most queued jobs per tenant; more is 429 `quota_exceeded` (0: no limit).")

    @field_validator("auth")
    @classmethod
    def _auth(cls, v: str) -> str:
        if v not in ("required", "disabled"):
            raise ValueError("must be required or disabled")
        return v

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, v: str | None) -> str | None:
        import ipaddress

        for item in filter(None, (x.strip() for x in (v or "").split(","))):
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad one
        return v

    @field_validator("api_key_pepper")
    @classmethod
    def _pepper(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            return None  # an empty variable is an unset one
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return v

    @field_validator("worker_device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError("must be auto, cpu or cuda")
        return v

    problem_type_base: str = Field(
        "https://drmerge.dev/problems/", description="Base of the `type` URI of problem+json errors (`<base><code>`).")

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    def s3_options(self) -> dict:
        """Keyword arguments for ``drmerge.s3.S3Storage`` (credentials come from the AWS chain)."""
        opts: dict = {"region": self.s3_region}
        if self.s3_endpoint_url:
            opts["endpoint_url"] = self.s3_endpoint_url
        return opts


@lru_cache
def get_settings() -> Settings:
    return Settings()

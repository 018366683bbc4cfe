"""Settings: environment parsing, and SETTINGS.md lists every variable with its default."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from service.settings import Settings

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "service", "SETTINGS.md")


def test_every_setting_is_documented_with_its_default():
    text = open(DOC, encoding="utf-8").read()
    for name, field in Settings.model_fields.items():
        d = field.default
        d = "(unset)" if d is None else (str(d).lower() if isinstance(d, bool) else d)
        assert f"| `DRMERGE_{name.upper()}` | `{d}` |" in text, name


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("DRMERGE_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("DRMERGE_JOB_TIME_LIMIT_S", "60")
    monkeypatch.setenv("DRMERGE_WEBHOOK_ALLOW_HTTP_LOOPBACK", "true")
    monkeypatch.setenv("DRMERGE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    s = Settings()
    assert s.redis_url == "redis://example:6380/2" and s.celery_broker_url == s.redis_url
    assert s.job_time_limit_s == 60 and s.webhook_allow_http_loopback is True
    assert s.s3_options() == {"region": "us-east-1", "endpoint_url": "http://127.0.0.1:9000"}


@pytest.mark.parametrize("name, value", [
    ("DRMERGE_WORKER_DEVICE", "tpu"),
    ("DRMERGE_AUTH", "optional"),
    ("DRMERGE_API_KEY_PEPPER", "too-short"),
    ("DRMERGE_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8, not-a-network"),
])
def test_bad_values_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_the_pepper_never_shows_in_printed_settings(monkeypatch):
    monkeypatch.setenv("DRMERGE_API_KEY_PEPPER", "sentinel-pepper-0123456789")
    s = Settings()
    assert "sentinel-pepper" not in repr(s) and "sentinel-pepper" not in str(s.model_dump())
    assert s.api_key_pepper.get_secret_value() == "sentinel-pepper-0123456789"

"""Schemathesis against the real API process, authenticated: no request it makes up is
answered with a 5xx. A reduced run (the full one, over 1,000 requests, is
``python bench/fuzz_api.py``; numbers in bench/SECURITY.md)."""

from __future__ import annotations

import os
import time
import uuid

import pytest

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error(redis_server, s3_server, tmp_path):
    pytest.importorskip("schemathesis")
    from bench.fuzz_api import count_access_log, fuzz
    from drmerge_ops.processes import service_env, start_api, stop_process
    from service.keys import KeyStore
    from service.settings import Settings
    from tests.support.servers import free_port

    prefix, pepper = f"fz{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    env = service_env(redis_server.url, s3_server.env(), api_key_pepper=pepper, key_prefix=prefix,
                      queue=f"{prefix}-idle", webhook_secret="fuzz-default-signing-secret",
                      api_deliver_webhooks=False)
    key, _ = KeyStore.from_settings(Settings(redis_url=redis_server.url, api_key_pepper=pepper,
                                             key_prefix=prefix)).create("fuzz", allow=["*"])
    port = free_port()
    log_path = str(tmp_path / "api.log")
    api = start_api(env, port, log_path, log_level="info")
    try:
        result = fuzz(f"http://127.0.0.1:{port}", key, max_examples=30, seed=1, timeout=170)
    finally:
        time.sleep(0.2)
        stop_process(api, 10)
    counted = count_access_log(log_path)
    assert counted["server_errors"] == 0, counted["server_error_lines"]
    assert result["exit_code"] == 0, result["output_tail"]
    assert counted["requests"] >= 300, counted
    assert counted["statuses"].get(202, 0) >= 1 and counted["statuses"].get(422, 0) >= 1  # both paths exercised
    assert os.path.getsize(log_path) > 0

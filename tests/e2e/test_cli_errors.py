"""Every way a `drmerge` command fails ends with the documented last stderr line
`error: <code>: <message>` (one line), a non-zero exit and no traceback: the service
launchers, key administration, the dev stack, the client commands and usage errors, each
as a real process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from tests.support.servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ERROR_LINE = re.compile(r"^error: [a-z_]+: \S.*$")


def drmerge(*args, env: dict | None = None, cwd=None, timeout: float = 120):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DRMERGE_", "AWS_"))}
    base["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "drmerge_ops", *args], env={**base, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_fails(r, code: str, *words: str, exit_code: int | None = None) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, (r.stdout, r.stderr)
    if exit_code is not None:
        assert r.returncode == exit_code, (r.returncode, r.stderr)
    assert lines and ERROR_LINE.match(lines[-1]), r.stderr
    assert lines[-1].startswith(f"error: {code}: "), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


PEPPER = "p" * 32


@pytest.mark.parametrize("env, code, words", [
    ({}, "invalid_config", ("DRMERGE_API_KEY_PEPPER",)),                                   # the case
    ({"DRMERGE_API_KEY_PEPPER": "short"}, "invalid_config", ("DRMERGE_API_KEY_PEPPER", "16 characters")),
    ({"DRMERGE_API_KEY_PEPPER": PEPPER, "DRMERGE_REDIS_URL": "localhost:6379"}, "invalid_config",
     ("DRMERGE_REDIS_URL",)),
    ({"DRMERGE_API_KEY_PEPPER": PEPPER, "DRMERGE_API_PORT": "eighty"}, "invalid_config", ("DRMERGE_API_PORT",)),
    ({"DRMERGE_AUTH": "sometimes"}, "invalid_config", ("DRMERGE_AUTH",)),
])
def test_api_misconfigured(env, code, words):
    assert_fails(drmerge("api", "--port", str(free_port()), env=env), code, *words, exit_code=1)


def test_api_port_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = drmerge("api", "--port", str(port), env={"DRMERGE_API_KEY_PEPPER": PEPPER})
    assert_fails(r, "unavailable", f"127.0.0.1:{port}", "--port")


def test_api_unknown_host():
    r = drmerge("api", "--host", "no-such-host.invalid", "--port", str(free_port()),
                env={"DRMERGE_API_KEY_PEPPER": PEPPER})
    assert_fails(r, "invalid_config", "no-such-host.invalid")


@pytest.mark.parametrize("env, words", [
    ({"DRMERGE_WORKER_DEVICE": "tpu"}, ("DRMERGE_WORKER_DEVICE",)),
    ({"DRMERGE_WORKER_DEVICE": "cuda"}, ("no CUDA device",)),  # no GPU on this machine
    ({"DRMERGE_BROKER_URL": "amqp-ish"}, ("DRMERGE_BROKER_URL",)),
])
def test_worker_misconfigured(env, words):
    assert_fails(drmerge("worker", env=env), "invalid_config", *words, exit_code=1)


def test_keys_without_redis():
    r = drmerge("keys", "list", env={"DRMERGE_API_KEY_PEPPER": PEPPER,
                                     "DRMERGE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert_fails(r, "unavailable", "Redis")


def test_keys_bad_setting():
    assert_fails(drmerge("keys", "list", env={"DRMERGE_API_KEY_PEPPER": "short"}), "invalid_config",
                 "DRMERGE_API_KEY_PEPPER")


def test_dev_status_and_up_failures(tmp_path):
    r = drmerge("dev", "status", "--dir", str(tmp_path / "none"), cwd=tmp_path)
    assert_fails(r, "not_found", "drmerge dev up", exit_code=1)
    # No redis-server to be found: the stack cannot start, and says what to install.
    r = drmerge("dev", "up", "--dir", str(tmp_path / "stack"), "--port", str(free_port()),
                env={"PATH": "/nonexistent"}, cwd=tmp_path)
    assert_fails(r, "unavailable", "redis-server", exit_code=1)


@pytest.mark.parametrize("args, env, code, words", [
    (("jobs",), {"DRMERGE_API_URL": "ftp://example"}, "invalid_request", ("http(s)://",)),
    (("status", "mrg_01aaaaaaaaaaaaaaaaaaaaaaaa"), {"DRMERGE_API_URL": "not a url at all"}, "invalid_request", ()),
    (("jobs", "--metadata", "novalue"), {}, "invalid_request", ("KEY=VALUE",)),
])
def test_client_commands(tmp_path, args, env, code, words):
    assert_fails(drmerge(*args, env=env, cwd=tmp_path), code, *words)


def test_client_against_something_that_is_not_the_api(tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "merges").write_text("<html>not an API</html>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = drmerge("jobs", env={"DRMERGE_API_URL": f"http://127.0.0.1:{server.server_port}"}, cwd=tmp_path)
    finally:
        server.shutdown()
    assert_fails(r, "invalid_response", "drmerge API", exit_code=3)


@pytest.mark.parametrize("args", [("merge",), ("keys",), ("jobs", "--limit", "many"), ("frobnicate",)])
def test_usage_errors(args):
    r = drmerge(*args)
    assert_fails(r, "invalid_request", "--help", exit_code=2)
    assert "usage: drmerge" in r.stderr


def test_engine_commands_keep_the_contract(tmp_path):
    assert_fails(drmerge("validate", str(tmp_path / "missing.yaml")), "invalid_spec")
    (tmp_path / "bad.yaml").write_text("models: [a/]\noutput: out/\nmethod: drm\n")
    assert_fails(drmerge("merge", str(tmp_path / "bad.yaml")), "invalid_spec", "base_model")

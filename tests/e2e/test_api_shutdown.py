"""SIGTERM to the API process (``drmerge api``: uvicorn) while a request is in flight: the
listener closes at once, idle keep-alive connections are closed, the request still
completes with its normal answer, then the process exits cleanly."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from tests.support.stack import Stack, wait_until

pytestmark = pytest.mark.slow


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_sigterm_lets_an_in_flight_request_finish(redis_server, s3_server, tmp_path):
    stack = Stack(redis_server.url, s3_server, tmp_path / "logs")
    try:
        body = json.dumps({"spec": {"base_model": "s3://bkt/base/", "models": ["s3://bkt/ft/"],
                                    "output": "s3://bkt/out-shutdown/"}}).encode()
        head = (f"POST /v1/merges HTTP/1.1\r\nHost: 127.0.0.1:{stack.port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {stack.api_key}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        slow = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        slow.sendall(head + body[:20])  # a slow client: the request is in flight
        idle = socket.create_connection(("127.0.0.1", stack.port), timeout=30)  # keep-alive, no request

        stack.api_proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(stack.port), 20, "the listener to close")
        assert stack.api_proc.poll() is None  # still running: it waits for the request
        assert idle.recv(1) == b""  # an idle connection is simply closed

        slow.sendall(body[20:])
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            chunk = slow.recv(65536)
            if not chunk:
                break
            reply += chunk
        status_line = reply.split(b"\r\n", 1)[0]
        assert status_line == b"HTTP/1.1 202 Accepted", reply[:300]
        job = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        assert job["status"] == "queued" and stack.store.require(job["id"]).status == "queued"
        # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done, so a
        # supervisor sees the usual "terminated by SIGTERM" (and not a crash code)
        assert stack.api_proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in open(tmp_path / "logs" / "api.log").read()
        slow.close()
        idle.close()
    finally:
        stack.stop()


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v)
    return 1 << 30

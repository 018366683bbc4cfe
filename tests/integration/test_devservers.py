"""The dev/test server launchers: they come up on free ports, side by side, keep data
where asked, and go away when stopped."""

from __future__ import annotations

import socket

import pytest

from tests.support.servers import ServerStartError, start_redis, start_seaweedfs


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def resp(port: int, *args: str) -> bytes:
    """One Redis command over a raw socket (RESP), so this test needs no client library."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(payload.encode())
        return s.recv(4096)


def test_redis_answers_and_stops(tmp_path, redis_server):
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.ping()
    other = start_redis(tmp_path / "r")
    assert other.port != redis_server.port
    assert resp(other.port, "SET", "k", "v") == b"+OK\r\n"
    assert resp(redis_server.port, "GET", "k") == b"$-1\r\n"  # separate servers
    other.stop()
    other.stop()  # idempotent
    assert not port_open(other.port)


def test_redis_appendonly_survives_a_restart(tmp_path):
    server = start_redis(tmp_path / "aof", appendonly=True)
    assert resp(server.port, "SET", "job:1", "queued") == b"+OK\r\n"
    server.stop()  # SIGTERM: redis flushes the AOF on a clean shutdown
    again = start_redis(tmp_path / "aof", port=server.port, appendonly=True)
    try:
        assert resp(again.port, "GET", "job:1") == b"$6\r\nqueued\r\n"
    finally:
        again.stop()


def test_two_seaweedfs_run_side_by_side_and_stop(tmp_path, s3_server):
    # Parallel test runs each start their own server: no fixed port may be shared.
    second = start_seaweedfs(tmp_path / "sw2")
    try:
        assert not set(second.ports.values()) & set(s3_server.ports.values())
        client = second.client()
        client.create_bucket(Bucket="side-by-side")
        client.put_object(Bucket="side-by-side", Key="k", Body=b"v")
        assert "side-by-side" not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    finally:
        second.stop(timeout=3)
    assert not second.running
    assert not port_open(second.ports["s3"])


def test_a_taken_port_is_a_clear_error_or_a_relaunch(tmp_path, monkeypatch):
    from drmerge_ops import devservers

    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        # A fixed port that is taken: fail with the server's own words.
        with pytest.raises(ServerStartError, match="(?s)exited.*in use"):
            start_redis(tmp_path / "fixed", port=taken)
        # A picked port that got taken before the server bound it: relaunch elsewhere.
        picks = iter([taken])
        real_free_port = devservers.free_port
        monkeypatch.setattr(devservers, "free_port", lambda *a: next(picks, None) or real_free_port(*a))
        server = start_redis(tmp_path / "picked")
        try:
            assert server.port != taken and server.ping()
        finally:
            server.stop()

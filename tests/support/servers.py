"""Real servers for tests, and a TCP proxy that breaks connections on purpose.

The launch logic lives in ``drmerge_ops.devservers`` (``drmerge dev up`` uses it too); this
module re-exports it for tests and adds what only tests need: ``DroppingProxy`` sits
between a client and a real server and cuts connections mid-response, which is how a
flaky network looks to the client and the one failure a stopped server cannot produce;
``BucketSupply`` hands out fresh buckets without making each test wait for one.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from drmerge_ops.devservers import (
    DEV_ACCESS_KEY_ID,
    DEV_REGION,
    DEV_SECRET_ACCESS_KEY,
    RedisServer,
    SeaweedFS,
    ServerStartError,
    free_port,
    free_ports,
    start_redis,
    start_seaweedfs,
)


__all__ = [
    "DEV_ACCESS_KEY_ID", "DEV_REGION", "DEV_SECRET_ACCESS_KEY", "RedisServer", "SeaweedFS",
    "ServerStartError", "free_port", "free_ports", "start_redis", "start_seaweedfs",
    "BucketSupply", "DroppingProxy", "FaultyS3Proxy", "empty_and_delete_bucket",
]

_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


class DroppingProxy:
    """Forwards 127.0.0.1:<port> to ``upstream_url``. After ``arm(cuts, after_bytes,
    request_prefix)`` the next ``cuts`` responses that grow past ``after_bytes`` bytes are
    cut off there by closing the connection; ``request_prefix`` (e.g. ``b"POST "``)
    restricts this to responses to requests that start with it. ``after_bytes=0`` loses
    a response entirely (the request did reach the server)."""

    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._cuts_left = 0
        self._after = 0
        self._prefix: bytes | None = None
        self.cuts_made = 0
        self._socks: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="dropping-proxy", daemon=True)
        self._thread.start()

    def arm(self, cuts: int, after_bytes: int = 0, request_prefix: bytes | None = None) -> None:
        with self._lock:
            self._cuts_left = cuts
            self._after = after_bytes
            self._prefix = request_prefix

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks.update((client, server))
            conn = {"request": b"", "response_bytes": 0}
            threading.Thread(target=self._pump, args=(client, server, conn, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, conn, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: dict, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not downstream:
                    if data.startswith(_METHODS):  # a new request on this connection
                        conn["request"] = data[:256]
                        conn["response_bytes"] = 0
                    dst.sendall(data)
                    continue
                sent = conn["response_bytes"]
                with self._lock:
                    cut = (
                        self._cuts_left > 0
                        and sent + len(data) > self._after
                        and (self._prefix is None or conn["request"].startswith(self._prefix))
                    )
                    if cut:
                        self._cuts_left -= 1
                        self.cuts_made += 1
                        keep = max(0, self._after - sent)
                if cut:
                    if keep:
                        dst.sendall(data[:keep])
                    break
                dst.sendall(data)
                conn["response_bytes"] = sent + len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._socks.discard(src)
                self._socks.discard(dst)

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class BucketSupply:
    """Hands out fresh, empty, uniquely named buckets and deletes them afterwards.

    SeaweedFS allocates a bucket's volume on its first non-empty write, which takes about
    0.2 s; the supply creates the next bucket in the background and warms it with a
    one-byte object (deleted again) while the current test runs, so tests start at once.
    """

    def __init__(self, client, prefix: str = "t"):
        self.client = client
        self.prefix = prefix
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bucket-supply")
        self._next = None

    def _prepare(self) -> str:
        name = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        self.client.put_object(Bucket=name, Key=".warm", Body=b"w")
        self.client.delete_object(Bucket=name, Key=".warm")
        return name

    def take(self) -> str:
        ready = self._next or self._pool.submit(self._prepare)
        self._next = self._pool.submit(self._prepare)
        return ready.result()

    def release(self, bucket: str) -> None:
        empty_and_delete_bucket(self.client, bucket)

    def close(self) -> None:
        if self._next is not None:
            try:
                self.release(self._next.result())
            except Exception:
                pass
            self._next = None
        self._pool.shutdown(wait=True)


def empty_and_delete_bucket(client, bucket: str) -> None:
    """Delete a bucket whatever it holds (SeaweedFS does that in one call; AWS and MinIO
    need it emptied first)."""
    try:
        client.delete_bucket(Bucket=bucket)
        return
    except client.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") != "BucketNotEmpty":
            raise
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", ()):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


class FaultyS3Proxy:
    """An HTTP proxy in front of a real S3 server that misbehaves on purpose, per request.

    Rules, checked in the order added, match on method, path and query (``match(method,
    path, query) -> bool``) and act on the first ``count`` matching requests (None: all):

    - ``fail(status, code)``: answer with an S3 error (``503 SlowDown``, ``500
      InternalError``, ``403 AccessDenied``) without forwarding the request;
    - ``drop``: read the request, then close the connection without an answer;
    - ``cut``: forward, then close the connection halfway through the response body;
    - ``hold``: keep the request waiting (not forwarded) until ``release()``, then drop
      it: a client stuck on a slow server, whatever happens to the client meanwhile;
    - ``delay``: wait ``seconds``, then forward: a slow (far away, overloaded) server.

    Every request is recorded in ``log`` as (method, path, query, what happened).
    Headers are forwarded untouched, so SigV4 signatures made for the proxy's address stay
    valid upstream (as with ``DroppingProxy``).
    """

    def __init__(self, upstream_url: str):
        import http.server

        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self.rules: list[dict] = []
        self.log: list[tuple[str, str, str, str]] = []
        self.held = threading.Event()  # set when a request is being held
        self._release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)
        self._thread.start()

    # -- rules ----------------------------------------------------------------------------
    def add(self, action: str, match, count: int | None = None, status: int = 503, code: str = "SlowDown",
            seconds: float = 0.0) -> dict:
        rule = {"action": action, "match": match, "left": count, "status": status, "code": code, "hits": 0,
                "seconds": seconds}
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forget every rule and the request log."""
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def release(self) -> None:
        self._release.set()

    def writes(self) -> list[tuple[str, str, str, str]]:
        return [e for e in self.log if e[0] in ("PUT", "POST", "DELETE")]

    def _pick(self, method: str, path: str, query: str) -> dict | None:
        with self._lock:
            for rule in self.rules:
                if rule["left"] == 0 or not rule["match"](method, path, query):
                    continue
                if rule["left"] is not None:
                    rule["left"] -= 1
                rule["hits"] += 1
                return rule
        return None

    # -- one request ----------------------------------------------------------------------
    def _handle(self, h) -> None:
        import http.client

        method = h.command
        path, _, query = h.path.partition("?")
        length = int(h.headers.get("Content-Length") or 0)
        if h.headers.get("Transfer-Encoding"):
            raise RuntimeError("chunked request bodies are not supported by FaultyS3Proxy")
        body = h.rfile.read(length) if length else b""
        rule = self._pick(method, path, query)
        action = rule["action"] if rule else "forward"
        self.log.append((method, path, query, action))
        if action == "hold":
            self.held.set()
            self._release.wait(120)
            action = "drop"
        if action == "delay":
            time.sleep(rule["seconds"])
            action = "forward"
        if action == "drop":
            h.close_connection = True
            return
        if action == "fail":
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule["code"]}</Code>'
                   f'<Message>injected by FaultyS3Proxy</Message><RequestId>faulty</RequestId></Error>').encode()
            h.send_response_only(rule["status"])
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", "0" if method == "HEAD" else str(len(xml)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(xml)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.putrequest(method, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in ("expect", "connection", "keep-alive", "content-length"):
                    conn.putheader(k, v)
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            h.close_connection = True
            return
        finally:
            conn.close()
        h.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in ("transfer-encoding", "connection", "keep-alive"):
                continue
            if k.lower() == "content-length" and method != "HEAD":
                continue
            h.send_header(k, v)
        if method != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if method == "HEAD":
            return
        if action == "cut" and len(data) > 1:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data)

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""Real servers for tests, and a TCP proxy that breaks connections on purpose.

The launch logic lives in ``drmerge.devservers`` (``drmerge dev up`` uses it too); this
module re-exports it for tests and adds what only tests need: ``DroppingProxy`` sits
between a client and a real server and cuts connections mid-response, which is how a
flaky network looks to the client and the one failure a stopped server cannot produce;
``BucketSupply`` hands out fresh buckets without making each test wait for one.
"""

from __future__ import annotations

import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from drmerge.devservers import (
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
    "BucketSupply", "DroppingProxy", "empty_and_delete_bucket",
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

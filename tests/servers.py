"""Real servers for tests, and a TCP proxy that breaks connections on purpose.

The launch logic lives in ``drmerge.devservers`` (``drmerge dev up`` uses it too); this
module re-exports it for tests and adds what only tests need: ``DroppingProxy`` sits
between a client and a real server and cuts connections mid-response, which is how a
flaky network looks to the client and the one failure a stopped server cannot produce.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

from drmerge.devservers import (  # noqa: F401  (re-exported for fixtures)
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


class DroppingProxy:
    """Forwards 127.0.0.1:<port> to ``upstream_url``. After ``arm(cuts, after_bytes)``
    the next ``cuts`` connections that carry more than ``after_bytes`` bytes towards the
    client are closed at that point (mid-body for any response larger than that)."""

    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._cuts_left = 0
        self._after = 0
        self.cuts_made = 0
        self._socks: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="dropping-proxy", daemon=True)
        self._thread.start()

    def arm(self, cuts: int, after_bytes: int) -> None:
        with self._lock:
            self._cuts_left = cuts
            self._after = after_bytes

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
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if downstream:
                    with self._lock:
                        cut = self._cuts_left > 0 and sent + len(data) > self._after
                        if cut:
                            self._cuts_left -= 1
                            self.cuts_made += 1
                    if cut:
                        dst.sendall(data[: max(0, self._after - sent)])
                        break
                dst.sendall(data)
                sent += len(data)
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

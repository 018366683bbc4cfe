"""The dev/test server launchers where no server starts: free ports are distinct, a
missing binary is a clear error (the servers themselves: tests/integration/test_devservers.py)."""

from __future__ import annotations

import pytest

from tests.support.servers import ServerStartError, free_ports, start_redis, start_seaweedfs


def test_free_ports_are_distinct():
    ports = free_ports(20)
    assert len(set(ports)) == 20


def test_missing_binary_is_a_clear_error(tmp_path):
    with pytest.raises(ServerStartError, match="not on PATH"):
        start_redis(tmp_path, binary="no-such-redis-server")
    with pytest.raises(ServerStartError, match="not on PATH"):
        start_seaweedfs(tmp_path, binary="no-such-weed")

"""Redis restarted (AOF persistence on, as in the compose file and the Kubernetes manifest)
while one job runs and others wait in the queue: the API answers 503 while Redis is away,
the worker's merge keeps going, everybody reconnects, no job is lost and every job
finishes exactly once (no spurious re-queue: the reaper waits for fresh heartbeats after
an outage)."""

from __future__ import annotations

import pytest

from tests.support.checkpoints import _family, local_merge, output_files
from tests.support.servers import start_redis
from tests.support.stack import FAST_RECOVERY, Stack, wait_until

pytestmark = pytest.mark.slow


def test_jobs_survive_a_redis_restart(s3_server, s3_client, s3_bucket, tmp_path):
    redis_dir = tmp_path / "redis"
    server = start_redis(redis_dir, appendonly=True)
    port = server.port
    fam = _family(tmp_path, s3_client, s3_bucket, n_layers=30, dim=8)
    stack = Stack(server.url, s3_server, tmp_path / "logs", **FAST_RECOVERY)
    try:
        stack.start_worker("a")
        specs = [fam.spec(f"merged/{i}/", shard_size="2KB") for i in range(3)]
        jobs = [stack.submit(spec) for spec in specs]
        first = jobs[0]["id"]
        stack.wait_for(first, lambda j: j["status"] == "running" and j["progress"]["tensors_done"] >= 5,
                       what="the first job to be merging")
        assert [stack.job(j["id"])["status"] for j in jobs[1:]] == ["queued", "queued"]

        server.stop()  # SIGTERM: Redis flushes its AOF and exits
        r = stack.http.get(f"/v1/merges/{first}")
        assert r.status_code == 503 and r.json()["code"] == "unavailable" and r.headers["retry-after"]
        server = start_redis(redis_dir, port=port, appendonly=True)  # same data, same address

        late = stack.submit(fam.spec("merged/late/", shard_size="2KB"))  # the API's broker link is back too
        done = [stack.wait(j["id"], timeout=150) for j in jobs + [late]]
        assert [d["status"] for d in done] == ["succeeded"] * 4, done
        assert [d["attempts"] for d in done] == [1, 1, 1, 1]
        for d in done:
            statuses = [e["to"] for e in stack.events(d["id"]) if e["type"] == "status"]
            assert statuses == ["queued", "running", "succeeded"], (d["id"], statuses)
        expected = local_merge(specs[0], fam, tmp_path / "local")
        got = output_files(s3_client, done[0])
        assert all(got[n] == expected[n] for n in expected) and sorted(got) == sorted([*expected, "drmerge.json"])
        # and the broker queue is empty: nothing is waiting to run a second time
        wait_until(lambda: stack.store.r.llen(stack.settings.queue) == 0, 30, "an empty queue")
    finally:
        stack.stop()
        server.stop()

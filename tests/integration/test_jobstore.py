"""The Redis job store against a real redis-server: state machine, idempotency, listing,
events, progress fencing, webhook claims, heartbeats."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from service.jobs.errors import IdempotencyConflict, IllegalTransition, JobNotFound, OutputBusy, StaleAttempt
from service.jobs.model import new_job_id
from service.jobs.status import STATUSES, TERMINAL, TRANSITIONS


def new(store, output=None, **kw):
    job, created = store.create({"method": "drm"}, output or f"s3://bkt/{uuid.uuid4().hex}/", **kw)
    assert created
    return job


def force(store, job_id, path):
    """Walk a job through ``path`` of statuses (attempt fencing follows the claims)."""
    for to in path:
        job = store.require(job_id)
        fields = {"attempts": job.attempts + 1, "started_at": time.time()} if to == "running" else {}
        store.transition(job_id, to, fields=fields, attempt=job.attempts if to == "running" else None)


def test_create_stores_a_queued_job_with_its_event(store):
    job = new(store, metadata={"team": "nlp"}, webhook={"url": "http://x.test/h", "secret": "s3cr3t-value"})
    got = store.require(job.id)
    assert got.status == "queued" and got.metadata == {"team": "nlp"} and got.attempts == 0
    pub = got.public()
    assert pub["webhook"] == {"url": "http://x.test/h", "status": "waiting", "attempts": 0, "last_error": None,
                              "delivered_at": None}
    assert "s3cr3t-value" not in repr(pub)
    assert pub["progress"]["fraction"] == 0.0 and pub["created_at"].endswith("Z")
    events = store.events(job.id)
    assert [(e["type"], e.get("to")) for e in events] == [("status", "queued")]
    assert store.counts()["queued"] == 1


@pytest.mark.parametrize("src", STATUSES)
@pytest.mark.parametrize("dst", STATUSES)
def test_every_transition_follows_the_table(store, src, dst):
    paths = {"queued": [], "running": ["running"], "cancelling": ["running", "cancelling"],
             "succeeded": ["running", "succeeded"], "failed": ["running", "failed"],
             "cancelled": ["cancelled"]}
    job = new(store)
    force(store, job.id, paths[src])
    assert store.require(job.id).status == src
    if dst in TRANSITIONS[src]:
        assert store.transition(job.id, dst) == src
        assert store.require(job.id).status == dst
        counts = store.counts()
        assert counts[dst] == 1 and sum(counts.values()) == 1
    else:
        with pytest.raises(IllegalTransition) as e:
            store.transition(job.id, dst)
        assert e.value.current == src
        assert store.require(job.id).status == src


def test_terminal_states_have_no_way_out_and_set_finished_at(store):
    for s in TERMINAL:
        assert TRANSITIONS[s] == frozenset()
    job = new(store)
    force(store, job.id, ["running", "succeeded"])
    j = store.require(job.id)
    assert j.finished_at is not None and j.started_at <= j.finished_at


def test_transition_of_unknown_job_and_bad_sources(store):
    with pytest.raises(JobNotFound):
        store.transition(new_job_id(), "running")
    job = new(store)
    with pytest.raises(ValueError):
        store.transition(job.id, "succeeded", from_={"queued"})  # queued -> succeeded is never legal
    with pytest.raises(ValueError):
        store.transition(job.id, "paused")


def test_concurrent_claims_only_one_wins(store):
    job = new(store)
    wins, losses = [], []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        try:
            store.transition(job.id, "running", from_={"queued"}, attempt=0, fields={"attempts": 1, "worker": f"w{i}"})
            wins.append(i)
        except (IllegalTransition, StaleAttempt):
            losses.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert store.require(job.id).worker == f"w{wins[0]}"


def test_attempt_fencing_blocks_a_superseded_worker(store):
    job = new(store)
    store.transition(job.id, "running", attempt=0, fields={"attempts": 1})
    store.transition(job.id, "running", attempt=1, fields={"attempts": 2})  # reclaimed after a lost worker
    with pytest.raises(StaleAttempt):
        store.transition(job.id, "succeeded", attempt=1)
    assert not store.write_progress(job.id, 1, {"stage": "merging"})
    assert store.write_progress(job.id, 2, {"stage": "merging", "tensors_done": 1}, 10, 5)
    store.transition(job.id, "succeeded", attempt=2)
    assert not store.write_progress(job.id, 2, {"stage": "late"})  # terminal: progress is frozen
    assert store.require(job.id).progress["stage"] == "merging"
    assert store.stats()["bytes_read"] == "10" and store.stats()["bytes_written"] == "5"


def test_idempotency_same_body_same_job_other_body_conflict(store):
    a, created = store.create({"x": 1}, "s3://bkt/a/", idempotency_key="k-1", request_hash="h1")
    assert created
    b, created = store.create({"x": 1}, "s3://bkt/a/", idempotency_key="k-1", request_hash="h1")
    assert not created and b.id == a.id
    with pytest.raises(IdempotencyConflict) as e:
        store.create({"x": 2}, "s3://bkt/b/", idempotency_key="k-1", request_hash="h2")
    assert e.value.job_id == a.id
    c, created = store.create({"x": 1}, "s3://bkt/c/", idempotency_key="k-2", request_hash="h1")
    assert created and c.id != a.id
    assert store.counts()["queued"] == 2


def test_one_active_job_per_output(store):
    a = new(store, output="s3://bkt/out/")
    with pytest.raises(OutputBusy) as e:
        new(store, output="s3://bkt/out/")
    assert e.value.job_id == a.id
    store.transition(a.id, "cancelled")
    b = new(store, output="s3://bkt/out/")  # released by the terminal transition
    assert b.id != a.id


def test_an_output_inside_or_around_an_active_one_is_busy_too(store):
    """Issue 18 item 2: reservations cover prefixes, not strings. A job writing inside
    another's output (or around it) would interleave shards with it, and its cancel or
    failure would delete the other's files."""
    root = f"s3://bkt/{uuid.uuid4().hex}/"
    a = new(store, output=root + "out/")
    for output in (root + "out/", root + "out/sub/", root + "out/sub/deeper/", root, "s3://bkt/"):
        with pytest.raises(OutputBusy) as e:
            new(store, output=output)
        assert e.value.job_id == a.id and e.value.held == root + "out/", output
        assert root + "out/" in str(e.value)
    b = new(store, output=root + "outx/")  # a sibling whose name starts the same: free
    c = new(store, output=root + "other/sub/")
    with pytest.raises(OutputBusy) as e:  # inside it: found among all active outputs by prefix
        new(store, output=root + "other/")
    assert (e.value.job_id, e.value.held) == (c.id, root + "other/sub/")
    assert "which contains" not in str(e.value) and f"{root}other/sub/, inside {root}other/" in str(e.value)
    for job in (a, b, c):
        store.transition(job.id, "cancelled")
    assert store.r.zrangebylex(store.keys.outputs_sorted, f"[{root}", f"({root}\xff") == []
    d = new(store, output=root)  # every reservation under it was released
    store.transition(d.id, "cancelled")


def test_local_outputs_are_reserved_on_whole_segments(store):
    root = f"/srv/merges-{uuid.uuid4().hex[:8]}"
    a = new(store, output=root + "/out")
    with pytest.raises(OutputBusy) as e:
        new(store, output=root + "/out/sub")
    assert (e.value.job_id, e.value.held) == (a.id, root + "/out")
    with pytest.raises(OutputBusy):
        new(store, output=root)
    store.transition(new(store, output=root + "/outx").id, "cancelled")


def test_only_canonical_outputs_are_reserved(store):
    for output in ("s3://bkt//x/", "s3://bkt/x", "relative/out", "/srv/a/../b"):
        with pytest.raises(ValueError):
            store.create({"method": "drm"}, output)


def test_listing_is_newest_first_with_cursor_and_status_filter(store):
    ids = [new(store).id for _ in range(7)]
    for i in ids[:3]:
        store.transition(i, "cancelled")
    jobs, more = store.list(limit=3)
    assert [j.id for j in jobs] == ids[::-1][:3] and more
    seen = []
    after = None
    while True:
        page, more = store.list(limit=3, after=after)
        seen += [j.id for j in page]
        if not more:
            break
        after = page[-1].id
    assert seen == ids[::-1]
    cancelled, more = store.list(status="cancelled", limit=10)
    assert [j.id for j in cancelled] == ids[:3][::-1] and not more
    queued, _ = store.list(status="queued", limit=2, after=ids[5])
    assert [j.id for j in queued] == [ids[4], ids[3]]
    assert store.list(status="failed")[0] == []


def test_cancel_queued_is_immediate_and_running_goes_through_cancelling(store):
    q = new(store)
    assert store.request_cancel(q.id).status == "cancelled"
    assert store.request_cancel(q.id).status == "cancelled"  # idempotent
    r = new(store)
    force(store, r.id, ["running"])
    pubsub = store.subscribe_cancels()
    time.sleep(0.05)
    assert store.request_cancel(r.id).status == "cancelling"
    assert store.is_cancel_requested(r.id)
    msg = None
    for _ in range(20):
        msg = pubsub.get_message(timeout=0.1)
        if msg:
            break
    assert msg and msg["data"] == r.id
    pubsub.close()
    done = new(store)
    force(store, done.id, ["running", "succeeded"])
    with pytest.raises(IllegalTransition):
        store.request_cancel(done.id)
    with pytest.raises(JobNotFound):
        store.request_cancel(new_job_id())


def test_events_are_numbered_trimmable_and_pageable(store):
    job = new(store)
    force(store, job.id, ["running"])
    store.add_event(job.id, "warning", "tensor x has an odd shape")
    store.write_progress(job.id, 1, {"stage": "merging"}, event={"type": "stage", "message": "stage: merging"})
    store.transition(job.id, "succeeded")
    events = store.events(job.id)
    assert [e["id"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["type"] for e in events] == ["status", "status", "warning", "stage", "status"]
    assert events[-1]["from"] == "running" and events[-1]["to"] == "succeeded"
    assert [e["id"] for e in store.events(job.id, after=3)] == [4, 5]
    assert [e["id"] for e in store.events(job.id, limit=2)] == [1, 2]


def test_terminal_transition_queues_the_webhook_and_records_duration(store):
    job = new(store, webhook={"url": "http://x.test/h"})
    store.transition(job.id, "running", attempt=0, fields={"attempts": 1, "started_at": time.time() - 3})
    store.transition(job.id, "failed", fields={"error": {"code": "corrupt_checkpoint", "message": "m", "param": None}})
    assert store.require(job.id).webhook_state == {"status": "pending", "attempts": 0}
    assert store.webhooks.claim_due(lease_s=30) == job.id
    assert store.webhooks.claim_due(lease_s=30) is None  # leased
    stats = store.stats()
    assert stats["dur:failed:count"] == "1" and "dur:failed:1" not in stats and stats["dur:failed:5"] == "1"
    assert 2.5 < float(stats["dur:failed:sum"]) < 60
    plain = new(store)
    store.transition(plain.id, "cancelled")
    assert store.webhooks.claim_due(lease_s=30) is None  # no webhook, nothing queued


def test_expired_webhook_lease_is_claimed_again(store):
    job = new(store, webhook={"url": "http://x.test/h"})
    store.transition(job.id, "cancelled")
    assert store.webhooks.claim_due(lease_s=0.2) == job.id
    assert store.webhooks.claim_due(lease_s=0.2) is None  # the lease is held
    deadline = time.monotonic() + 5
    while (again := store.webhooks.claim_due(lease_s=0.2)) is None:  # until the lease expires
        assert time.monotonic() < deadline, "the expired lease was never claimed again"
        time.sleep(0.02)
    assert again == job.id


def test_heartbeats_count_live_workers(store):
    store.workers.heartbeat("w1", {"pid": 1}, ttl_s=5)
    store.workers.heartbeat("w2", {"pid": 2}, ttl_s=5)
    assert sorted(store.workers.live(5)) == ["w1", "w2"]
    store.r.zadd(store.keys.workers, {"w2": time.time() - 10})  # w2 went quiet 10 s ago
    assert store.workers.live(5) == ["w1"]
    store.workers.remove("w1")
    assert store.workers.live(5) == []


def test_an_active_output_inside_with_a_non_ascii_name_is_found(store):
    """The lookup of outputs inside a new one ends its range at byte 255, which no UTF-8
    text holds: a child whose name has characters past U+00AD ('é', CJK) is inside too.
    (When the script lived in a Python string, '\\255' there became U+00AD, and these
    children sorted after the end of the range.)"""
    root = f"s3://bkt/{uuid.uuid4().hex}/"
    for child in ("é/", "日本/", "\u00ae/"):
        a = new(store, output=root + child)
        with pytest.raises(OutputBusy) as e:
            new(store, output=root)
        assert (e.value.job_id, e.value.held) == (a.id, root + child)
        store.transition(a.id, "cancelled")

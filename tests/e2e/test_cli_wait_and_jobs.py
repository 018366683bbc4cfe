"""`drmerge wait` at an 80-column terminal (a real pty) on a real job of the real service,
the job's warnings in `wait` and `status`, and what `drmerge jobs` says of jobs that
ended badly (never 100% for a failed job, never an ETA for a cancelled one)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from service.jobs.status import JobStatus
from tests.support.checkpoints import make_family, upload_folder
from tests.support.terminal import display_width, run_on_pty, screen_lines, segments

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BAR = re.compile(r"\d+%\|.*\| \d+/\d+ tensors \[\d\d:\d\d<(\d\d:\d\d|\?), ([\d.]+|\?) tensors/s\]")


def _env(stack, key=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRMERGE_")}
    env.update(DRMERGE_API_URL=stack.api_url, DRMERGE_API_KEY=key or stack.api_key,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def drmerge(stack, *args, key=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "drmerge_ops", *args], env=_env(stack, key), cwd=cwd,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def warning_family(tmp_path, s3_client, s3_bucket):
    """Many small tensors (a merge of seconds) whose plan warns once per model: the base
    has a tensor, ignored by select, that the fine-tunes lack."""
    import torch
    from safetensors.torch import load_file, save_file

    local = make_family(str(tmp_path / "ckpt"), n_models=2, n_layers=80, dim=8)
    path = os.path.join(local["base"], "model.safetensors")
    tensors = load_file(path)
    tensors["extra.scale"] = torch.ones(4)
    save_file(tensors, path)
    uris = {name: upload_folder(s3_client, folder, s3_bucket, f"warn/{name}") for name, folder in local.items()}
    return {"base_model": uris["base"], "models": [{"model": uris["ft-1"]}, {"model": uris["ft-2"]}],
            "method": "drm", "select": {"ignore": [r"extra\..*"]}, "output": f"s3://{s3_bucket}/merged/wait-pty/"}, uris


def test_wait_at_80_columns_shows_a_bar_and_the_warnings(service_stack, warning_family, tmp_path):
    spec, uris = warning_family
    job = service_stack.submit(spec)
    rc, stdout, raw = run_on_pty([sys.executable, "-m", "drmerge_ops", "wait", job["id"], "--interval", "0.2"],
                                 columns=80, env=_env(service_stack), cwd=tmp_path)
    assert rc == 0, raw.decode("utf-8", "replace")
    assert f"{job['id']}  succeeded" in stdout
    drawn = segments(raw)
    bars = [s for s in drawn if BAR.search(s)]
    assert bars and "242/242 tensors" in bars[-1] and "100%" in bars[-1], drawn
    redraws = [s for s in drawn if not s.startswith("warning: ")]
    assert all(display_width(s) <= 80 for s in redraws), [s for s in redraws if display_width(s) > 80]
    assert not any("0/0" in s for s in drawn)
    warnings = [f"warning: {uris[m]} lacks 1 tensor(s) that are copied from the base anyway (not floating-point, "
                "or ignored by select): extra.scale" for m in ("ft-1", "ft-2")]
    screen = screen_lines(raw, 80)
    # In place: what stays on screen is the warnings (whole, wrapped at 80) and the final bar.
    assert len(screen) == sum(math.ceil(display_width(w) / 80) for w in warnings) + 1, "\n".join(screen)
    assert BAR.search(screen[-1]) and "100%" in screen[-1]
    flat = "".join(screen)
    assert all(w in flat for w in warnings) and flat.count("warning: ") == 2
    # `status` lists the job's warnings too.
    status = drmerge(service_stack, "status", job["id"], cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "  warnings " in status.stdout and all(w.removeprefix("warning: ") in status.stdout for w in warnings)


def _ended_job(stack, tenant: str, status: JobStatus, progress: dict, **fields) -> str:
    """A job record in a state a worker leaves (all tensors merged, then the final write
    failed; or cancelled while its ETA was 12 s), written through the real job store."""
    store = stack.store
    job, _ = store.create({"method": "drm", "models": [{"model": "s3://b/m/"}], "output": f"s3://b/o-{uuid.uuid4().hex}/"},
                          f"s3://b/o-{uuid.uuid4().hex}/", tenant=tenant, queue="nobody-consumes-this")
    store.transition(job.id, JobStatus.RUNNING, from_={JobStatus.QUEUED}, attempt=0,
                     fields={"attempts": 1, "worker": "w", "started_at": time.time()})
    store.write_progress(job.id, 1, progress)
    if status == JobStatus.CANCELLED:
        store.transition(job.id, JobStatus.CANCELLING, from_={JobStatus.RUNNING})
        store.transition(job.id, JobStatus.CANCELLED, from_={JobStatus.CANCELLING}, attempt=1)
    else:
        store.transition(job.id, status, from_={JobStatus.RUNNING}, attempt=1, fields=fields)
    return job.id


def test_jobs_never_says_100_percent_for_a_failed_job_nor_an_eta_for_a_cancelled_one(service_stack, tmp_path):
    tenant = f"jobs-{uuid.uuid4().hex[:8]}"
    key = service_stack.new_key(tenant)
    done = {"stage": "finalizing", "tensors_done": 40, "tensors_total": 40, "bytes_read": 1, "bytes_written": 1,
            "fraction": 1.0, "eta_seconds": 0.0}
    failed = _ended_job(service_stack, tenant, JobStatus.FAILED, done,
                        error={"code": "storage_error", "message": "the index could not be written", "param": None})
    cancelled = _ended_job(service_stack, tenant, JobStatus.CANCELLED,
                           dict(done, stage="merging", tensors_done=10, fraction=0.25, eta_seconds=12.0))
    with service_stack.client(key) as c:
        assert c.get(f"/v1/merges/{cancelled}").json()["progress"]["eta_seconds"] is None  # an ended job has no ETA
    r = drmerge(service_stack, "jobs", key=key, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:4] == ["ID", "STATUS", "PROGRESS", "ETA"]
    by_id = {line.split()[0]: line.split() for line in rows}
    assert by_id[failed][1:4] == ["failed", "99%", "-"]
    assert by_id[cancelled][1:4] == ["cancelled", "25%", "-"]
    status = drmerge(service_stack, "status", failed, key=key, cwd=tmp_path)
    assert "99%" in status.stdout and "100%" not in status.stdout and "eta" not in status.stdout


def test_events_follow_streams_until_the_job_ends(service_stack, slow_family, tmp_path):
    import json

    job = service_stack.submit(slow_family.spec("merged/events-follow/"))
    r = drmerge(service_stack, "events", job["id"], "--follow", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    ids = [e["id"] for e in events]
    assert ids == list(range(1, len(ids) + 1))  # every event once, in order, none lost at the switch to the stream
    assert events[-1]["type"] == "status" and events[-1]["to"] == "succeeded"
    assert any(e["type"] == "stage" and e.get("stage") == "merging" for e in events)

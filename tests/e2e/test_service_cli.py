"""The terminal client (`drmerge submit/status/wait/jobs/cancel/events`) against the real
service: output people read, and exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def drmerge(*args, api_url: str, cwd, stdin: str | None = None, timeout: float = 180, api_key: str | None = None):
    env = dict(os.environ, DRMERGE_API_URL=api_url, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DRMERGE_API_KEY", None)
    if api_key:
        env["DRMERGE_API_KEY"] = api_key
    return subprocess.run([sys.executable, "-m", "drmerge_ops", *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def write_spec(tmp_path, spec: dict, name="spec.yaml") -> str:
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_submit_wait_status_jobs_events(service_stack, family, tmp_path):
    url, key = service_stack.api_url, service_stack.api_key
    path = write_spec(tmp_path, family.spec("merged/cli/"))
    sub = drmerge("submit", path, "-m", "who=cli", api_url=url, api_key=key, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert job_id.startswith("mrg_") and "\n" not in job_id  # script-friendly: just the id
    wait = drmerge("wait", job_id, "--interval", "0.2", api_url=url, api_key=key, cwd=tmp_path)
    assert wait.returncode == 0, wait.stderr
    assert f"{job_id}  succeeded" in wait.stdout and "model.safetensors" in wait.stdout
    assert "succeeded" in wait.stderr  # the progress bar's last line
    status = drmerge("status", job_id, "--json", api_url=url, api_key=key, cwd=tmp_path)
    assert status.returncode == 0 and json.loads(status.stdout)["metadata"] == {"who": "cli"}
    jobs = drmerge("jobs", "--status", "succeeded", "--limit", "100", api_url=url, api_key=key, cwd=tmp_path)
    assert jobs.returncode == 0 and job_id in jobs.stdout
    events = drmerge("events", job_id, api_url=url, api_key=key, cwd=tmp_path)
    assert events.returncode == 0 and "succeeded" in events.stdout and "stage: merging" in events.stdout


def test_wait_exits_1_with_the_error_code_on_failure(service_stack, family, tmp_path, s3_bucket):
    spec = family.spec("merged/cli-fail/")
    spec["models"][0] = {"model": f"s3://{s3_bucket}/missing/"}
    url, key = service_stack.api_url, service_stack.api_key
    sub = drmerge("submit", "-", "--wait", "--json", api_url=url, api_key=key, cwd=tmp_path, stdin=json.dumps(spec))
    assert sub.returncode == 1, sub.stderr
    assert json.loads(sub.stdout)["error"]["code"] == "input_not_found"
    assert sub.stderr.strip().splitlines()[-1].startswith("error: input_not_found: ")


def test_cancel_then_wait_exits_2(service_stack, slow_family, tmp_path):
    url, key = service_stack.api_url, service_stack.api_key
    job_id = drmerge("submit", write_spec(tmp_path, slow_family.spec("merged/cli-cancel/")), api_url=url, api_key=key,
                     cwd=tmp_path).stdout.strip()
    service_stack.wait_for(job_id, lambda j: j["status"] == "running")
    cancel = drmerge("cancel", job_id, api_url=url, api_key=key, cwd=tmp_path)
    assert cancel.returncode == 0 and job_id in cancel.stdout
    wait = drmerge("wait", job_id, "--interval", "0.2", api_url=url, api_key=key, cwd=tmp_path)
    assert wait.returncode == 2, (wait.stdout, wait.stderr)
    assert wait.stderr.strip().splitlines()[-1].startswith("error: cancelled")


def test_api_errors_exit_3_with_code(service_stack, tmp_path):
    url, key = service_stack.api_url, service_stack.api_key
    bad = write_spec(tmp_path, {"models": ["s3://bkt-x/a/"], "output": "s3://bkt-x/o/", "method": "drm"})
    r = drmerge("submit", bad, api_url=url, api_key=key, cwd=tmp_path)
    assert r.returncode == 3
    assert r.stderr.strip().startswith("error: invalid_spec: ") and "(param: spec.base_model)" in r.stderr
    r = drmerge("status", "mrg_01zzzzzzzzzzzzzzzzzzzzzzzz", api_url=url, api_key=key, cwd=tmp_path)
    assert r.returncode == 3 and r.stderr.startswith("error: not_found: ")
    r = drmerge("jobs", api_url="http://127.0.0.1:9", cwd=tmp_path, timeout=60)
    assert r.returncode == 3 and r.stderr.startswith("error: unreachable: ")

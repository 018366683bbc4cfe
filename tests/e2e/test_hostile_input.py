"""Hostile input through the service (real API, worker, Redis and S3): malformed
safetensors and index files on S3, catastrophic regexes, huge and deeply nested requests,
unicode and broken unicode. Each gets a clear error code, leaves nothing written, and the
worker keeps serving (tests/unit/test_bad_input.py has the engine-level versions)."""

from __future__ import annotations

import json
import struct
import time

import pytest

from drmerge.checkpoint import MAX_HEADER_BYTES
from service.jobs.status import TERMINAL
from tests.support.checkpoints import list_keys, pending_uploads, write_checkpoint



def raw_safetensors(header, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


F32_2x2 = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
HOSTILE_FILES = {
    "header length 2^63": raw_safetensors(F32_2x2, b"\0" * 16, header_len=2**63),
    "header just over 100 MB": raw_safetensors(F32_2x2, b"\0" * 16, header_len=MAX_HEADER_BYTES + 1),
    "header not JSON": raw_safetensors(b'{"w": {"dtype": "F32", "shape": [2, 2], "data_off', b"\0" * 16),
    "offsets past the end": raw_safetensors(F32_2x2, b"\0" * 8),
    "overlapping tensors": raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    "unknown dtype": raw_safetensors({"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, b"\0" * 32),
    "shape product overflows": raw_safetensors(
        {"w": {"dtype": "F32", "shape": [2**52, 2**52, 2**52, 2**52], "data_offsets": [0, 16]}}, b"\0" * 16),
    "lone surrogate in a tensor name": raw_safetensors(
        b'{"w\\ud800": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', b"\0" * 16),
}


def assert_refused(service_stack, s3_client, bucket, job, code, in_message=None, param=...):
    done = service_stack.wait(job["id"], timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == code, done["error"]
    if in_message:
        assert in_message in done["error"]["message"], done["error"]
    if param is not ...:
        assert done["error"]["param"] == param
    out_prefix = done["spec"]["output"].split("/", 3)[3]
    assert list_keys(s3_client, bucket, out_prefix) == []  # nothing written
    assert pending_uploads(s3_client, bucket) == []
    return done


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_malformed_safetensors_on_s3(service_stack, family, s3_client, s3_bucket, case):
    s3_client.put_object(Bucket=s3_bucket, Key="ft-2/model.safetensors", Body=HOSTILE_FILES[case])
    job = service_stack.submit(family.spec("merged/hostile/"))
    done = assert_refused(service_stack, s3_client, s3_bucket, job, "corrupt_checkpoint",
                          f"s3://{s3_bucket}/ft-2/model.safetensors")
    if case == "header just over 100 MB":
        assert "limit" in done["error"]["message"]


@pytest.mark.parametrize("target", ["../base/model.safetensors", "missing-00001.safetensors"])
def test_index_pointing_outside_the_checkpoint_or_to_a_missing_shard(service_stack, family, s3_client, s3_bucket,
                                                                     target):
    body = s3_client.get_object(Bucket=s3_bucket, Key="ft-1/model.safetensors")["Body"].read()
    s3_client.put_object(Bucket=s3_bucket, Key="ft-1/model-00001-of-00001.safetensors", Body=body)
    s3_client.delete_object(Bucket=s3_bucket, Key="ft-1/model.safetensors")
    names = [k for k in json.loads(body[8:8 + struct.unpack("<Q", body[:8])[0]]) if k != "__metadata__"]
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    weight_map[names[0]] = target
    s3_client.put_object(Bucket=s3_bucket, Key="ft-1/model.safetensors.index.json",
                         Body=json.dumps({"weight_map": weight_map}).encode())
    job = service_stack.submit(family.spec("merged/index/"))
    assert_refused(service_stack, s3_client, s3_bucket, job, "corrupt_checkpoint", target.rsplit("/", 1)[-1])


def test_catastrophic_backtracking_is_stopped(service_stack, s3_client, s3_bucket, tmp_path):
    import torch

    from tests.support.checkpoints import upload_folder

    # exponential in the name's length: ~0.5 s at 20 characters, doubling per character
    pattern = "(.*){1,32000}[bc]"
    g = torch.Generator().manual_seed(3)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    uris = []
    for label in ("base", "ft-1", "ft-2"):
        folder = write_checkpoint(tmp_path / label, {n: torch.randn(8, 8, generator=g) for n in names})
        uris.append(upload_folder(s3_client, folder, s3_bucket, f"llama/{label}"))
    spec = {"base_model": uris[0], "models": uris[1:], "output": f"s3://{s3_bucket}/merged/regex/",
            "select": {"linear": [pattern, ".*weight"]}}
    t0 = time.monotonic()
    job = service_stack.submit(spec)
    done = assert_refused(service_stack, s3_client, s3_bucket, job, "invalid_spec", "backtracks",
                          param="select.linear[0]")
    assert time.monotonic() - t0 < 45
    assert done["progress"]["tensors_done"] == 0


def test_regex_compile_bombs_are_refused_at_submit(service_stack, family):
    for pattern, why in [("(?:(?:(?:a{99}){99}){99}){99}", "repeats too much"), ("(" * 600, "at most 512")]:
        t0 = time.monotonic()
        r = service_stack.http.post("/v1/merges", json={"spec": family.spec("merged/bomb/",
                                                                            select={"exclude": [pattern]})})
        assert r.status_code == 422 and r.json()["code"] == "invalid_spec", r.text
        assert r.json()["param"] == "spec.select.exclude[0]" and why in r.json()["detail"]
        assert time.monotonic() - t0 < 5


def test_ten_thousand_models_are_refused_fast(service_stack, family):
    before = service_stack.http.get("/v1/merges", params={"limit": 100}).json()["data"]
    spec = family.spec("merged/many/")
    spec["models"] = [{"model": f"s3://{family.bucket}/m{i}/", "weight": 1.0} for i in range(10_000)]
    t0 = time.monotonic()
    r = service_stack.http.post("/v1/merges", json={"spec": spec})
    assert r.status_code in (413, 422) and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert r.json()["code"] in ("invalid_spec", "invalid_request", "payload_too_large")
    assert time.monotonic() - t0 < 5
    assert service_stack.http.get("/v1/merges", params={"limit": 100}).json()["data"] == before  # no job


@pytest.mark.parametrize("where", ["spec", "metadata"])
def test_deeply_nested_json_is_a_client_error(service_stack, family, where):
    depth = 100_000
    nested = "[" * depth + "]" * depth
    if where == "spec":
        body = '{"spec": {"models": ' + nested + ', "output": "s3://b/o/"}}'
    else:
        body = '{"spec": ' + json.dumps(family.spec("merged/deep/")) + ', "metadata": {"k": ' + nested + "}}"
    r = service_stack.http.post("/v1/merges", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["code"] in ("invalid_request", "invalid_spec"), r.text
    assert service_stack.http.get("/livez").status_code == 200


@pytest.mark.parametrize("field,value", [
    ("output", "s3://bkt/out-\ud800/"),
    ("metadata", {"team\udfff": "nlp"}),
    ("select", {"linear": ["\ud83d.*"]}),
])
def test_lone_surrogates_in_a_request_are_refused(service_stack, family, field, value):
    body = {"spec": family.spec("merged/surrogate/")}
    if field == "metadata":
        body["metadata"] = value
    else:
        body["spec"][field] = value
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as a \\ud800 escape
    r = service_stack.http.post("/v1/merges", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "lone surrogate" in r.json()["detail"], r.text
    assert r.json()["code"] == ("invalid_request" if field == "metadata" else "invalid_spec")


def test_unicode_tensor_names_and_paths(service_stack, s3_client, s3_bucket, tmp_path):
    import torch

    from drmerge.pipeline import run_merge
    from drmerge.spec import parse_spec
    from tests.support.checkpoints import upload_folder

    g = torch.Generator().manual_seed(7)
    names = ["模型.层.0.weight", "слой.1.вес.weight", "emoji.😀.bias", "café/ü.norm.weight"]
    base = {n: torch.randn(8, 8, generator=g) if n.endswith(".weight") else torch.randn(8, generator=g) for n in names}
    local, uris = {}, {}
    for label in ("基座", "ft-ü", "ft-😀"):
        tensors = base if label == "基座" else {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        local[label] = write_checkpoint(tmp_path / label, tensors)
        uris[label] = upload_folder(s3_client, local[label], s3_bucket, f"模型/{label}")
    spec = {"base_model": uris["基座"], "models": [{"model": uris["ft-ü"]}, {"model": uris["ft-😀"]}],
            "method": "drm", "output": f"s3://{s3_bucket}/出力/ünï-😀/"}
    done = service_stack.wait(service_stack.submit(spec, metadata={"équipe": "🤖"})["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["metadata"] == {"équipe": "🤖"} and done["spec"]["output"] == spec["output"]
    got = s3_client.get_object(Bucket=s3_bucket, Key="出力/ünï-😀/model.safetensors")["Body"].read()
    header = json.loads(got[8:8 + struct.unpack("<Q", got[:8])[0]])
    assert sorted(k for k in header if k != "__metadata__") == sorted(names)
    local_spec = dict(spec, base_model=local["基座"], models=[{"model": local["ft-ü"]}, {"model": local["ft-😀"]}],
                      output=str(tmp_path / "out"))
    run_merge(parse_spec(local_spec), device="cpu")
    assert got == (tmp_path / "out" / "model.safetensors").read_bytes()
    listed = service_stack.http.get("/v1/merges", params={"limit": 5}).json()["data"]
    assert any(j["id"] == done["id"] for j in listed)


# ---------------------------------------------------------------- hostile adapters and indexes (issue 18, 3 and 4)

def upload_adapter(s3_client, bucket: str, prefix: str, config: dict) -> str:
    """A PEFT-layout LoRA adapter for the ``family`` checkpoints (rank 2 on layers.0.proj)."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(5)
    tensors = {"base_model.model.layers.0.proj.lora_A.weight": torch.randn(2, 16, generator=g),
               "base_model.model.layers.0.proj.lora_B.weight": torch.randn(16, 2, generator=g)}
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/adapter_model.safetensors", Body=save(tensors))
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/adapter_config.json", Body=json.dumps(config).encode())
    return f"s3://{bucket}/{prefix}/"


def worker_pid(service_stack) -> str:
    return service_stack.store.r.hget(f"{service_stack.store.p}:worker:{service_stack.worker_name()}", "pid")


LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"]}


@pytest.mark.parametrize("case", ["compile bomb", "150,000 keys"])
def test_a_hostile_adapter_config_is_refused_fast_and_the_worker_lives_on(service_stack, family, s3_client,
                                                                          s3_bucket, case):
    """A 120-byte adapter_config.json whose rank_pattern key compiles for minutes (it
    OOM-killed workers in turn), and one with 150,000 keys (it planned for 237 s): both
    refused as corrupt_checkpoint in seconds; the same worker process takes the next job."""
    keys = {"(?:(?:(?:a{99}){99}){99}){99}": 2} if case == "compile bomb" else \
        {f"layers.{i}.q": 2 for i in range(150_000)}
    lora = upload_adapter(s3_client, s3_bucket, "lora-hostile", dict(LORA_CONFIG, rank_pattern=keys))
    pid = worker_pid(service_stack)
    assert pid
    spec = family.spec("merged/hostile-lora/", method="task_arithmetic")
    spec["models"] = [spec["models"][0], {"model": lora}]
    t0 = time.monotonic()
    done = assert_refused(service_stack, s3_client, s3_bucket, service_stack.submit(spec), "corrupt_checkpoint",
                          "adapter_config.json rank_pattern", param="models[1].model")
    assert time.monotonic() - t0 < 30  # the bomb compiles for minutes; the keys planned for 237 s
    assert ("repeats too much" if case == "compile bomb" else "150000 keys") in done["error"]["message"]
    good = upload_adapter(s3_client, s3_bucket, "lora-good", dict(LORA_CONFIG, rank_pattern={"proj": 2}))
    spec["models"][1] = {"model": good}
    after = service_stack.wait(service_stack.submit(dict(spec, output=f"s3://{s3_bucket}/merged/after-lora/"))["id"])
    assert after["status"] == "succeeded", after
    assert worker_pid(service_stack) == pid  # the same worker process, alive


def test_an_oversized_index_is_refused_unread(service_stack, family, s3_client, s3_bucket):
    """A model.safetensors.index.json over MAX_INDEX_BYTES is refused by its size (a 1 GiB
    one, read whole, took a worker from 0.5 to 2.5 GB)."""
    from drmerge.checkpoint import MAX_INDEX_BYTES

    body = s3_client.get_object(Bucket=s3_bucket, Key="ft-1/model.safetensors")["Body"].read()
    s3_client.put_object(Bucket=s3_bucket, Key="ft-1/model-00001-of-00001.safetensors", Body=body)
    s3_client.delete_object(Bucket=s3_bucket, Key="ft-1/model.safetensors")
    index = json.dumps({"weight_map": {}}).encode()
    s3_client.put_object(Bucket=s3_bucket, Key="ft-1/model.safetensors.index.json",
                         Body=index + b" " * (MAX_INDEX_BYTES + 1 - len(index)))
    pid = worker_pid(service_stack)
    assert pid
    t0 = time.monotonic()
    done = assert_refused(service_stack, s3_client, s3_bucket, service_stack.submit(family.spec("merged/big-index/")),
                          "corrupt_checkpoint", "model.safetensors.index.json")
    assert str(MAX_INDEX_BYTES) in done["error"]["message"] and time.monotonic() - t0 < 30
    assert worker_pid(service_stack) == pid


def test_the_worker_survived_all_of_it(service_stack, family):
    """After every hostile job above, the same worker process still takes work."""
    live = service_stack.http.get("/readyz").json()["workers"]
    assert live["live"] == 1
    done = service_stack.wait(service_stack.submit(family.spec("merged/after/"))["id"], timeout=60)
    assert done["status"] == "succeeded", done

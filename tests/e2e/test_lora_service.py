"""PEFT adapters through the service: adapters uploaded to the real S3 server, merged by
HTTP API -> Redis -> Celery worker -> S3, into a full checkpoint and into an adapter.
Each output is downloaded and compared with the same merge of the local copies."""

from __future__ import annotations

import json
import os

import pytest
import torch

from drmerge import merge
from tests.support.checkpoints import list_keys, upload_folder
from tests.support.lora_helpers import load_model, make_adapter, make_base, state

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_service")
    base = make_base(str(d / "base"))
    return {"base": base,
            "a1": make_adapter(base, str(d / "a1"), seed=1, r=4, lora_alpha=8, target_modules=TARGETS,
                               task_type="CAUSAL_LM"),
            "a2": make_adapter(base, str(d / "a2"), seed=2, r=2, lora_alpha=4, use_rslora=True,
                               target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"),
            # lm_head: PEFT saves a full copy of it, which the engine compares with the base over S3
            "a3": make_adapter(base, str(d / "a3"), seed=3, r=2, target_modules=["o_proj", "lm_head"])}


@pytest.fixture
def uris(local, s3_client, s3_bucket):
    return {name: upload_folder(s3_client, folder, s3_bucket, f"in/{name}") for name, folder in local.items()}


def download(s3_client, uri: str, into) -> str:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    os.makedirs(into, exist_ok=True)
    for key in list_keys(s3_client, bucket, prefix):
        s3_client.download_file(bucket, key, os.path.join(into, key.rsplit("/", 1)[1]))
    return str(into)


def run_job(stack, spec: dict) -> dict:
    done = stack.wait(stack.submit(spec)["id"])
    assert done["status"] == "succeeded", (done, stack.log_tail())
    return done


def check_result_files(s3_client, job, folder) -> None:
    """The job's result lists exactly what is in S3 (plus drmerge.json), sizes and hashes."""
    import hashlib

    names = sorted(f["name"] for f in job["result"]["files"])
    assert sorted(os.listdir(folder)) == sorted(names + ["drmerge.json"])
    for f in job["result"]["files"]:
        data = open(os.path.join(folder, f["name"]), "rb").read()
        assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"], f["name"]


def local_spec(spec: dict, local: dict, uris: dict, output) -> dict:
    by_uri = {u: local[n] for n, u in uris.items()}
    out = dict(spec, output=str(output), models=[dict(m, model=by_uri[m["model"]]) for m in spec["models"]])
    if "base_model" in spec:
        out["base_model"] = by_uri[spec["base_model"]]
    return out


def test_full_output_from_s3_adapters(service_stack, s3_client, s3_bucket, local, uris, tmp_path):
    spec = {"base_model": uris["base"], "models": [{"model": uris["a1"]}, {"model": uris["a2"], "weight": 0.5},
                                                  {"model": uris["a3"]}],
            "method": "drm", "parameters": {"scale": 0.8}, "output": f"s3://{s3_bucket}/merged/full/"}
    job = run_job(service_stack, spec)
    got_dir = download(s3_client, spec["output"], tmp_path / "got")
    check_result_files(s3_client, job, got_dir)
    assert {"model.safetensors", "config.json"} <= set(os.listdir(got_dir)) and job["result"]["adapter"] is None
    merge(local_spec(spec, local, uris, tmp_path / "want"), device="cpu")
    want = state(str(tmp_path / "want"))
    loaded = load_model(got_dir).state_dict()  # transformers loads it
    base = state(local["base"])
    changed = 0
    for name, w in want.items():
        assert torch.equal(loaded[name], w), name
        changed += not torch.equal(w, base[name])
    assert changed == 11  # q, v, up (a1), q, down (a2), o (a3): 5 modules in 2 layers; lm_head (a3)


def test_adapter_output_from_s3_adapters_without_base(service_stack, s3_client, s3_bucket, local, uris, tmp_path):
    from peft import PeftModel

    spec = {"models": [{"model": uris["a1"]}, {"model": uris["a2"], "weight": 0.5}], "method": "drm",
            "output_format": "adapter", "adapter_rank": 4, "output": f"s3://{s3_bucket}/merged/adapter/"}
    job = run_job(service_stack, spec)
    assert job["spec"].get("base_model") is None and job["spec"]["output_format"] == "adapter"
    got_dir = download(s3_client, spec["output"], tmp_path / "got")
    check_result_files(s3_client, job, got_dir)
    assert sorted(os.listdir(got_dir)) == ["adapter_config.json", "adapter_model.safetensors", "drmerge.json"]
    merge(local_spec(spec, local, uris, tmp_path / "want"), device="cpu")
    from safetensors.torch import load_file

    got = load_file(os.path.join(got_dir, "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "want" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want) and len(got) == 16  # A and B of 8 modules
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert json.load(open(os.path.join(got_dir, "adapter_config.json"))) == \
        json.load(open(tmp_path / "want" / "adapter_config.json"))
    marker = json.load(open(os.path.join(got_dir, "drmerge.json")))
    assert marker["adapter"]["rank"] == 4 and 0 < marker["adapter"]["energy_kept"] <= 1
    assert len(marker["adapter"]["modules"]) == 8
    assert job["result"]["adapter"] == {"rank": 4, "energy_kept": marker["adapter"]["energy_kept"]}
    # PEFT loads the downloaded adapter onto the base
    model = PeftModel.from_pretrained(load_model(local["base"]), got_dir)
    merged = model.merge_and_unload().state_dict()
    base = state(local["base"])
    assert sum(not torch.equal(merged[n], base[n]) for n in base) == 8


def test_a_refused_adapter_fails_the_job_naming_adapter_and_module(service_stack, s3_client, s3_bucket, local,
                                                                   uris, tmp_path):
    """A DoRA adapter in S3: the job fails with invalid_spec, the message names the adapter
    (its S3 location) and a module, and nothing is written."""
    from tests.support.lora_helpers import edit_config
    from tests.e2e.test_worker_merge import assert_failed

    dora = make_adapter(local["base"], str(tmp_path / "dora"), seed=5, r=2, target_modules=["q_proj"])
    edit_config(dora, use_dora=True)
    dora_uri = upload_folder(s3_client, dora, s3_bucket, "in/dora")
    spec = {"models": [{"model": uris["a1"]}, {"model": dora_uri}], "output_format": "adapter",
            "output": f"s3://{s3_bucket}/merged/refused/"}
    done = assert_failed(service_stack, s3_client, service_stack.submit(spec), "invalid_spec", "models[1].model")
    message = done["error"]["message"]
    assert "DoRA" in message and dora_uri in message and "model.layers.0.self_attn.q_proj" in message, message

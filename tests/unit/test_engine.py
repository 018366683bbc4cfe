"""The engine end to end on real transformers checkpoints: CLI, Python API, outputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import drmerge
from drmerge.cli import main
from drmerge.errors import MergeError
from drmerge import methods
from drmerge.methods.base import MATRIX, VECTOR
from drmerge.execute import merged_tensors
from drmerge.inputs import Inputs
from drmerge.pipeline import run_merge
from drmerge.spec import parse_spec

from tests.support.factories import load_tensors, make_family

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli_process(*args):
    """The real entry point in a child process (as scripts call it)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "drmerge", *args], capture_output=True, text=True, env=env)


def cli(*args):
    """The same CLI in-process (fast): returns an object shaped like CompletedProcess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, models = make_family(str(root), n_models=3)
    return str(root), base, models


@pytest.fixture(scope="module")
def sharded_bf16_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base, models = make_family(str(root), n_models=2, arch="llama", dtype=torch.bfloat16, shard_size="20KB")
    return str(root), base, models


def write_spec(path, spec: dict) -> str:
    with open(path, "w") as f:
        json.dump(spec, f)
    return str(path)


def test_cli_merge_with_relative_paths_loads_in_transformers(family, tmp_path):
    root, base, models = family
    spec_path = os.path.join(root, f"spec-{tmp_path.name}.yaml")
    with open(spec_path, "w") as f:
        f.write(f"base_model: base\nmodels:\n  - model: ft0\n  - model: ft1\n    weight: 0.5\n  - ft2\n"
                f"method: drm\nparameters: {{direction: horizontal, drop_rate: 0.7}}\noutput: out-{tmp_path.name}\n")
    res = cli_process("merge", spec_path)
    assert res.returncode == 0, res.stderr
    out = os.path.join(root, f"out-{tmp_path.name}")
    assert "output: " + out in res.stdout
    assert sorted(os.listdir(out)) == ["config.json", "drmerge.json", "model.safetensors"]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out)
    hidden = model(torch.tensor([[1, 2, 3, 4]])).last_hidden_state
    assert hidden.shape == (1, 4, 32) and torch.isfinite(hidden).all()
    marker = json.load(open(os.path.join(out, "drmerge.json")))
    assert marker["spec"]["parameters"]["direction"] == "horizontal"
    assert marker["engine"]["name"] == "drmerge" and "timings" in marker
    files = {f["name"]: f for f in marker["files"]}
    assert files["model.safetensors"]["size"] == os.path.getsize(os.path.join(out, "model.safetensors"))


def test_merged_tensors_equal_the_method_applied_per_tensor(family, tmp_path):
    _, base, models = family
    spec = parse_spec({"base_model": base, "models": [{"model": m, "weight": w} for m, w in zip(models, [1, 0.5, 2])],
                       "method": "drm", "parameters": {"scale": 0.8}, "output": str(tmp_path / "out")})
    run_merge(spec, device="cpu")
    got = load_tensors(str(tmp_path / "out"))
    b = load_tensors(base)
    ms = [load_tensors(m) for m in models]
    w = torch.tensor([1, 0.5, 2.0])
    checked = {MATRIX: 0, VECTOR: 0}
    for name, t in got.items():
        if not t.is_floating_point():
            assert torch.equal(t, b[name])
            continue
        kind = MATRIX if t.dim() >= 2 and "embed" not in name else VECTOR
        want = methods.get("drm").merge_tensor(kind, b[name].float(), torch.stack([m[name].float() for m in ms]), w,
                                               spec.parameters)
        assert torch.equal(t, want.to(t.dtype)), name
        checked[kind] += 1
    assert checked[MATRIX] >= 8 and checked[VECTOR] >= 8


def test_sharded_bf16_inputs_and_sharded_output(sharded_bf16_family, tmp_path):
    _, base, models = sharded_bf16_family
    assert os.path.exists(os.path.join(base, "model.safetensors.index.json"))
    out = tmp_path / "out"
    spec = {"base_model": base, "models": models, "method": "ties", "output": str(out), "shard_size": "30KB"}
    res = cli("merge", write_spec(tmp_path / "spec.json", spec), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(os.path.exists(out / s) for s in shards)
    assert {f["name"] for f in summary["files"]} >= set(shards)
    tensors = load_tensors(str(out))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    from transformers import AutoModelForCausalLM  # noqa: F401  (AutoModel suffices for the backbone)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(out))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).last_hidden_state.float()).all()


def test_output_dtype_override_and_linear_without_base(family, tmp_path):
    _, base, models = family
    out = tmp_path / "lin"
    drmerge.merge({"models": models, "method": "linear", "dtype": "float16", "output": str(out)})
    tensors = load_tensors(str(out))
    ms = [load_tensors(m) for m in models]
    name = "encoder.layer.0.attention.self.query.weight"
    assert tensors[name].dtype == torch.float16
    assert torch.equal(tensors[name], (sum(m[name] for m in ms) / 3).half())


def test_any_subset_of_tensors_merges_like_the_full_run(family, tmp_path):
    _, base, models = family
    spec = parse_spec({"base_model": base, "models": models, "output": str(tmp_path / "x")})
    inputs = Inputs(spec)
    names = [t.name for t in inputs.plan.tensors]
    timings = {"read_wait_s": 0.0, "compute_s": 0.0}
    full = {tp.name: t for tp, t in merged_tensors(inputs, names, torch.device("cpu"), timings)}
    subset = names[5:12][::-1]
    part = {tp.name: t for tp, t in merged_tensors(inputs, subset, torch.device("cpu"), timings)}
    inputs.close()
    assert list(part) == subset
    assert all(torch.equal(part[n], full[n]) for n in subset)


def test_progress_and_cancel(family, tmp_path):
    _, base, models = family
    spec = parse_spec({"base_model": base, "models": models, "output": str(tmp_path / "out"), "shard_size": "20KB"})
    seen = []
    run_merge(spec, device="cpu", progress=seen.append)
    assert seen[-1].stage == "done" and seen[-1].tensors_done == seen[-1].tensors_total > 0
    assert [p.tensors_done for p in seen] == sorted(p.tensors_done for p in seen)
    assert seen[-1].bytes_read > 0 and seen[-1].bytes_written > 0

    calls = []

    def cancel_after_ten():
        calls.append(1)
        return len(calls) > 10

    out2 = tmp_path / "cancelled"
    spec2 = spec.with_overrides(output=str(out2))
    with pytest.raises(MergeError) as err:
        run_merge(spec2, device="cpu", should_cancel=cancel_after_ten)
    assert err.value.code == "cancelled"
    assert not out2.exists() or os.listdir(out2) == []


def test_existing_output_needs_overwrite(family, tmp_path):
    _, base, models = family
    spec = {"base_model": base, "models": models, "output": str(tmp_path / "out"), "shard_size": "20KB"}
    path = write_spec(tmp_path / "s.json", spec)
    assert cli("merge", path).returncode == 0
    before = sorted(os.listdir(tmp_path / "out"))
    res = cli_process("merge", path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: output_exists: ")
    assert sorted(os.listdir(tmp_path / "out")) == before
    # Overwrite with a single-file layout: stale shards of the first merge disappear.
    spec["shard_size"] = "5GB"
    res = cli("merge", write_spec(tmp_path / "s2.json", spec), "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "drmerge.json", "model.safetensors"]


def test_validate_reports_without_writing(family, tmp_path):
    _, base, models = family
    out = tmp_path / "never"
    res = cli("validate", write_spec(tmp_path / "s.json", {"base_model": base, "models": models, "output": str(out)}), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["valid"] and report["kinds"]["matrix"] > 0 and report["kinds"]["vector"] > 0
    assert not out.exists()

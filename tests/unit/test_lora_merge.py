"""End to end: adapters (and full fine-tunes) through ``run_merge`` and the CLI, into a
full checkpoint that transformers loads and into a PEFT adapter that PEFT loads."""

from __future__ import annotations

import json
import os

import pytest
import torch

from drmerge import merge
from drmerge.cli import main as cli_main
from drmerge.errors import MergeError
from drmerge.methods.drm import DrmParams, drm_matrix_delta, drm_vector_delta
from drmerge.plan import Selector
from drmerge.checkpoint import CheckpointReader
from drmerge.spec import Select
from drmerge.storage import LocalStorage
from tests.support import reference as ref
from tests.support.lora_helpers import engine_deltas, load_model, make_adapter, make_base, make_full_finetune, state

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_merge")
    base = make_base(str(d / "base"))
    a1 = make_adapter(base, str(d / "a1"), seed=1, r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    a2 = make_adapter(base, str(d / "a2"), seed=2, r=8, lora_alpha=16, use_rslora=True,
                      target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    a3 = make_adapter(base, str(d / "a3"), seed=3, r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"],
                      rank_pattern={"down_proj": 3}, task_type="CAUSAL_LM")
    full = make_full_finetune(base, str(d / "full"), seed=4)
    adapters = [a1, a2, a3]
    deltas = engine_deltas(base, adapters)
    # What the dense path sees for mixed inputs: float32 products and differences.
    deltas32 = engine_deltas(base, adapters, torch.float32)
    base_state, full_state = state(base), state(full)
    for name in deltas:
        deltas[name].append(full_state[name].double() - base_state[name].double())
        deltas32[name].append(full_state[name] - base_state[name])
    return {"dir": d, "base": base, "adapters": adapters, "full": full, "deltas": deltas, "deltas32": deltas32}


def kinds(base):
    sel = Selector(Select())
    return {n: sel.kind(i) for n, i in CheckpointReader(LocalStorage(base)).tensors.items()}


def expected_delta(name, kind, deltas, w, p):
    stack = torch.stack(deltas)
    if kind == "matrix":
        return drm_matrix_delta(stack, w.double(), p)
    return drm_vector_delta(stack, w.double(), p)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_full_output_from_adapters(models, tmp_path, direction):
    w = [1.0, 0.5, 2.0]
    out = str(tmp_path / "out")
    spec = {"base_model": models["base"], "output": out,
            "models": [{"model": a, "weight": x} for a, x in zip(models["adapters"], w)],
            "parameters": {"direction": direction, "scale": 0.9}}
    result = merge(spec, device="cpu")
    assert not result.warnings
    assert {f["name"] for f in result.files} >= {"model.safetensors", "config.json"}
    loaded = load_model(out).state_dict()  # transformers loads it
    base = state(models["base"])
    p = DrmParams(direction=direction, scale=0.9)
    k = kinds(models["base"])
    merged_matrices = 0
    for name, b in base.items():
        got = loaded[name] if name in loaded else state(out)[name]
        ds = [d for d in models["deltas"][name][:3]]
        if all(d.abs().max() == 0 for d in ds):
            assert torch.equal(got, b), name  # untouched by every adapter: the base, bit for bit
            continue
        want_d = expected_delta(name, k[name], ds, torch.tensor(w), p)
        assert rel(got.double() - b.double(), 0.9 * want_d) < 1e-4, name
        merged_matrices += 1
    assert merged_matrices == 14


def test_mixed_full_finetune_and_adapters(models, tmp_path):
    out = str(tmp_path / "out")
    inputs = models["adapters"][:2] + [models["full"]]
    merge({"base_model": models["base"], "models": inputs, "output": out}, device="cpu")
    got = state(out)
    base = state(models["base"])
    k = kinds(models["base"])
    p = DrmParams()
    for name, b in base.items():
        ds = [models["deltas32"][name][i].double() for i in (0, 1, 3)]
        want = expected_delta(name, k[name], ds, torch.ones(3), p)
        if want.abs().max() == 0:
            assert torch.equal(got[name], b)
            continue
        assert rel(got[name].double() - b.double(), want) < 1e-4, name
    load_model(out)


def test_task_arithmetic_of_one_adapter_is_peft_merge(models, tmp_path):
    """The simplest end-to-end identity: base + 1 * delta equals PEFT's merge_and_unload."""
    from peft import PeftModel

    out = str(tmp_path / "out")
    merge({"base_model": models["base"], "models": [models["adapters"][2]], "output": out,
           "method": "task_arithmetic"}, device="cpu")
    want = PeftModel.from_pretrained(load_model(models["base"]), models["adapters"][2]).merge_and_unload().state_dict()
    got = load_model(out).state_dict()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


BASELINES = [("linear", {}), ("ties", {"density": 0.5, "scale": 0.7}), ("task_arithmetic", {"scale": 0.7})]


def expected_baseline(method, params, deltas, w):
    """The baselines' merged delta from float64 formulas (tests/support/reference.py): linear is
    ``sum_t w_t W_t / sum_t w_t``, i.e. the base plus ``sum_t w_t D_t / sum_t w_t``."""
    ds = [d.double().numpy() for d in deltas]
    if method == "linear":
        return torch.from_numpy(sum(x * d for x, d in zip(w, ds)) / sum(w))
    if method == "ties":
        return params["scale"] * torch.from_numpy(ref.ties_delta(ds, w, density=params["density"]))
    return params["scale"] * torch.from_numpy(sum(x * d for x, d in zip(w, ds)))


@pytest.mark.parametrize("method,params", BASELINES)
@pytest.mark.parametrize("with_full", [False, True])
def test_baselines_on_adapters_full_output(models, tmp_path, method, params, with_full):
    """Adapters only (matrices on the factored path; TIES materialises them) and adapters
    with a full fine-tune (everything dense): the baselines' formulas on every tensor."""
    w = [1.0, -0.3, 0.7]
    inputs = models["adapters"][:2] + [models["full"] if with_full else models["adapters"][2]]
    which = (0, 1, 3 if with_full else 2)
    out = str(tmp_path / "out")
    merge({"base_model": models["base"], "models": [{"model": m, "weight": x} for m, x in zip(inputs, w)],
           "method": method, "parameters": params, "output": out}, device="cpu")
    got, base = state(out), state(models["base"])
    merged = 0
    for name, b in base.items():
        # TIES trims the materialised float32 deltas (its cut is discontinuous); the factored
        # linear baselines are exact sums in float64.
        ds = [models["deltas32" if method == "ties" or with_full else "deltas"][name][i] for i in which]
        want = expected_baseline(method, params, ds, w)
        if want.abs().max() == 0:
            assert torch.equal(got[name], b), name  # untouched by every input: the base, bit for bit
            continue
        assert rel(got[name].double() - b.double(), want) < 1e-5, name
        merged += 1
    assert merged == (len(base) if with_full else 14)
    if method == "linear":
        assert abs(float(got["model.norm.weight"].mean()) - 1.0) < 0.05


@pytest.mark.parametrize("method,params", BASELINES)
def test_baselines_adapter_output(models, tmp_path, method, params):
    """The adapter output holds the same merged delta, linear's without lam, the others'
    times lam: exactly for the sums (rank 15 = the inputs' ranks added), and for TIES,
    whose trimmed delta has full rank, its best rank-15 approximation."""
    w = [1.0, -0.3, 0.7]
    out = str(tmp_path / "out")
    merge({"models": [{"model": a, "weight": x} for a, x in zip(models["adapters"], w)], "method": method,
           "parameters": params, "output": out, "output_format": "adapter"}, device="cpu")
    got, base = peft_merged(models["base"], out), state(models["base"])
    for name, b in base.items():
        ds = models["deltas32" if method == "ties" else "deltas"][name][:3]
        want = expected_baseline(method, params, ds, w)
        if want.abs().max() == 0:
            assert torch.equal(got[name], b), name
            continue
        if method == "ties":
            u, sv, vh = torch.linalg.svd(want, full_matrices=False)
            want = (u[:, :15] * sv[:15]) @ vh[:15]
        assert rel(got[name].double() - b.double(), want) < 1e-4, name  # PEFT merges in float32


def peft_merged(base_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_dir), adapter_dir).merge_and_unload().state_dict()


@pytest.mark.parametrize("with_base", [True, False])
def test_adapter_output_loads_in_peft_and_equals_merge(models, tmp_path, with_base):
    out = str(tmp_path / "out")
    w = [1.0, 0.5, 2.0]
    spec = {"models": [{"model": a, "weight": x} for a, x in zip(models["adapters"], w)], "output": out,
            "output_format": "adapter", "parameters": {"scale": 1.5}}
    if with_base:
        spec["base_model"] = models["base"]
    merge(spec, device="cpu")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "drmerge.json"]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["r"] == cfg["lora_alpha"] == 15 and cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == sorted(TARGETS)
    marker = json.load(open(os.path.join(out, "drmerge.json")))
    assert marker["adapter"]["rank"] == 15  # 4 + 8 + 3 (a3: r=2, down_proj 3)
    assert marker["adapter"]["energy_kept"] == pytest.approx(1.0)  # 15 >= every merged delta's rank
    got = peft_merged(models["base"], out)
    base = state(models["base"])
    p = DrmParams(scale=1.5)
    for name, b in base.items():
        ds = models["deltas"][name][:3]
        if all(d.abs().max() == 0 for d in ds):
            assert torch.equal(got[name], b), name
            continue
        want = 1.5 * drm_matrix_delta(torch.stack(ds), torch.tensor(w).double(), p)
        assert rel(got[name].double() - b.double(), want) < 1e-4, name


def test_adapter_output_truncated(models, tmp_path):
    out = str(tmp_path / "out")
    result = merge({"models": models["adapters"], "output": out, "output_format": "adapter", "adapter_rank": 3,
           "method": "task_arithmetic"}, device="cpu")
    marker = json.load(open(os.path.join(out, "drmerge.json")))["adapter"]
    got = peft_merged(models["base"], out)
    base = state(models["base"])
    kept_sum = total_sum = 0.0
    for name, b in base.items():
        ds = models["deltas"][name][:3]
        if all(d.abs().max() == 0 for d in ds):
            continue
        d = sum(ds)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        want = (u[:, :3] * s[:3]) @ vh[:3]
        assert rel(got[name].double() - b.double(), want) < 1e-4, name
        module = name[: -len(".weight")]
        kept, total = float((s[:3] ** 2).sum()), float((s ** 2).sum())
        assert marker["modules"][module]["energy_kept"] == pytest.approx(kept / total, rel=1e-6)
        assert marker["modules"][module]["rank"] == 3
        kept_sum, total_sum = kept_sum + kept, total_sum + total
    assert marker["energy_kept"] == pytest.approx(kept_sum / total_sum, rel=1e-6)
    assert marker["energy_kept"] < 0.99
    assert result.adapter == {"rank": 3, "energy_kept": marker["energy_kept"]}  # the summary a job result shows


def test_cli_merges_adapters(models, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base_model: {models['base']}\nmodels:\n"
                    + "".join(f"  - model: {a}\n" for a in models["adapters"])
                    + f"output: {tmp_path / 'out'}\noutput_format: adapter\nadapter_rank: 8\n")
    assert cli_main(["validate", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "rank-8 LoRA adapter of 14 modules (14 matrix), 28 tensors" in text
    assert "files: adapter_model.safetensors, adapter_config.json" in text
    assert cli_main(["validate", str(spec), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert cli_main(["merge", str(spec), "--json", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tensors"] == report["tensors"] == 28  # lora_A + lora_B for 14 modules
    assert report["files"] == [f["name"] for f in summary["files"]]
    assert report["output_bytes"] == os.path.getsize(tmp_path / "out" / "adapter_model.safetensors")
    assert json.load(open(tmp_path / "out" / "adapter_config.json"))["r"] == 8


@pytest.mark.parametrize("output_format, with_base", [("full", True), ("adapter", True), ("adapter", False)])
def test_validate_reports_what_merge_writes(models, tmp_path, output_format, with_base):
    """``validate`` describes the output the merge then writes: files, tensor count, bytes
    (an adapter output is a few small factors, not the full model's size)."""
    from drmerge.pipeline import validate
    from drmerge.spec import parse_spec

    out = tmp_path / "out"
    spec = {"models": models["adapters"], "output": str(out), "output_format": output_format, "shard_size": "200kB"}
    if with_base:
        spec["base_model"] = models["base"]
    report = validate(parse_spec(spec))
    assert not out.exists()
    result = merge(spec, device="cpu")
    assert report["output_format"] == output_format
    assert report["files"] == [f["name"] for f in result.files]
    assert report["tensors"] == result.tensors
    weights = [f for f in result.files if f["name"].endswith(".safetensors")]
    assert report["output_bytes"] == sum(f["size"] for f in weights)
    if output_format == "adapter":
        assert report["tensors"] == 28 and report["modules"] == 14 and report["adapter_rank"] == 15
        assert report["output_bytes"] < os.path.getsize(os.path.join(models["base"], "model.safetensors")) / 2
    else:
        assert report["shards"] == len(weights) > 1


def test_adapter_output_equals_full_output_when_lossless(models, tmp_path):
    """Same spec, two outputs: PEFT's merge of the adapter output is the full output."""
    spec = {"base_model": models["base"], "models": models["adapters"], "parameters": {"direction": "horizontal"}}
    merge({**spec, "output": str(tmp_path / "full")}, device="cpu")
    merge({**spec, "output": str(tmp_path / "ad"), "output_format": "adapter"}, device="cpu")
    full = load_model(str(tmp_path / "full")).state_dict()
    via_peft = peft_merged(models["base"], str(tmp_path / "ad"))
    base = state(models["base"])
    for name, b in base.items():
        if torch.equal(full[name], b):
            assert torch.equal(via_peft[name], b)
        else:
            assert rel(via_peft[name] - b, full[name] - b) < 1e-4, name


def test_adapter_output_partial_modules_and_small_sides(models, tmp_path):
    """select.ignore drops layer 1 (target_modules become exact names) and a rank above the
    k/v projections' short side (32) gives them a rank_pattern entry; PEFT loads both."""
    out = str(tmp_path / "out")
    result = merge({"base_model": models["base"], "models": models["adapters"], "output": out,
                    "output_format": "adapter", "adapter_rank": 40, "select": {"ignore": [r".*layers\.1\..*"]}},
                   device="cpu")
    assert any("select.ignore" in w for w in result.warnings)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["r"] == 40
    assert sorted(cfg["target_modules"]) == sorted(f"model.layers.0.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}"
                                                    for t in TARGETS)
    assert cfg["rank_pattern"] == {r"model\.layers\.0\.self_attn\.k_proj": 32, r"model\.layers\.0\.self_attn\.v_proj": 32}
    got = peft_merged(models["base"], out)
    base = state(models["base"])
    for name, b in base.items():
        if ".layers.1." in name or not any(t in name for t in TARGETS):
            assert torch.equal(got[name], b), name
        else:
            want = drm_matrix_delta(torch.stack(models["deltas"][name][:3]), torch.ones(3).double(), DrmParams())
            assert rel(got[name] - b, want) < 1e-4, name


def test_adapter_on_a_vector_like_matrix(models, tmp_path):
    """lm_head is excluded from DRM's matrix rule by default: an adapter on it is merged
    with the vector-like (TIES-style) rule on the materialised deltas, in both outputs."""
    d = tmp_path
    heads = [make_adapter(models["base"], str(d / f"h{i}"), seed=10 + i, r=4, target_modules=["q_proj", "lm_head"])
             for i in range(2)]
    ds = engine_deltas(models["base"], heads)["lm_head.weight"]
    want = drm_vector_delta(torch.stack(ds), torch.ones(2).double(), DrmParams())
    merge({"base_model": models["base"], "models": heads, "output": str(d / "full")}, device="cpu")
    b = state(models["base"])["lm_head.weight"]
    assert rel(state(str(d / "full"))["lm_head.weight"] - b, want) < 1e-4
    # PEFT saved a full copy of lm_head with each adapter (save_embedding_layers); it equals
    # the base, so the adapter output may drop it, but only after checking against the base.
    ad = {"models": heads, "output": str(d / "ad"), "output_format": "adapter", "adapter_rank": 64}
    with pytest.raises(MergeError) as e:
        merge(ad, device="cpu")
    assert e.value.code == "invalid_spec" and "save_embedding_layers" in e.value.message and "lm_head" in e.value.message
    merge({**ad, "base_model": models["base"]}, device="cpu")
    assert rel(peft_merged(models["base"], str(d / "ad"))["lm_head.weight"] - b, want) < 1e-4


def test_adapter_with_a_retrained_layer_copy(models, tmp_path):
    """A layer copy that differs from the base is what PEFT loads instead of the base
    weight: the task's lm_head is copy + B @ A. Full output merges that; adapter output refuses."""
    from safetensors.torch import load_file, save_file

    from tests.support.lora_helpers import peft_merged_state

    ad = make_adapter(models["base"], str(tmp_path / "h"), seed=21, r=4, target_modules=["q_proj", "lm_head"])
    f = os.path.join(ad, "adapter_model.safetensors")
    tensors = load_file(f)
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.01
    save_file(tensors, f)
    task_weights = peft_merged_state(models["base"], ad)  # PEFT: copy + delta
    out = str(tmp_path / "out")
    merge({"base_model": models["base"], "models": [ad], "output": out, "method": "task_arithmetic"}, device="cpu")
    got = state(out)
    for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.allclose(got[name], task_weights[name], atol=1e-6), name
    with pytest.raises(MergeError) as e:
        merge({"base_model": models["base"], "models": [ad], "output": str(tmp_path / "ad"),
               "output_format": "adapter"}, device="cpu")
    assert e.value.code == "invalid_spec" and "differs from the base" in e.value.message and "lm_head" in e.value.message


def test_gpt2_adapter_output_round_trip(tmp_path):
    """Conv1D layers (fan_in_fan_out): full output == PEFT's merge of the adapter output.
    The adapter output is given the base too: DRM splits GPT-2's fused c_attn into q, k, v,
    a preset chosen from the base's config.json (without a base there is none to read)."""
    base = make_base(str(tmp_path / "base"), kind="gpt2")
    ads = [make_adapter(base, str(tmp_path / f"a{i}"), seed=i, r=4, lora_alpha=8, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj"]) for i in range(2)]
    merge({"base_model": base, "models": ads, "output": str(tmp_path / "full")}, device="cpu")
    merge({"base_model": base, "models": ads, "output": str(tmp_path / "ad"), "output_format": "adapter"},
          device="cpu")
    assert json.load(open(tmp_path / "ad" / "adapter_config.json"))["fan_in_fan_out"] is True
    full = state(str(tmp_path / "full"))
    via_peft = peft_merged(base, str(tmp_path / "ad"))
    b = state(base)
    changed = [n for n in b if not torch.equal(full[n], b[n])]
    assert len(changed) == 6  # c_attn, attn.c_proj and mlp.c_proj in 2 layers
    for n in changed:
        assert rel(via_peft[n] - b[n], full[n] - b[n]) < 1e-4, n


def test_cancel_and_overwrite(models, tmp_path):
    out = str(tmp_path / "out")
    spec = {"models": models["adapters"], "output": out, "output_format": "adapter"}
    with pytest.raises(MergeError) as e:
        merge(spec, device="cpu", should_cancel=lambda: True)
    assert e.value.code == "cancelled" and not os.path.exists(out)
    merge(spec, device="cpu")
    with pytest.raises(MergeError) as e:
        merge(spec, device="cpu")
    assert e.value.code == "output_exists"
    merge({**spec, "overwrite": True, "adapter_rank": 2}, device="cpu")
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == 2


def test_adapter_output_service_hooks(models, tmp_path):
    """run_merge's resume/pause hooks (used by the worker) work for adapter outputs too."""
    from drmerge.errors import Interrupted
    from drmerge.pipeline import run_merge
    from drmerge.spec import parse_spec

    out = str(tmp_path / "out")
    spec = parse_spec({"models": models["adapters"], "output": out, "output_format": "adapter"})
    with pytest.raises(Interrupted):
        run_merge(spec, device="cpu", should_pause=lambda: True)
    assert not os.path.exists(out)
    journal = []
    first = run_merge(spec, device="cpu", completed_shards=[], on_shard=journal.append)
    assert [e["name"] for e in journal] == ["adapter_model.safetensors", "adapter_config.json"]
    assert all(e["plan"] for e in journal) and first.resumed == {"shards_kept": 0, "tensors_skipped": 0}
    again = run_merge(spec, device="cpu", completed_shards=journal)  # already complete: returned as is
    assert again.files == first.files and again.bytes_written == 0
    assert again.adapter == first.adapter and first.adapter["rank"] == 15

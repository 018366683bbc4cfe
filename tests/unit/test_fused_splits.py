"""Fused projections (docs/DESIGN.md, "Fused projections and orientation"): DRM merges each
part of GPT-2's c_attn, Falcon's query_key_value (all three layouts), BLOOM's and GPT-NeoX's
per-head query_key_value, Phi-3's qkv_proj (GQA) and gate_up_proj as its own matrix, as a
plain float64 DRM applied to q, k and v separately computes it; the output loads and runs
in transformers; ``select.split: false`` merges them whole, as before."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from drmerge.cli import main
from drmerge.inputs import Inputs
from drmerge.methods.base import MATRIX
from drmerge.pipeline import run_merge, validate
from drmerge.spec import parse_spec
from tests.support.architectures import ARCHS, fused_rows, is_conv1d, load_np, make_arch_family, rows_for, tiny_config
from tests.support.reference import drm_delta, rel_err

WEIGHTS = (1.0, 0.6, 1.4)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {arch: make_arch_family(str(root / arch), arch, n_models=len(WEIGHTS), seed=i)
            for i, arch in enumerate(ARCHS)}


def spec(family, out, **kw) -> dict:
    base, fts = family
    return {"base_model": base, "models": [{"model": p, "weight": w} for p, w in zip(fts, WEIGHTS)],
            "method": "drm", "output": str(out), **kw}


def expected_delta(arch, name, base, fts, direction="vertical", split=True) -> np.ndarray:
    """Plain float64 DRM of one matrix: on the linear map (Conv1D transposed), each fused part
    on its own rows (tests/support/architectures.py), written back in place."""
    w0 = base[name]
    deltas = [(ft[name] - w0).astype(np.float64) for ft in fts]  # the engine's float32 subtraction, exactly
    conv = is_conv1d(arch, name)
    lin = [d.T for d in deltas] if conv else deltas
    parts = rows_for(arch, name) if split else None
    if parts:
        out = np.zeros(lin[0].shape)
        assert sorted(r for rows in parts.values() for r in rows) == list(range(lin[0].shape[0]))
        for rows in parts.values():
            out[rows] = drm_delta([d[rows] for d in lin], WEIGHTS, direction=direction)
    else:
        out = drm_delta(lin, WEIGHTS, direction=direction)
    return out.T if conv else out


def matrices(s: dict) -> list[str]:
    inputs = Inputs(parse_spec(s))
    try:
        return [tp.name for tp in inputs.plan.tensors if tp.kind == MATRIX]
    finally:
        inputs.close()


def check_merge(arch, family, out, direction="vertical", split=True):
    extra = {"parameters": {"direction": direction}}
    if not split:
        extra["select"] = {"split": False}
    s = spec(family, out, **extra)
    run_merge(parse_spec(s), device="cpu")
    base, fts = load_np(family[0]), [load_np(p) for p in family[1]]
    got = load_np(str(out))
    names = matrices(s)
    fused = [n for n in names if rows_for(arch, n)]
    assert len(fused) == 2 * len(fused_rows(arch))  # every layer's fused tensors
    for name in names:
        want = expected_delta(arch, name, base, fts, direction, split)
        assert rel_err(got[name].astype(np.float64) - base[name], want) < 1e-5, name
    return got, fused


def runs_in_transformers(path: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 64) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_merge_each_part_as_its_own_matrix(arch, families, tmp_path):
    got, fused = check_merge(arch, families[arch], tmp_path / "split")
    runs_in_transformers(str(tmp_path / "split"))
    if arch in ("gpt2", "falcon_new", "phi3"):
        # split: false is the old behaviour (each fused matrix merged whole), and it differs
        whole, _ = check_merge(arch, families[arch], tmp_path / "whole", split=False)
        base = load_np(families[arch][0])
        for name in fused:
            assert rel_err(got[name] - base[name], whole[name] - base[name]) > 0.05, name


@pytest.mark.parametrize("arch", ["gpt2", "falcon_new"])
def test_presets_horizontal(arch, families, tmp_path):
    """Horizontal DRM on each part (GPT-2's parts are columns of the stored Conv1D weight)."""
    check_merge(arch, families[arch], tmp_path / "h", direction="horizontal")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_planned_parts_are_transformers_rows(arch, families, tmp_path):
    inputs = Inputs(parse_spec(spec(families[arch], tmp_path / "o")))
    try:
        views = {tp.name: tp.view for tp in inputs.plan.tensors if tp.view is not None and tp.view.parts}
    finally:
        inputs.close()
    assert views
    for name, view in views.items():
        want = rows_for(arch, name)
        assert want is not None, name
        got = {p.name: [r for a, b in p.ranges for r in range(a, b)] for p in view.parts}
        assert got == want, name
        assert view.axis == "out" and view.transposed == is_conv1d(arch, name)


def test_validate_lists_the_splits_and_the_transposed(families, tmp_path, capsys):
    report = validate(parse_spec(spec(families["gpt2"], tmp_path / "o")))
    split = report["splits"]["gpt2 c_attn"]
    assert split["tensors"] == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    assert split["parts"].startswith("q/k/v: 32/32/32 rows")
    assert len(report["transposed"]) == 8 and all(is_conv1d("gpt2", n) for n in report["transposed"])
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec(families["falcon_new"], tmp_path / "o2")))
    assert main(["validate", str(path)]) == 0
    text = capsys.readouterr().out
    assert "split by falcon query_key_value (new architecture: 2 kv groups of 2 q heads, k, v; head_dim 8) into " \
           "q/k/v: 32/16/16 rows of the linear map, 2 block(s) each: 2 tensors" in text
    off = validate(parse_spec(spec(families["gpt2"], tmp_path / "o3", select={"split": False})))
    assert off["splits"] == {} and len(off["transposed"]) == 8  # the orientation is not a preset: always applied


def test_element_wise_methods_are_not_split(families, tmp_path):
    s = spec(families["gpt2"], tmp_path / "o", method="ties", select={"split": [{"pattern": ".*c_attn.weight",
                                                                               "parts": 3}]})
    report = validate(parse_spec(s))
    assert report["splits"] == {} and report["transposed"] == []
    assert any("select.split has no effect with method 'ties'" in w for w in report["warnings"])


def test_a_user_rule_equals_the_preset(families, tmp_path):
    """An interleaved rule written by hand (BLOOM's per-head layout) merges as the preset does;
    rules come before the presets."""
    family = families["bloom"]
    rule = {"pattern": r".*query_key_value\.weight", "sizes": [8, 8, 8], "layout": "interleaved", "groups": 4,
            "names": ["q", "k", "v"]}
    run_merge(parse_spec(spec(family, tmp_path / "preset")), device="cpu")
    run_merge(parse_spec(spec(family, tmp_path / "rule", select={"split": {"presets": False, "rules": [rule]}})),
              device="cpu")
    a, b = load_np(str(tmp_path / "preset")), load_np(str(tmp_path / "rule"))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    report = validate(parse_spec(spec(family, tmp_path / "x", select={"split": [rule]})))
    assert list(report["splits"]) == ["select.split.rules[0]"]


def test_a_rule_that_does_not_fit_is_refused(families, tmp_path):
    from drmerge.errors import MergeError

    bad = {"pattern": r".*query_key_value\.weight", "sizes": [8, 8, 8], "layout": "interleaved", "groups": 5}
    with pytest.raises(MergeError) as e:
        validate(parse_spec(spec(families["bloom"], tmp_path / "o", select={"split": [bad]})))
    assert e.value.code == "invalid_spec" and e.value.param == "select.split.rules[0]"
    assert "96 is not divisible into 5 head groups" in e.value.message


def test_a_config_that_disagrees_with_its_weights_is_refused(families, tmp_path):
    """The preset comes from config.json; a config whose heads do not fit the weights is named."""
    import shutil

    from drmerge.errors import MergeError

    base, fts = families["falcon_new"]
    moved = str(tmp_path / "base")
    shutil.copytree(base, moved)
    config = json.load(open(os.path.join(moved, "config.json")))
    config["num_kv_heads"] = 4
    json.dump(config, open(os.path.join(moved, "config.json"), "w"))
    with pytest.raises(MergeError) as e:
        validate(parse_spec(spec((moved, fts), tmp_path / "o")))
    assert e.value.code == "incompatible_checkpoints" and "select.split: false" in e.value.message
    assert "'num_kv_heads': 4" in e.value.message
    assert validate(parse_spec(spec((moved, fts), tmp_path / "o", select={"split": False})))["splits"] == {}


def test_nn_multihead_attention_in_proj_weight(tmp_path):
    """torch's (and open_clip's) packed q, k, v: split in three contiguous parts whatever the model."""
    from tests.support.checkpoints import write_checkpoint

    g = torch.Generator().manual_seed(3)
    mha = torch.nn.MultiheadAttention(16, 2)
    base = {f"blocks.0.attn.{k}": v.detach().clone() for k, v in mha.state_dict().items()}
    paths = [write_checkpoint(tmp_path / "base", base)]
    for i in range(2):
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(write_checkpoint(tmp_path / f"ft{i}", ft))
    s = {"base_model": paths[0], "models": paths[1:], "output": str(tmp_path / "o")}
    run_merge(parse_spec(s), device="cpu")
    got = load_np(str(tmp_path / "o"))
    name = "blocks.0.attn.in_proj_weight"
    w0 = load_np(paths[0])[name]
    deltas = [(load_np(p)[name] - w0).astype(np.float64) for p in paths[1:]]
    want = np.concatenate([drm_delta([d[i * 16:(i + 1) * 16] for d in deltas], (1.0, 1.0)) for i in range(3)])
    assert rel_err(got[name] - w0, want) < 1e-5
    report = validate(parse_spec({**s, "output": str(tmp_path / "o2")}))
    assert list(report["splits"]) == ["nn.MultiheadAttention in_proj_weight"]


def test_split_spec_errors():
    from drmerge.errors import MergeError

    base = {"base_model": "/tmp/b", "models": ["/tmp/a"], "output": "/tmp/o"}
    cases = [({"split": "yes"}, "select.split", "must be true (the presets), false (no splitting) or a list"),
             ({"split": [{"pattern": "x"}]}, "select.split[0]", "give exactly one of parts"),
             ({"split": [{"pattern": "x", "parts": 1}]}, "select.split[0].parts", "must be at least 2"),
             ({"split": [{"pattern": "x", "parts": 2, "axis": 0}]}, "select.split[0].axis", "must be out"),
             ({"split": [{"pattern": "x", "parts": 2, "layout": "interleaved"}]}, "select.split[0].groups",
              "is required with layout interleaved"),
             ({"split": [{"pattern": "x", "parts": 2, "groups": 2}]}, "select.split[0].groups",
              "only applies with layout interleaved"),
             ({"split": [{"pattern": "x", "sizes": [1, 2], "names": ["a", "a"]}]}, "select.split[0].names",
              "distinct"),
             ({"split": {"presets": True, "rulez": []}}, "select.split.rulez", "unknown key"),
             ({"split": [{"pattern": "(", "parts": 2}]}, "select.split[0].pattern", "not a valid regular expression")]
    for select, param, message in cases:
        with pytest.raises(MergeError) as e:
            parse_spec({**base, "select": select})
        assert e.value.code == "invalid_spec" and e.value.param == param and message in e.value.message, e.value.message


def test_legacy_falcon_configs_are_refused(families, tmp_path):
    import shutil

    from drmerge.errors import MergeError

    base, fts = families["falcon_mq"]
    moved = str(tmp_path / "base")
    shutil.copytree(base, moved)
    config = json.load(open(os.path.join(moved, "config.json")))
    config["model_type"] = "RefinedWebModel"
    json.dump(config, open(os.path.join(moved, "config.json"), "w"))
    with pytest.raises(MergeError) as e:
        validate(parse_spec(spec((moved, fts), tmp_path / "o")))
    assert e.value.code == "invalid_spec" and "select.split" in e.value.message
    validate(parse_spec(spec((moved, fts), tmp_path / "o", select={"split": False})))


def test_tiny_config_heads():
    """The fixtures are what the presets must handle: GQA on Falcon's new architecture and Phi-3."""
    assert tiny_config("falcon_new").num_kv_heads == 2 and tiny_config("phi3").num_key_value_heads == 2

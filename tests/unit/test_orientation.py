"""One orientation (docs/DESIGN.md, "Fused projections and orientation"): GPT-2's Conv1D
stores ``in x out``; DRM decomposes the linear map ``out x in`` on every architecture, so
``vertical`` on GPT-2 is the vertical DRM of the transposed stored weight, for full
fine-tunes and LoRA adapters (PEFT's ``fan_in_fan_out``) alike. LoRA adapters on a fused
module are split factor by factor (``B[rows] A``) and stay on the low-rank path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drmerge.checkpoint import Source
from drmerge.inputs import Inputs
from drmerge.methods.base import MATRIX, Op
from drmerge.pipeline import run_merge
from drmerge.spec import parse_spec
from tests.support.architectures import is_conv1d, load_np, make_arch_family, rows_for
from tests.support.lora_helpers import engine_deltas, load_model, make_adapter, make_base, state
from tests.support.reference import drm_delta, rel_err

WEIGHTS = (1.0, 0.6, 1.4)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_arch_family(str(tmp_path_factory.mktemp("gpt2")), "gpt2", n_models=3, seed=5)


def merged(family, out, **parameters):
    base, fts = family
    s = {"base_model": base, "models": [{"model": p, "weight": w} for p, w in zip(fts, WEIGHTS)],
         "output": str(out), "parameters": parameters, "select": {"split": False}}
    run_merge(parse_spec(s), device="cpu")
    return load_np(str(out))


def test_conv1d_vertical_is_the_vertical_drm_of_the_linear_map(gpt2, tmp_path):
    got = merged(gpt2, tmp_path / "v", direction="vertical")
    horizontal = merged(gpt2, tmp_path / "h", direction="horizontal")
    base, fts = load_np(gpt2[0]), [load_np(p) for p in gpt2[1]]
    conv = [n for n in base if is_conv1d("gpt2", n)]
    assert len(conv) == 8
    for name in conv:
        deltas = [(ft[name] - base[name]).astype(np.float64) for ft in fts]  # stored: in x out
        want = drm_delta([d.T for d in deltas], WEIGHTS, direction="vertical").T
        assert rel_err(got[name] - base[name], want) < 1e-5, name
        # what "vertical" meant before: the vertical DRM of the stored in x out weight, which is
        # the horizontal DRM of the map; it differs, and is what direction: horizontal gives now
        stored = drm_delta(deltas, WEIGHTS, direction="vertical")
        assert rel_err(stored, want) > 0.05, name
        assert rel_err(horizontal[name] - base[name], stored) < 1e-5, name


def test_a_linear_weight_of_gpt2_is_not_transposed(gpt2, tmp_path):
    """GPT2ForSequenceClassification's score is nn.Linear (out x in) and excluded as a head;
    lm_head and the embeddings are no Conv1D either: only the Conv1D pattern is transposed."""
    inputs = Inputs(parse_spec({"base_model": gpt2[0], "models": gpt2[1], "output": str(tmp_path / "o")}))
    try:
        for tp in inputs.plan.tensors:
            if tp.kind == MATRIX:
                assert tp.view is not None and tp.view.transposed == is_conv1d("gpt2", tp.name), tp.name
    finally:
        inputs.close()


@pytest.fixture(scope="module")
def gpt2_lora(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2_lora")
    base = make_base(str(d / "base"), kind="gpt2")
    ads = [make_adapter(base, str(d / f"a{i}"), seed=10 + i, r=4, lora_alpha=8, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj"]) for i in range(3)]
    return base, ads


@pytest.mark.parametrize("split", [True, False])
def test_lora_on_conv1d_and_fused_modules_stays_factored(gpt2_lora, tmp_path, split):
    base, ads = gpt2_lora
    s = {"base_model": base, "models": [{"model": a, "weight": w} for a, w in zip(ads, WEIGHTS)],
         "output": str(tmp_path / "o"), **({} if split else {"select": {"split": False}})}
    inputs = Inputs(parse_spec(s))
    try:
        adapted = {tp.name: tp for tp in inputs.plan.tensors
                   if tp.op == Op.LOWRANK and Source.FACTORED in tp.sources}
    finally:
        inputs.close()
    assert len(adapted) == 6 and all(tp.view.transposed for tp in adapted.values())
    assert all(bool(tp.view.parts) == (split and "c_attn" in n) for n, tp in adapted.items())
    run_merge(parse_spec(s), device="cpu")
    got = {k: v.double() for k, v in state(str(tmp_path / "o")).items()}
    w0 = {k: v.double() for k, v in state(base).items()}
    deltas = engine_deltas(base, ads)  # stored orientation (in x out), float64
    for name in adapted:
        lin = [d.T.numpy() for d in deltas[name]]
        parts = rows_for("gpt2", name) if split else None
        if parts:
            want = np.zeros(lin[0].shape)
            for rows in parts.values():
                want[rows] = drm_delta([d[rows] for d in lin], WEIGHTS)
        else:
            want = drm_delta(lin, WEIGHTS)
        assert rel_err((got[name] - w0[name]).numpy(), want.T) < 1e-5, name


def test_lora_on_falcon_query_key_value_is_split_by_its_factors(tmp_path):
    """Falcon's grouped (GQA) layout, LoRA factors: each part of ``B A`` is ``B[rows] A``."""
    from tests.support.architectures import tiny_config

    d = tmp_path
    model = __import__("transformers").AutoModelForCausalLM.from_config(tiny_config("falcon_new"))
    model.save_pretrained(str(d / "base"))
    base = str(d / "base")
    ads = [make_adapter(base, str(d / f"a{i}"), seed=20 + i, r=4, lora_alpha=8,
                        target_modules=["query_key_value"]) for i in range(2)]
    s = {"base_model": base, "models": ads, "output": str(d / "o")}
    run_merge(parse_spec(s), device="cpu")
    got = {k: v.double() for k, v in state(str(d / "o")).items()}
    w0 = {k: v.double() for k, v in state(base).items()}
    deltas = engine_deltas(base, ads)
    names = [n for n in w0 if n.endswith("query_key_value.weight")]
    assert len(names) == 2
    for name in names:
        lin = [x.numpy() for x in deltas[name]]
        want = np.zeros(lin[0].shape)
        for rows in rows_for("falcon_new", name).values():
            want[rows] = drm_delta([x[rows] for x in lin], (1.0, 1.0))
        assert rel_err((got[name] - w0[name]).numpy(), want) < 1e-5, name
    # and an adapter output of the same merge, applied by PEFT, is the same model
    run_merge(parse_spec({**s, "output": str(d / "ad"), "output_format": "adapter"}), device="cpu")
    from peft import PeftModel

    via = PeftModel.from_pretrained(load_model(base), str(d / "ad")).merge_and_unload().state_dict()
    for name in names:
        assert rel_err((via[name].double() - w0[name]).numpy(), (got[name] - w0[name]).numpy()) < 1e-5, name


def test_adapter_output_without_a_base_orients_by_the_adapters(gpt2_lora, tmp_path):
    """Without base_model no config.json says which weights are Conv1D, but the adapters do
    (fan_in_fan_out); the name-only presets are all that split (a warning says so)."""
    base, ads = gpt2_lora
    spec = parse_spec({"models": ads, "output": str(tmp_path / "o"), "output_format": "adapter"})
    inputs = Inputs(spec)
    try:
        views = [tp.view for tp in inputs.plan.tensors if tp.kind == MATRIX]
        warnings = inputs.plan.warnings
    finally:
        inputs.close()
    assert views and all(v is not None and v.transposed and not v.parts for v in views)
    assert any("no config.json to choose fused-projection presets from" in w for w in warnings)
    # the same merge with the base and split: false is the same adapter
    run_merge(spec, device="cpu")
    run_merge(parse_spec({"base_model": base, "models": ads, "output": str(tmp_path / "b"),
                          "output_format": "adapter", "select": {"split": False}}), device="cpu")
    a, b = state_adapter(tmp_path / "o"), state_adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))

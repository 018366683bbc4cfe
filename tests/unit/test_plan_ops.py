"""The plan decides, the executor runs: every tensor's operation (copy, element-wise, lazy
element-wise, dense, low-rank), its parameters, per-model values and sources are chosen
once in the plan; the executor runs whatever the plan says."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from drmerge import methods, plan as plan_module
from drmerge.checkpoint import Source
from drmerge.inputs import Inputs
from drmerge.methods.base import COPY, MATRIX, VECTOR, Op
from drmerge.pipeline import run_merge
from drmerge.spec import parse_spec
from tests.support.lora_helpers import make_adapter, make_base, make_full_finetune

from tests.support.factories import load_tensors, make_family

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    return make_family(str(root), n_models=2, arch="llama")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    d = tmp_path_factory.mktemp("ops_lora")
    base = make_base(str(d / "base"))
    a = make_adapter(base, str(d / "a"), seed=1, r=4, lora_alpha=8, target_modules=TARGETS)
    b = make_adapter(base, str(d / "b"), seed=2, r=2, lora_alpha=4, target_modules=["q_proj"])
    full = make_full_finetune(base, str(d / "full"), seed=3)
    return base, a, b, full


def planned(spec: dict):
    inputs = Inputs(parse_spec(spec))
    try:
        return inputs.plan
    finally:
        inputs.close()


def ops(plan) -> Counter:
    return Counter((tp.kind, tp.op) for tp in plan.tensors)


@pytest.mark.parametrize("method", ["drm", "ties", "task_arithmetic", "linear"])
def test_full_checkpoints_take_the_methods_operation(family, tmp_path, method):
    base, models = family
    spec = {"base_model": base, "models": [{"model": m, "weight": w} for m, w in zip(models, (1.0, 0.5))],
            "method": method, "output": str(tmp_path / "o"), "select": {"ignore": [r".*\.1\..*"]}}
    plan = planned(spec)
    m = methods.get(method)
    for tp in plan.tensors:
        if tp.kind == COPY:
            assert tp.op == Op.COPY and tp.params is None
            continue
        assert tp.op == m.operation(tp.kind, tp.params)
        assert tp.op == (Op.DENSE if method == "drm" and tp.kind == MATRIX else Op.ELEMENTWISE)
        assert tp.params == parse_spec(spec).parameters and tp.models.weight == (1.0, 0.5)
        assert tp.sources == (Source.FULL, Source.FULL)
    assert {k for k, _ in ops(plan)} == {COPY, MATRIX, VECTOR}


def test_inputs_above_the_lazy_threshold_are_read_range_by_range(family, tmp_path, monkeypatch):
    base, models = family
    spec = {"base_model": base, "models": models, "method": "ties", "output": str(tmp_path / "o")}
    sizes = {tp.name: tp.out.nbytes for tp in planned(spec).tensors}
    threshold = sorted(sizes.values())[-3]  # a few tensors' three inputs are above it
    monkeypatch.setattr(plan_module, "LAZY_INPUT_BYTES", threshold)
    got = {tp.name: tp.op for tp in planned(spec).tensors if tp.kind != COPY}
    lazy = {n for n, op in got.items() if op == Op.ELEMENTWISE_LAZY}
    assert lazy and lazy == {n for n in got if 3 * sizes[n] > threshold}
    assert all(op == Op.ELEMENTWISE for n, op in got.items() if n not in lazy)


@pytest.mark.parametrize("method,adapted_matrix", [("drm", Op.LOWRANK), ("task_arithmetic", Op.LOWRANK),
                                                   ("linear", Op.LOWRANK), ("ties", Op.DENSE)])
def test_lora_inputs_take_the_low_rank_form_where_the_method_has_one(lora, tmp_path, method, adapted_matrix):
    base, a, b, full = lora
    plan = planned({"base_model": base, "models": [a, b], "method": method, "output": str(tmp_path / "o")})
    by_name = plan.by_name()
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q.sources == (Source.FACTORED, Source.FACTORED) and q.op == adapted_matrix
    v = by_name["model.layers.0.self_attn.v_proj.weight"]
    assert v.sources == (Source.FACTORED, Source.ABSENT) and v.op == adapted_matrix
    norm = by_name["model.norm.weight"]  # 1-D: no low-rank form, and no adapter touches it
    assert norm.sources == (Source.ABSENT, Source.ABSENT) and norm.op == Op.DENSE
    # a full fine-tune among the inputs: its tensors are dense task deltas
    mixed = planned({"base_model": base, "models": [a, full], "method": method, "output": str(tmp_path / "o")})
    assert {tp.op for tp in mixed.tensors if tp.kind != COPY} == {Op.DENSE}
    assert mixed.by_name()[q.name].sources == (Source.FACTORED, Source.FULL)


def test_adapter_output_plans_every_module_low_rank_or_dense(lora, tmp_path):
    base, a, b, _ = lora
    for method, op in (("drm", Op.LOWRANK), ("ties", Op.DENSE)):
        plan = planned({"models": [a, b], "method": method, "output": str(tmp_path / "o"), "output_format": "adapter"})
        assert {tp.op for tp in plan.tensors} == {op}
        assert len(plan.tensors) == 4  # q and v of two layers: only the adapted modules, no base given


@pytest.mark.parametrize("method", ["drm", "ties", "task_arithmetic"])
def test_the_executor_runs_what_the_plan_says(family, tmp_path, monkeypatch, method):
    """Planned dense instead of element-wise, every tensor merges by the method's
    whole-tensor delta: the same tensors (the chunked rule equals it bit for bit)."""
    base, models = family
    spec = {"base_model": base, "models": [{"model": m, "weight": w} for m, w in zip(models, (1.0, 0.5))],
            "method": method, "parameters": {"scale": 0.7}, "output": str(tmp_path / "planned")}
    run_merge(parse_spec(spec), device="cpu")
    planned_ops = plan_module.operation
    seen = Counter()

    def dense(*a, **kw):
        op = planned_ops(*a, **kw)
        seen[op] += 1
        return Op.DENSE

    monkeypatch.setattr(plan_module, "operation", dense)
    run_merge(parse_spec(dict(spec, output=str(tmp_path / "dense"))), device="cpu")
    assert seen[Op.ELEMENTWISE] > 0
    want, got = load_tensors(str(tmp_path / "planned")), load_tensors(str(tmp_path / "dense"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert os.path.exists(tmp_path / "dense" / "drmerge.json")

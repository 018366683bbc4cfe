"""Every method end to end: real tiny checkpoints through ``drmerge.merge``, with and
without ``base_model`` where the method allows it, every merged tensor checked against the
plain float64 formulas of tests/support/reference.py.

The family is a tiny Llama (float32) whose fine-tunes move every tensor, the RMSNorm
weights (1.0 in the base) included: a merge that mistook deltas for weights, or weights
for deltas, cannot pass.
"""

from __future__ import annotations

import os

import pytest
import torch

import drmerge
from drmerge.errors import MergeError

from tests.support import reference as ref
from tests.support.factories import load_tensors, make_family

WEIGHTS = [1.0, -0.3, 0.7]  # unequal, one negative
IGNORED = "layers.1.mlp.down_proj.weight"  # select.ignore: copied from the reference unchanged


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("family"))
    base, models = make_family(root, n_models=3, arch="llama")
    return {"base": base, "models": models, "base_t": load_tensors(base), "models_t": [load_tensors(m) for m in models]}


def merge(family, out, method, params, with_base):
    spec = {"models": [{"model": m, "weight": w} for m, w in zip(family["models"], WEIGHTS)], "method": method,
            "parameters": params, "select": {"ignore": [IGNORED]}, "output": str(out)}
    if with_base:
        spec["base_model"] = family["base"]
    drmerge.merge(spec, device="cpu")
    return load_tensors(str(out))


def kind(name, t):
    """The default ``select``, restated: matrices are 2-D+ weights other than embeddings."""
    return "matrix" if t.dim() >= 2 and "embed" not in name else "vector"


def f64(t):
    return t.double().numpy()


def expected_delta(method, kind_, deltas, params):
    if method == "task_arithmetic":
        return sum(w * d for w, d in zip(WEIGHTS, deltas))
    if method == "ties":
        return ref.ties_delta(deltas, WEIGHTS, density=params["density"],
                              disjoint_mean=params.get("disjoint_mean", True))
    if kind_ == "matrix":
        return ref.drm_delta(deltas, WEIGHTS, direction=params.get("direction", "vertical"),
                             drop_rate=params.get("drop_rate", 0.8))
    return ref.drm_vector_delta(deltas, WEIGHTS, nonlinear_drop_rate=params.get("nonlinear_drop_rate", 0.0))


DELTA_METHODS = [
    ("drm", {"direction": "vertical", "scale": 0.7}),
    ("drm", {"direction": "horizontal", "drop_rate": 0.5, "nonlinear_drop_rate": 0.3}),
    ("ties", {"density": 0.5, "scale": 0.7}),
    ("ties", {"density": 0.5, "disjoint_mean": False}),
    ("task_arithmetic", {"scale": 0.7}),
]


@pytest.mark.parametrize("method,params", DELTA_METHODS)
def test_delta_methods_with_a_base_match_float64(family, tmp_path, method, params):
    got = merge(family, tmp_path / "out", method, params, with_base=True)
    base, models = family["base_t"], family["models_t"]
    assert got.keys() == base.keys()
    seen = {"matrix": 0, "vector": 0}
    for name, b in base.items():
        if name == IGNORED:
            assert torch.equal(got[name], b)
            continue
        # The inputs as the engine sees them: float32 differences (step 1 in the compute dtype).
        deltas = [f64(m[name] - b) for m in models]
        k = kind(name, b) if method == "drm" else "vector"
        want = params.get("scale", 1.0) * expected_delta(method, k, deltas, params)
        # Against the float32 output that the exact result rounds to: a norm weight ~1.0
        # cannot hold a ~0.01 delta to better than ~1e-5 of it in float32.
        rounded = f64(torch.from_numpy(f64(b) + want).float()) - f64(b)
        err = ref.rel_err(f64(got[name]) - f64(b), rounded)
        assert err < 1e-5, (name, err)
        seen[k] += 1
    assert seen["vector"] >= 5 and (method != "drm" or seen["matrix"] >= 10)
    # norms stay norms: ~1.0 plus a delta of the fine-tunes' size
    assert abs(float(got["norm.weight"].mean()) - 1.0) < 0.05


@pytest.mark.parametrize("method", ["drm", "ties", "task_arithmetic"])
def test_delta_methods_without_a_base_are_refused(family, tmp_path, method):
    out = tmp_path / "out"
    with pytest.raises(MergeError) as e:
        merge(family, out, method, {}, with_base=False)
    assert e.value.code == "invalid_spec" and e.value.param == "base_model"
    assert method in e.value.message and not os.path.exists(out)


@pytest.mark.parametrize("with_base", [True, False])
def test_linear_averages_the_weights_with_or_without_a_base(family, tmp_path, with_base):
    got = merge(family, tmp_path / "out", "linear", {}, with_base=with_base)
    base, models = family["base_t"], family["models_t"]
    assert got.keys() == base.keys()
    for name in base:
        if name == IGNORED:  # copied from the base, or without one from the first model
            assert torch.equal(got[name], base[name] if with_base else models[0][name])
            continue
        want = sum(w * f64(m[name]) for w, m in zip(WEIGHTS, models)) / sum(WEIGHTS)
        assert ref.rel_err(f64(got[name]), want) < 1e-6, name
    # What the bug report saw: norms ~0 and weights shrunk to the size of a delta.
    for name in ("norm.weight", "layers.0.input_layernorm.weight"):
        assert abs(float(got[name].mean()) - 1.0) < 0.05, name
    q = "layers.0.self_attn.q_proj.weight"
    assert 0.5 < float(got[q].norm() / base[q].norm()) < 2.0

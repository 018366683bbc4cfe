"""DRM's ``nonlinear_trim: global`` (docs/DESIGN.md, "DRM on vector-like tensors"): the
authors' one trim over all of a model's vector-like tensors together (excluded embeddings
and heads included; statistics and copied tensors not), ``k = N - round(N (1 - p))``, the
entries below the k-th smallest magnitude zeroed, then DRM's vector rule per tensor. The
threshold is found exactly in two streaming passes (kernels/topk.py ``PooledKth``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drmerge.errors import MergeError
from drmerge.execute import resolve_pools
from drmerge.inputs import Inputs
from drmerge.kernels.topk import PooledKth
from drmerge.methods.base import POOL_FLOOR, VECTOR
from drmerge.pipeline import run_merge, validate
from drmerge.spec import parse_spec
from tests.support.checkpoints import write_checkpoint
from tests.support.factories import load_tensors
from tests.support.reference import _elect_and_mean

WEIGHTS = (1.0, 0.5, 1.5)
RATE = 0.6


def test_pooled_kth_is_kthvalue_of_the_concatenated_pool():
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(n, generator=g).abs() for n in (1, 7, 1000, 50_000)]
    pieces.append(torch.full((300,), 0.5))  # ties
    pieces.append(torch.zeros(40))
    pieces.append((torch.randn(2000, generator=g) * 1e-30).abs())  # subnormal-ish magnitudes
    pool = torch.cat(pieces)
    for k in (1, 2, 40, 41, 1000, pool.numel() // 2, pool.numel() - 1, pool.numel()):
        sel = PooledKth()
        for p in pieces:
            sel.add(p)
        sel.add_zeros(0)
        sel.select(k)
        for p in pieces:
            sel.add(p)
        assert sel.value() == float(torch.kthvalue(pool, k).values), k
    sel = PooledKth()
    sel.add(pieces[2])
    sel.add_zeros(5000)
    sel.select(4000)
    sel.add(pieces[2])
    sel.add_zeros(5000)
    assert sel.value() == 0.0


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("trim")
    g = torch.Generator().manual_seed(4)
    base = {"embed.weight": torch.randn(40, 8, generator=g), "layers.0.proj.weight": torch.randn(8, 8, generator=g),
            "layers.0.proj.bias": torch.randn(8, generator=g), "layers.0.norm.weight": torch.ones(8),
            "bn.running_mean": torch.zeros(8), "bn.num_batches_tracked": torch.tensor(3)}
    paths = [write_checkpoint(root / "base", base)]
    for i in range(3):
        ft = {k: (v + (0.1 * (i + 1)) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
              for k, v in base.items()}
        paths.append(write_checkpoint(root / f"ft{i}", ft))
    return paths


def spec(paths, out, **parameters):
    return {"base_model": paths[0], "models": [{"model": p, "weight": w} for p, w in zip(paths[1:], WEIGHTS)],
            "output": str(out), "parameters": {"nonlinear_drop_rate": RATE, **parameters}}


POOLED = ["embed.weight", "layers.0.proj.bias", "layers.0.norm.weight"]  # statistics, counters, matrices: not


def reference(paths) -> dict[str, np.ndarray]:
    """The authors' trim, plainly: per model the concatenated deltas, sorted, the k-th
    smallest kept and everything below it zeroed; then DRM's vector rule per tensor."""
    base = load_tensors(paths[0])
    fts = [load_tensors(p) for p in paths[1:]]
    trimmed = []
    for ft in fts:
        deltas = {n: (ft[n] - base[n]).double().numpy() for n in POOLED}  # float32 subtraction, exact in float64
        pool = np.concatenate([d.ravel() for d in deltas.values()])
        n = pool.size
        k = n - round(n * (1 - RATE))
        tau = np.sort(np.abs(pool))[k - 1]
        trimmed.append({name: np.where(np.abs(d) < tau, 0.0, d) for name, d in deltas.items()})
    return {name: base[name].double().numpy() + _elect_and_mean([t[name] for t in trimmed], WEIGHTS, True, True)
            for name in POOLED}


def test_global_trim_matches_the_authors(family, tmp_path):
    run_merge(parse_spec(spec(family, tmp_path / "g", nonlinear_trim="global")), device="cpu")
    run_merge(parse_spec(spec(family, tmp_path / "t")), device="cpu")
    got, per_tensor = load_tensors(str(tmp_path / "g")), load_tensors(str(tmp_path / "t"))
    want = reference(family)
    for name in POOLED:
        assert np.allclose(got[name].double().numpy(), want[name], rtol=0, atol=1e-6), name
        assert not torch.equal(got[name], per_tensor[name]), name  # the scope matters
    for name in ("layers.0.proj.weight", "bn.running_mean", "bn.num_batches_tracked"):
        assert torch.equal(got[name], per_tensor[name]), name  # outside the pool


def test_the_pool_streams_in_chunks(family, tmp_path):
    """Any chunk size gives the same thresholds (the embedding is read range by range)."""
    def floors(chunk):
        inputs = Inputs(parse_spec(spec(family, tmp_path / "o", nonlinear_trim="global")))
        try:
            found = resolve_pools(inputs, chunk=chunk)
            members = [tp for tp in inputs.plan.tensors if tp.pool is not None]
            assert sorted(tp.name for tp in members) == sorted(POOLED) and all(tp.kind == VECTOR for tp in members)
            assert all(tp.models.values[POOL_FLOOR] == found["vector"] for tp in members)
            return found["vector"]
        finally:
            inputs.close()

    whole = floors(1 << 20)
    assert len(whole) == 3 and all(f > 0 for f in whole)
    assert floors(7) == whole


def test_validate_reports_the_pool(family, tmp_path):
    report = validate(parse_spec(spec(family, tmp_path / "o", nonlinear_trim="global")))
    assert report["pools"] == {"vector": {"keep": pytest.approx(1 - RATE), "tensors": 3}}
    assert "nonlinear_threshold" in report["decided"]
    assert validate(parse_spec(spec(family, tmp_path / "o")))["pools"] == {}


def test_global_needs_a_drop_rate(family, tmp_path):
    with pytest.raises(MergeError) as e:
        parse_spec(spec(family, tmp_path / "o", nonlinear_trim="global", nonlinear_drop_rate=0.0))
    assert e.value.param == "parameters.nonlinear_trim" and "needs nonlinear_drop_rate > 0" in e.value.message


def test_lora_on_a_vector_like_head_joins_the_pool_with_its_zeros(tmp_path):
    """An adapter on lm_head (excluded: vector-like) contributes its dense delta; every tensor
    it leaves alone contributes zeros, as the authors' whole-model delta does."""
    from tests.support.lora_helpers import engine_deltas, make_adapter, make_base

    base = make_base(str(tmp_path / "base"))
    ads = [make_adapter(base, str(tmp_path / f"a{i}"), seed=i, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
           for i in range(2)]
    s = parse_spec({"base_model": base, "models": ads, "output": str(tmp_path / "o"),
                    "parameters": {"nonlinear_drop_rate": 0.999, "nonlinear_trim": "global"}})
    inputs = Inputs(s)
    try:
        found = resolve_pools(inputs)["vector"]
        members = [tp.name for tp in inputs.plan.tensors if tp.pool is not None]
    finally:
        inputs.close()
    deltas = engine_deltas(base, ads, dtype=torch.float32)
    for t, floor in enumerate(found):
        pool = torch.cat([deltas[n][t].reshape(-1) for n in members]).abs()
        n = pool.numel()
        assert floor == float(torch.kthvalue(pool, n - round(n * (1 - 0.999))).values) and floor > 0
    run_merge(s, device="cpu")

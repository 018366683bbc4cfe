"""DRM ``direction: auto`` (docs/DESIGN.md, "DRM, step by step"): the direction is chosen
per matrix (per part of a fused one) by the authors' stacked-rank rule (rtol 0.1, ties
vertical) or their orthogonality score, recorded per matrix in drmerge.json (and in the
shard journal, so a resumed run still records every one), counted in the result, and
reported by ``drmerge validate`` as decided at merge time."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from drmerge.errors import MergeError
from drmerge.methods import drm
from drmerge.pipeline import run_merge, validate
from drmerge.spec import parse_spec
from tests.support.architectures import load_np, make_arch_family, rows_for
from tests.support.checkpoints import write_checkpoint
from tests.support.reference import drm_delta, rel_err

WEIGHTS = (1.0, 0.7, 1.3)


def reference_direction(deltas, rule: str, rho: float = 0.01) -> str:
    """The authors' rules, plainly: numpy's full SVD of both stacks, float64 (orthogonality
    scores within 1e-9 T^2 are a tie, vertical: drmerge's documented tolerance)."""
    deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
    t, (n, m) = len(deltas), deltas[0].shape
    sv, sh = np.vstack(deltas), np.hstack(deltas)
    if rule == "rank":
        def rank(s):
            s = np.linalg.svd(s, compute_uv=False)
            return int((s > 0.1 * s[0]).sum())
        return "horizontal" if rank(sh) < rank(sv) else "vertical"

    def score(stack, vertical):
        u, s, vt = np.linalg.svd(stack, full_matrices=False)
        keep = s > rho * s[0]
        blocks = [u[i * n:(i + 1) * n, keep] if vertical else vt[keep][:, i * m:(i + 1) * m] for i in range(t)]
        flat = np.stack([b.ravel() for b in blocks])
        return float((1 - np.abs(flat @ flat.T - np.eye(t))).sum())
    return "horizontal" if score(sh, False) > score(sv, True) + 1e-9 * t * t else "vertical"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Matrices whose stacks differ: wide and tall full-rank deltas, deltas that share their
    column space (a common left factor: the horizontal stack has the smaller rank) or their
    row space (a common right factor), and square full-rank ones (a rank tie)."""
    root = tmp_path_factory.mktemp("auto")
    g = torch.Generator().manual_seed(7)
    shapes = {"wide.weight": (16, 64), "tall.weight": (64, 16), "left.weight": (32, 32), "right.weight": (32, 32),
              "square.weight": (24, 24)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["norm.weight"] = torch.ones(16)
    b_common, a_common = torch.randn(32, 3, generator=g), torch.randn(3, 32, generator=g)
    paths = [write_checkpoint(root / "base", base)]
    for i in range(3):
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        ft["left.weight"] = base["left.weight"] + 0.1 * b_common @ torch.randn(3, 32, generator=g)
        ft["right.weight"] = base["right.weight"] + 0.1 * torch.randn(32, 3, generator=g) @ a_common
        paths.append(write_checkpoint(root / f"ft{i}", ft))
    return paths


def spec(paths, out, **parameters):
    return {"base_model": paths[0], "models": [{"model": p, "weight": w} for p, w in zip(paths[1:], WEIGHTS)],
            "output": str(out), "parameters": {"direction": "auto", **parameters}}


def deltas_of(paths, name):
    base = load_np(paths[0])[name]
    return base, [(load_np(p)[name] - base).astype(np.float64) for p in paths[1:]]


@pytest.mark.parametrize("rule", ["rank", "orthogonality"])
def test_auto_picks_per_matrix_records_it_and_merges_with_it(family, tmp_path, rule):
    result = run_merge(parse_spec(spec(family, tmp_path / "o", auto_rule=rule)), device="cpu")
    marker = json.load(open(tmp_path / "o" / "drmerge.json"))
    chosen = {name: record["direction"] for name, record in marker["decisions"].items()}
    assert set(chosen) == {"wide.weight", "tall.weight", "left.weight", "right.weight", "square.weight"}
    assert chosen["wide.weight"] == chosen["left.weight"] == "horizontal"
    assert chosen["tall.weight"] == chosen["right.weight"] == "vertical"
    if rule == "rank":
        assert chosen["square.weight"] == "vertical"  # a tie
    got = load_np(str(tmp_path / "o"))
    for name, direction in chosen.items():
        base, deltas = deltas_of(family, name)
        if name != "square.weight" or rule == "rank":  # orthogonality on a square full-rank tie is float noise
            assert direction == reference_direction(deltas, rule), name
        assert rel_err(got[name] - base, drm_delta(deltas, WEIGHTS, direction=direction)) < 1e-5, name
    counts = result.decisions["direction"]
    assert sum(counts.values()) == 5 and counts["horizontal"] >= 2 and counts["vertical"] >= 2


def test_validate_says_decided_at_merge_time(family, tmp_path):
    report = validate(parse_spec(spec(family, tmp_path / "o")))
    assert report["decided"] == {"direction": {"how": "decided at merge time, per matrix (or part), by the rank rule",
                                               "matrices": 5}}
    fixed = validate(parse_spec({**spec(family, tmp_path / "o"), "parameters": {"direction": "vertical"}}))
    assert fixed["decided"] == {}


def test_the_default_rule_is_the_named_constant(family, tmp_path):
    assert drm.AUTO_RULE == "rank" and drm.DrmParams(direction="auto").auto_rule == drm.AUTO_RULE
    with pytest.raises(MergeError) as e:
        parse_spec({**spec(family, tmp_path / "o"), "parameters": {"auto_rule": "orthogonality"}})
    assert e.value.param == "parameters.auto_rule"
    assert e.value.message == "parameters.auto_rule: only applies with direction: auto, got 'orthogonality'"


def test_auto_per_part_of_a_fused_matrix(tmp_path):
    """The presets split first; each part gets its own direction (the authors decide once per
    fused matrix; drmerge per part)."""
    base, fts = make_arch_family(str(tmp_path / "gpt2"), "gpt2", n_models=3, seed=2)
    s = {"base_model": base, "models": [{"model": p, "weight": w} for p, w in zip(fts, WEIGHTS)],
         "output": str(tmp_path / "o"), "parameters": {"direction": "auto", "auto_rule": "orthogonality"}}
    run_merge(parse_spec(s), device="cpu")
    decisions = json.load(open(tmp_path / "o" / "drmerge.json"))["decisions"]
    name = "transformer.h.0.attn.c_attn.weight"
    assert set(decisions[name]["parts"]) == {"q", "k", "v"}
    w0 = load_np(base)[name]
    deltas = [(load_np(p)[name] - w0).astype(np.float64).T for p in fts]  # the linear map (Conv1D)
    for part, rows in rows_for("gpt2", name).items():
        assert decisions[name]["parts"][part]["direction"] == reference_direction([d[rows] for d in deltas],
                                                                                  "orthogonality"), part


def test_auto_on_lora_factors_decides_as_on_the_dense_deltas(tmp_path):
    from tests.support.lora_helpers import engine_deltas, make_adapter, make_base

    base = make_base(str(tmp_path / "base"))
    ads = [make_adapter(base, str(tmp_path / f"a{i}"), seed=i, r=r, lora_alpha=8, target_modules=["q_proj", "down_proj"])
           for i, r in enumerate((2, 4, 8))]
    for rule in ("rank", "orthogonality"):
        out = tmp_path / f"o-{rule}"
        s = {"base_model": base, "models": ads, "output": str(out),
             "parameters": {"direction": "auto", "auto_rule": rule}}
        run_merge(parse_spec(s), device="cpu")
        decisions = json.load(open(out / "drmerge.json"))["decisions"]
        deltas = engine_deltas(base, ads)
        adapted = [n for n in decisions if n.endswith(("q_proj.weight", "down_proj.weight"))]
        assert len(adapted) == 4
        for name in adapted:
            want = reference_direction([d.numpy() for d in deltas[name]], rule)
            assert decisions[name]["direction"] == want, (rule, name)
            # LoRA deltas of generic factors: both stacks have rank sum r_t, and the
            # orthogonality scores tie exactly (G = diag(r_t) both ways): a tie, vertical
            assert want == "vertical"


def test_a_resumed_run_still_records_every_decision(family, tmp_path):
    s = parse_spec({**spec(family, tmp_path / "o"), "shard_size": 4096})
    entries = []
    run_merge(s, device="cpu", on_shard=entries.append)
    first = json.load(open(tmp_path / "o" / "drmerge.json"))["decisions"]
    assert len(entries) > 2 and any("decisions" in e for e in entries)
    os.remove(tmp_path / "o" / "drmerge.json")  # killed after its last shard
    result = run_merge(s, device="cpu", completed_shards=entries)
    assert result.resumed["shards_kept"] == len(entries)
    assert json.load(open(tmp_path / "o" / "drmerge.json"))["decisions"] == first
    assert sum(result.decisions["direction"].values()) == 5

"""The merge math against the plain float64 reference in tests/support/reference.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from drmerge import methods
from drmerge.methods.base import MATRIX, VECTOR
from drmerge.methods.drm import DrmParams, drm_matrix_delta

from tests.support import reference as ref


def task_deltas(shape, t, seed, rank=3, noise=0.05):
    """Low-rank-plus-noise deltas, like real fine-tunes (a few dominant directions)."""
    g = np.random.default_rng(seed)
    n = shape[0]
    m = int(np.prod(shape[1:]))
    out = []
    for _ in range(t):
        low = g.standard_normal((n, rank)) @ g.standard_normal((rank, m)) / np.sqrt(rank)
        out.append((low + noise * g.standard_normal((n, m))).reshape(shape))
    return out


def run(method, kind, base, deltas, weights, **params):
    m = methods.get(method)
    p = m.Params(**params)
    b = torch.tensor(base, dtype=torch.float32)
    stack = torch.stack([b + torch.tensor(d, dtype=torch.float32) for d in deltas])
    merged = m.merge_tensor(kind, b, stack, torch.tensor(weights, dtype=torch.float32), p)
    # The inputs are float32; compare the merged delta the engine produced from them.
    return (merged.double() - b.double()).numpy(), [(s - b).double().numpy() for s in stack]


SHAPES = [(16, 24), (24, 16), (32, 32), (8, 4, 3, 3), (4, 64), (64, 4)]


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("shape,t", [(s, t) for s, t in zip(SHAPES, [2, 3, 5, 4, 3, 8])] + [((20, 30), 1), ((12, 40), 8)])
def test_drm_matches_float64_reference(direction, shape, t):
    g = np.random.default_rng(t)
    base = g.standard_normal(shape)
    weights = list(g.uniform(0.3, 1.5, t))
    scale = 0.7
    merged, deltas = run("drm", MATRIX, base, task_deltas(shape, t, seed=sum(shape) + t), weights,
                         direction=direction, scale=scale)
    flat = [d.reshape(shape[0], -1) for d in deltas]
    want = scale * ref.drm_delta(flat, weights, direction=direction)
    assert ref.rel_err(merged.reshape(shape[0], -1), want) < 1e-5


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("options", [
    dict(drop_rate=0.0), dict(drop_rate=0.5, rank_threshold=0.2), dict(sign_election=False),
    dict(disjoint_mean=False), dict(renormalize=False), dict(drop_rate=0.95, sign_election=False, disjoint_mean=False),
])
def test_drm_options_match_reference(direction, options):
    shape, t = (24, 20), 4
    base = np.zeros(shape)
    weights = [1.0, 0.5, 2.0, 1.0]
    merged, deltas = run("drm", MATRIX, base, task_deltas(shape, t, seed=7), weights, direction=direction, **options)
    want = ref.drm_delta(deltas, weights, direction=direction, **options)
    assert ref.rel_err(merged, want) < 1e-5


def test_reference_is_invariant_to_svd_signs():
    deltas = task_deltas((16, 20), 3, seed=3)
    plain = ref.drm_delta(deltas, [1, 1, 1])
    flips = np.random.default_rng(0).choice([-1.0, 1.0], size=64)
    for direction in ("vertical", "horizontal"):
        assert ref.rel_err(ref.drm_delta(deltas, [1, 1, 1], direction=direction, flip_signs=flips),
                           ref.drm_delta(deltas, [1, 1, 1], direction=direction)) < 1e-12
    assert np.any(plain)


def test_drm_is_invariant_to_sign_of_singular_vectors():
    """Negating every delta flips the signs the decomposition hands back for U (or V) while
    the spectrum stays the same; the merged delta must negate exactly, no more."""
    deltas = torch.tensor(np.stack(task_deltas((16, 24), 4, seed=11)), dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    for direction in ("vertical", "horizontal"):
        p = DrmParams(direction=direction)
        a = drm_matrix_delta(deltas, w, p)
        b = drm_matrix_delta(-deltas, w, p)
        assert torch.allclose(a, -b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_drm_is_invariant_to_model_order(direction):
    deltas = task_deltas((20, 28), 4, seed=5)
    weights = [1.0, 0.2, 0.7, 1.3]
    base = np.zeros((20, 28))
    first, _ = run("drm", MATRIX, base, deltas, weights, direction=direction)
    for perm in itertools.islice(itertools.permutations(range(4)), 1, 24, 5):
        again, _ = run("drm", MATRIX, base, [deltas[i] for i in perm], [weights[i] for i in perm], direction=direction)
        assert ref.rel_err(again, first) < 1e-6


@pytest.mark.parametrize("method,kind", [("drm", MATRIX), ("drm", VECTOR), ("ties", MATRIX), ("task_arithmetic", MATRIX)])
def test_all_zero_deltas_give_the_base(method, kind):
    base = np.random.default_rng(0).standard_normal((8, 12))
    merged, _ = run(method, kind, base, [np.zeros((8, 12))] * 3, [1.0, 1.0, 1.0])
    assert np.array_equal(merged, np.zeros((8, 12)))


def test_rank_threshold_drops_weak_components():
    g = np.random.default_rng(1)
    strong = g.standard_normal((16, 1)) @ g.standard_normal((1, 20))
    weak = 1e-4 * g.standard_normal((16, 20))
    merged, deltas = run("drm", MATRIX, np.zeros((16, 20)), [strong + weak, 2 * strong - weak], [1, 1],
                         drop_rate=0.0, rank_threshold=0.01)
    # Only the rank-1 shared direction survives the threshold.
    assert np.linalg.matrix_rank(merged, tol=1e-4 * np.abs(merged).max()) == 1
    assert ref.rel_err(merged, ref.drm_delta(deltas, [1, 1], drop_rate=0.0)) < 1e-5


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_drm_vector_like_tensors(shape):
    g = np.random.default_rng(2)
    deltas = [g.standard_normal(shape) for _ in range(4)]
    weights = [1.0, 0.5, 1.5, 1.0]
    for q in (0.0, 0.5):
        merged, ds = run("drm", VECTOR, np.zeros(shape), deltas, weights, nonlinear_drop_rate=q, scale=0.9)
        assert ref.rel_err(merged, 0.9 * ref.drm_vector_delta(ds, weights, nonlinear_drop_rate=q)) < 1e-6


@pytest.mark.parametrize("weights", [[1.0, 0.5, 2.0], [1.0, -0.5, 0.7], [1.0, 1.0, 1.0]])
@pytest.mark.parametrize("options", [{}, {"disjoint_mean": False}, {"sign_election": False}])
def test_ties_matches_plain_formula(weights, options):
    g = np.random.default_rng(4)
    deltas = [g.standard_normal((10, 30)) for _ in range(3)]
    merged, ds = run("ties", MATRIX, np.zeros((10, 30)), deltas, weights, density=0.3, scale=0.8, **options)
    assert ref.rel_err(merged, 0.8 * ref.ties_delta(ds, weights, density=0.3, **options)) < 1e-6


def test_ties_divides_by_the_kept_weights_and_votes_with_weighted_signs():
    # One entry, worked by hand (mergekit's rule): weighted deltas 2*1 = 2, 0.5*3 = 1.5 and
    # -1*1 = -1 (a negative weight flips its model's vote): sum 2.5 > 0, so the two positive
    # ones are kept and divided by their weights: (2 + 1.5) / (2 + 0.5).
    merged, _ = run("ties", VECTOR, np.zeros(1), [np.ones(1), 3 * np.ones(1), np.ones(1)], [2.0, 0.5, -1.0],
                    density=1.0)
    assert merged[0] == pytest.approx(3.5 / 2.5, rel=1e-7)
    # An exactly-zero weighted sum elects +1: only the positive weighted entry is kept.
    merged, _ = run("ties", VECTOR, np.zeros(1), [np.ones(1), np.ones(1)], [1.0, -1.0], density=1.0)
    assert merged[0] == 1.0


def test_task_arithmetic_and_linear_match_plain_formulas():
    g = np.random.default_rng(5)
    base = g.standard_normal((6, 9))
    deltas = [g.standard_normal((6, 9)) for _ in range(3)]
    weights = [1.0, 0.25, 0.5]
    merged, ds = run("task_arithmetic", MATRIX, base, deltas, weights, scale=0.6)
    assert ref.rel_err(merged, 0.6 * sum(w * d for w, d in zip(weights, ds))) < 1e-6
    models = torch.tensor(np.stack([base + d for d in deltas]), dtype=torch.float32)
    linear = methods.get("linear")
    lin = linear.merge_tensor(MATRIX, None, models, torch.tensor(weights), linear.Params())
    want = sum(w * m for w, m in zip(weights, models.double().numpy())) / sum(weights)
    assert ref.rel_err(lin.double().numpy(), want) < 1e-6


def test_single_model_drm_keeps_its_dominant_structure():
    deltas = task_deltas((24, 16), 1, seed=9)
    merged, ds = run("drm", MATRIX, np.zeros((24, 16)), deltas, [1.0], drop_rate=0.0)
    # One model, nothing pruned: DRM returns that model's delta, truncated at the rank threshold.
    assert ref.rel_err(merged, ref.drm_delta(ds, [1.0], drop_rate=0.0)) < 1e-6
    assert ref.rel_err(merged, ds[0]) < 0.05


def test_large_matrix_error_is_no_worse_than_float32_svd():
    """docs/DESIGN.md ("Precision of the decomposition"): on large matrices, error vs float64 <= that of a float32 SVD of the stack."""
    shape, t = (192, 384), 4
    deltas = task_deltas(shape, t, seed=21, rank=8, noise=0.2)
    stack64 = [np.asarray(torch.tensor(d, dtype=torch.float32).double()) for d in deltas]
    exact = ref.drm_delta(stack64, [1.0] * t)
    ours, _ = run("drm", MATRIX, np.zeros(shape), deltas, [1.0] * t)
    # The dense float32 approach: same math, SVD of the float32 stack.
    s32 = torch.cat([torch.tensor(d, dtype=torch.float32) for d in stack64])
    u, s, vt = torch.linalg.svd(s32, full_matrices=False)
    approx_stack = (u.double() * s.double()) @ vt.double()
    dense32 = ref.drm_delta(np.split(approx_stack.numpy(), t), [1.0] * t)
    assert ref.rel_err(ours, exact) <= max(ref.rel_err(dense32, exact), 1e-6)

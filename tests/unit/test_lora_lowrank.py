"""Low-rank DRM (methods/drm.py ``drm_lowrank_delta``, kernels/decompose.py and lowrank.py)
against dense DRM on the materialised deltas."""

from __future__ import annotations

import pytest
import torch

from drmerge import methods
from drmerge.execute import task_stack
from drmerge.kernels.decompose import lowrank_row_basis
from drmerge.kernels.lowrank import LowRank, truncated, weighted_sum
from drmerge.methods.base import MATRIX
from drmerge.methods.drm import DrmParams, drm_lowrank_delta, drm_matrix_delta
from drmerge.spec import parse_spec


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def factors(n, m, ranks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        if r is None:
            out.append(None)
        else:
            out.append(LowRank(torch.randn(n, r, generator=g, dtype=dtype) * 0.1, torch.randn(r, m, generator=g, dtype=dtype)))
    return out


def dense_stack(fs, n, m, dtype):
    return torch.stack([f.dense() if f is not None else torch.zeros(n, m, dtype=dtype) for f in fs])


PARAMS = [
    DrmParams(),
    DrmParams(drop_rate=0.0),
    DrmParams(drop_rate=0.5, sign_election=False, disjoint_mean=False),
    DrmParams(rank_threshold=0.3),
    DrmParams(renormalize=False),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("pi", range(len(PARAMS)))
def test_lowrank_equals_dense(dtype, tol, direction, pi):
    n, m = 48, 80
    fs = factors(n, m, [4, 8, None, 2, 16], dtype, seed=pi)
    w = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.7])
    p = PARAMS[pi].model_copy(update={"direction": direction})
    want = drm_matrix_delta(dense_stack(fs, n, m, dtype), w.to(dtype), p)
    got = drm_lowrank_delta(fs, (n, m), w, p)
    assert got.shape == (n, m)
    assert rel(got.dense(), want) < tol


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_wide_and_tall_and_rank_above_a_side(direction):
    # sum of ranks (40) above the short side (24): the core is rank-deficient.
    for n, m in ((24, 200), (200, 24)):
        fs = factors(n, m, [16, 16, 8], torch.float64, seed=3)
        w = torch.ones(3)
        p = DrmParams(direction=direction)
        want = drm_matrix_delta(dense_stack(fs, n, m, torch.float64), w.double(), p)
        assert rel(drm_lowrank_delta(fs, (n, m), w, p).dense(), want) < 1e-9


def test_basis_matches_dense_svd():
    n, m = 30, 50
    fs = factors(n, m, [3, 5], torch.float64)
    loadings, v = lowrank_row_basis(fs, (n, m), 0.0)
    s = torch.linalg.svdvals(dense_stack(fs, n, m, torch.float64).reshape(2 * n, m))
    assert v.shape == (m, 8)
    assert torch.allclose(v.T @ v, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.vector_norm(loadings, dim=(0, 1)), s[:8], rtol=1e-10)
    for t, f in enumerate(fs):  # P_t = D_t V
        assert torch.allclose(loadings[t], f.dense() @ v, atol=1e-12)


def test_all_zero_and_empty():
    p = DrmParams()
    assert drm_lowrank_delta([None, None], (5, 7), torch.ones(2), p).dense().abs().sum() == 0
    zero = LowRank(torch.zeros(5, 2, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64))
    out = drm_lowrank_delta([zero, None], (5, 7), torch.ones(2), p)
    assert out.shape == (5, 7) and out.dense().abs().sum() == 0


def test_invariant_to_order_and_factor_gauge():
    n, m = 40, 60
    fs = factors(n, m, [4, 6, 3], torch.float64, seed=7)
    w = torch.tensor([1.0, 2.0, 0.5])
    p = DrmParams()
    ref = drm_lowrank_delta(fs, (n, m), w, p).dense()
    perm = [2, 0, 1]
    assert rel(drm_lowrank_delta([fs[i] for i in perm], (n, m), w[perm], p).dense(), ref) < 1e-10
    # B A = (B G)(G^-1 A): the factorization of an adapter does not matter, only its delta.
    g = torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    regauged = [LowRank(fs[0].left @ g, torch.linalg.solve(g, fs[0].right))] + fs[1:]
    assert rel(drm_lowrank_delta(regauged, (n, m), w, p).dense(), ref) < 1e-9


def test_never_materialises_n_by_m():
    # A dense delta of this shape would need 160 GB; the factored path needs a few MB per task.
    n, m = 200_000, 100_000
    fs = factors(n, m, [4, 4, 2], torch.float32, seed=1)
    out = drm_lowrank_delta(fs, (n, m), torch.ones(3), DrmParams())
    assert out.shape == (n, m) and out.rank <= 10
    approx, kept, total = truncated(out, 5)
    assert approx.rank == 5 and 0 < kept <= total


def test_truncation_is_best_low_rank_approximation():
    d = LowRank(torch.randn(30, 9, dtype=torch.float64), torch.randn(9, 20, dtype=torch.float64))
    u, s, vh = torch.linalg.svd(d.dense())
    approx, kept, total = truncated(d, 4)
    want = (u[:, :4] * s[:4]) @ vh[:4]
    assert rel(approx.dense(), want) < 1e-10
    assert kept == pytest.approx(float((s[:4] ** 2).sum()))
    assert total == pytest.approx(float((s ** 2).sum()))
    full, kept_all, total_all = truncated(d, 64)  # more than its rank: exact, fewer components
    assert full.rank == 9 and kept_all == pytest.approx(total_all) and rel(full.dense(), d.dense()) < 1e-12


def test_linear_baselines_factored_and_mixed_inputs():
    n, m = 12, 18
    fs = factors(n, m, [2, None, 3], torch.float64, seed=2)
    w = torch.tensor([1.0, 3.0, -0.5])
    dense = dense_stack(fs, n, m, torch.float64)
    want = (dense * w.double()[:, None, None]).sum(0)
    assert rel(weighted_sum(fs, (n, m), w).dense(), want) < 1e-12
    linear = methods.get("linear")
    got = linear.lowrank_delta(MATRIX, fs, (n, m), w, linear.Params())
    assert rel(got.dense(), want / w.sum()) < 1e-6  # weights are float32, as the pipeline passes them
    # A dense delta among factored ones: the dense method on the stack the executor materialises.
    mixed = [fs[0], torch.randn(n, m, dtype=torch.float64) * 0.1, fs[2]]
    stack = torch.stack([fs[0].dense(), mixed[1], fs[2].dense()])
    p = DrmParams(direction="horizontal")
    models = parse_spec({"models": ["a", "b", "c"], "output": "o", "method": "linear"}).models
    materialised = task_stack(models, "w", mixed, None, (n, m), torch.device("cpu"), torch.float64)
    assert torch.equal(materialised, stack)
    got = methods.get("drm").dense_delta(MATRIX, materialised, w, p)
    assert rel(got, drm_matrix_delta(stack, w.double(), p)) < 1e-12

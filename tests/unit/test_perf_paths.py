"""The engine's fast paths against plain references written here: the mixed-precision
DRM decomposition, chunked element-wise merging, and the in-place DRM matrix path."""

from __future__ import annotations

import pytest
import torch

from drmerge import methods
from drmerge.kernels import decompose, topk
from drmerge.kernels.elementwise import merge_elementwise
from drmerge.kernels.topk import keep_top_magnitudes, kth_largest
from drmerge.methods.base import MATRIX, VECTOR
from drmerge.methods.drm import DrmParams, drm_matrix_delta


def params(method: str, **kw):
    """The method's parameter class with ``kw`` (each method validates its own)."""
    return methods.get(method).Params(**kw)


def merge_tensor(method, kind, base, stack, weights, p):
    """The whole-tensor form the chunked executor must equal."""
    return methods.get(method).merge_tensor(kind, base, stack, weights, p)


def chunked(method, kind, base, tensors, weights, p, **kw):
    """The chunked executor running the method's element-wise rule."""
    rule = methods.get(method).elementwise_rule(kind, p)
    return merge_elementwise(rule, base, tensors, weights, compute_dtype=torch.float32, device=torch.device("cpu"),
                             out_dtype=torch.float32, **kw)


def f64_drm(deltas: torch.Tensor, direction: str = "vertical", drop_rate: float = 0.8, rho: float = 0.01):
    """docs/DESIGN.md ("DRM, step by step") steps 2-9 literally, float64 SVD of the stack, weights 1."""
    d = deltas.double()
    t, n, m = d.shape
    if direction == "horizontal":
        return f64_drm(d.transpose(1, 2), "vertical", drop_rate, rho).T
    u, s, vh = torch.linalg.svd(d.reshape(t * n, m), full_matrices=False)
    keep = s > rho * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    blocks = u.reshape(t, n, -1)
    c = blocks.norm(dim=1, keepdim=True)
    vec = torch.where(c > 0, blocks / torch.where(c > 0, c, 1.0), 0.0)
    flat = vec.abs().flatten()
    k = flat.numel() - round(flat.numel() * (1 - drop_rate))
    if k > 0:
        vec = torch.where(vec.abs() < flat.sort().values[k - 1], 0.0, vec)
    mt = vec * (s * c)
    total = mt.sum(0)
    sigma = torch.sign(total)
    sigma = torch.where(total == 0, torch.sign(sigma.sum()) or 1.0, sigma)
    mt = torch.where(torch.sign(mt) == sigma, mt, 0.0)
    return (mt.sum(0) / (mt != 0).sum(0).clamp_min(1)) @ vh


def structured(t, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 4, generator=g) @ torch.randn(4, m, generator=g)
    out = torch.stack([shared * (1 + i) + torch.randn(n, 8, generator=g) @ torch.randn(8, m, generator=g)
                       + 0.3 * torch.randn(n, m, generator=g) for i in range(t)])
    return out * 1e-3


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("shape,direction", [((100, 120), "vertical"), ((128, 64), "horizontal"),
                                             ((20, 128), "vertical"), ((128, 128), "horizontal")])
def test_small_matrices_match_float64_to_1e5(shape, direction):
    deltas = structured(6, *shape, seed=shape[0] + len(direction))
    p = DrmParams(direction=direction)
    assert rel(drm_matrix_delta(deltas, torch.ones(6), p), f64_drm(deltas, direction)) < 1e-5


def test_float32_gemm_path_no_worse_than_float32_svd(monkeypatch):
    # Large matrices take the float32-GEMM path; force it at a size a unit test affords.
    monkeypatch.setattr(decompose, "_EXACT_WORK", 0)
    t, n, m = 4, 120, 400
    deltas = structured(t, n, m, seed=7)
    ref = f64_drm(deltas)
    ours = rel(drm_matrix_delta(deltas, torch.ones(t), DrmParams()), ref)
    dense_err = rel(_f32_drm(deltas), ref)
    assert ours <= dense_err, (ours, dense_err)


def _f32_drm(deltas):
    """The float32 SVD variant of f64_drm (same steps, float32 throughout)."""
    t, n, m = deltas.shape
    u, s, vh = torch.linalg.svd(deltas.reshape(t * n, m).float(), full_matrices=False)
    keep = s > 0.01 * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    blocks = u.reshape(t, n, -1)
    c = blocks.norm(dim=1, keepdim=True)
    vec = torch.where(c > 0, blocks / torch.where(c > 0, c, 1.0), 0.0)
    flat = vec.abs().flatten()
    k = flat.numel() - round(flat.numel() * 0.2)
    vec = torch.where(vec.abs() < flat.sort().values[k - 1], 0.0, vec)
    mt = vec * (s * c)
    total = mt.sum(0)
    sigma = torch.sign(total)
    mt = torch.where(torch.sign(mt) == sigma, mt, 0.0)
    return (mt.sum(0) / (mt != 0).sum(0).clamp_min(1)) @ vh


def test_keep_top_magnitudes_keeps_exactly_k_lowest_index_ties_first():
    t = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 3.0, 1.0, 0.1])
    out = keep_top_magnitudes(t, 0.5)  # k = 4: 3, -2, then the first two of the four 1.0-magnitudes
    assert out.tolist() == [0.0, -2.0, 1.0, -1.0, 0.0, 3.0, 0.0, 0.0]


def _quantized(shape, t, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-6, 7, (t,) + shape, generator=g).float() / 8).to(torch.bfloat16)


@pytest.mark.parametrize("method,kind,params_", [
    ("ties", VECTOR, {}), ("ties", VECTOR, {"density": 0.35, "sign_election": False}),
    ("task_arithmetic", VECTOR, {"scale": 0.7}), ("linear", VECTOR, {}),
    ("drm", VECTOR, {}), ("drm", VECTOR, {"nonlinear_drop_rate": 0.5, "disjoint_mean": False}),
    ("ties", MATRIX, {"density": 0.1}),
])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_chunked_elementwise_equals_whole_tensor(method, kind, params_, chunk):
    shape = (13, 11)
    raw = _quantized(shape, 4, seed=chunk)  # bfloat16 inputs: many ties and zero sums
    base = raw[0]
    models = list(raw[1:]) if method != "linear" else list(raw)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0][: len(models)])
    p = params(method, **params_)
    stack = torch.stack([m.float() for m in models])
    want = merge_tensor(method, kind, base.float() if method != "linear" else None, stack, weights, p)
    got = chunked(method, kind, base if method != "linear" else None, models, weights, p, chunk=chunk)
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["drm", "ties"])
def test_chunked_sign_fallback_spans_chunks(method):
    # entry sums are zero everywhere except the last chunk, whose negative sum decides DRM's
    # fallback (TIES takes +1 at a zero sum, whatever the other chunks hold)
    base = torch.zeros(8)
    a = torch.tensor([1.0, -1, 1, -1, 1, -1, -2, -2])
    b = torch.tensor([-1.0, 1, -1, 1, -1, 1, -1, -1])
    p = params(method, **({"density": 1.0} if method == "ties" else {}))
    want = merge_tensor(method, VECTOR, base, torch.stack([a, b]), torch.ones(2), p)
    got = chunked(method, VECTOR, base, [a, b], torch.ones(2), p, chunk=3)
    assert torch.equal(got, want)
    # each zero-sum pair keeps its negative entry under DRM's fallback, its positive one under TIES
    assert got[:6].tolist() == [-1.0 if method == "drm" else 1.0] * 6


@pytest.mark.parametrize("method,params", [("ties", {}), ("drm", {}), ("drm", {"nonlinear_drop_rate": 0.3}),
                                           ("task_arithmetic", {}), ("linear", {})])
def test_lazy_chunked_reads_give_the_same_checkpoint(tmp_path, monkeypatch, method, params):
    from drmerge import pipeline, plan
    from drmerge.kernels import elementwise
    from drmerge.spec import parse_spec

    from tests.support.factories import load_tensors, make_family

    base, models = make_family(str(tmp_path / "in"), n_models=3, dtype=torch.bfloat16)

    def merge(out):
        spec = parse_spec({"base_model": base, "models": [{"model": m} for m in models], "method": method,
                           "parameters": params, "output": str(tmp_path / out)})
        pipeline.run_merge(spec, device="cpu")
        return load_tensors(str(tmp_path / out))

    whole = merge("whole")
    monkeypatch.setattr(plan, "LAZY_INPUT_BYTES", 0)  # every element-wise tensor read lazily...
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 100)  # ...in many small chunks
    lazy = merge("lazy")
    assert whole.keys() == lazy.keys()
    for name in whole:
        assert torch.equal(whole[name], lazy[name]), name


def _bf16_family(t, n, seed, scale=1e-3):
    """A bfloat16 base and ``t`` bfloat16 fine-tunes: deltas take few distinct values (ties)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    return base, [(base.float() + torch.randn(n, generator=g) * scale).to(torch.bfloat16) for _ in range(t)]


@pytest.mark.parametrize("radix_min", [0, 1 << 16])
def test_kth_largest_equals_kthvalue(monkeypatch, radix_min):
    monkeypatch.setattr(topk, "RADIX_MIN", radix_min)
    g = torch.Generator().manual_seed(3)
    base, models = _bf16_family(2, 200_000, seed=4)
    cases = [(models[0].float() - base.float()).abs(),  # bf16 differences: thousands of ties
             torch.randn(100_000, generator=g).abs(), torch.zeros(70_000), torch.full((70_000,), 0.25),
             torch.cat([torch.zeros(50_000), torch.rand(30_000, generator=g)]), torch.rand(5, generator=g)]
    for mags in cases:
        n = mags.numel()
        for k in sorted({1, 2, n // 5, n // 2, n - 1, n}):
            if k < 1:
                continue
            want = torch.kthvalue(mags, n - k + 1).values
            threshold, greater, last_tie = kth_largest(mags, k)
            assert torch.equal(threshold, want) and greater == int((mags > want).sum()), (n, k)
            ties = (mags == want).nonzero().reshape(-1)
            assert last_tie == int(ties[k - greater - 1]), (n, k)  # keeps exactly k, lowest index first


def test_kth_largest_with_non_finite_falls_back_to_kthvalue():
    mags = torch.rand(100_000, generator=torch.Generator().manual_seed(5))
    mags[7], mags[9] = float("inf"), float("nan")
    for k in (1, 2, 3, 50_000):
        want = torch.kthvalue(mags, mags.numel() - k + 1).values
        threshold, greater, _ = kth_largest(mags, k)
        assert torch.equal(threshold, want) or (threshold.isnan() and want.isnan())
        assert greater == int((mags > want).sum())


@pytest.mark.parametrize("method,params_", [("task_arithmetic", {}), ("task_arithmetic", {"scale": 0.7}),
                                           ("ties", {}), ("ties", {"density": 0.5, "disjoint_mean": False}),
                                           ("drm", {}), ("drm", {"nonlinear_drop_rate": 0.4})])
@pytest.mark.parametrize("t", [1, 2, 4, 7, 17])
@pytest.mark.parametrize("unit", [True, False])
def test_fast_elementwise_paths_equal_whole_tensor_on_real_valued_deltas(method, params_, t, unit):
    # Unquantized deltas (sums round), bfloat16 and float32 inputs, unit and other weights.
    # Sums over models are sequential in t, as torch's vectorized sum(dim=0) is wherever a
    # whole vector of columns is reduced (a tensor whose size is not a multiple of the
    # vector width has a differently ordered tail there; checkpoints' shapes do not).
    n = 150_016  # above RADIX_MIN: the radix select decides the masks
    base, models = _bf16_family(t, n, seed=t)
    weights = torch.ones(t) if unit else torch.linspace(0.5, 1.5, t)
    p = params(method, **params_)
    for b, ms in ((base, models), (base.float(), [m.float() + 1e-5 * i for i, m in enumerate(models)])):
        want = merge_tensor(method, VECTOR, b.float(), torch.stack([m.float() for m in ms]), weights, p)
        for chunk in (1 << 20, 4096):
            got = chunked(method, VECTOR, b, list(ms), weights, p, chunk=chunk)
            assert torch.equal(got, want), (chunk, b.dtype)


# nonlinear_drop_rate 0.01 keeps 11 of 12 entries and drops a zero one (same merge): the
# masks' pass and the unit-weight fast path; 0.0 the general path that redoes chunks.
@pytest.mark.parametrize("drop", [0.0, 0.01])
def test_fast_drm_sign_fallback_minus_one_with_unit_weights(drop):
    # Zero sums with nonzero deltas in early chunks, a negative tensor-wide fallback.
    base = torch.zeros(12)
    a = torch.tensor([1.0, -1, 2, -2, 0, 0, -3, -3, -3, -1, -1, -1])
    b = torch.tensor([-1.0, 1, -2, 2, 0, 0, -1, -1, -1, -2, -2, -2])
    p = DrmParams(nonlinear_drop_rate=drop)
    want = merge_tensor("drm", VECTOR, base, torch.stack([a, b]), torch.ones(2), p)
    for chunk in (2, 3, 5, 12):
        got = chunked("drm", VECTOR, base, [a, b], torch.ones(2), p, chunk=chunk)
        assert torch.equal(got, want)
        assert got[0] == -1 and got[2] == -2  # zero-sum entries took the -1 fallback: negatives kept


@pytest.mark.parametrize("density", [1.0, 0.95])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0)])
def test_ties_zero_sum_elects_plus_one_in_every_path(density, weights):
    # mergekit's majority sign is +1 where the weighted sum is exactly zero, whatever the
    # rest of the tensor holds (here: mostly negative sums). density 0.95 keeps 11 of 12 and
    # drops a zero entry: the masks' pass (and with unit weights the fast path).
    base = torch.zeros(12)
    wa, wb = weights
    a = torch.tensor([1.0, -1, 2, -2, 0, 0, -3, -3, -3, -1, -1, -1]) / wa
    b = torch.tensor([-1.0, 1, -2, 2, 0, 0, -1, -1, -1, -2, -2, -2]) / wb
    w = torch.tensor(weights)
    p = params("ties", density=density)
    want = merge_tensor("ties", VECTOR, base, torch.stack([a, b]), w, p)
    for chunk in (2, 3, 5, 12):
        got = chunked("ties", VECTOR, base, [a, b], w, p, chunk=chunk)
        assert torch.equal(got, want)
        # entry 0: w_a a = 1, w_b b = -1, sum 0 -> +1 -> a's weighted 1 over its weight
        assert got[0] == 1 / wa and got[1] == 1 / wb and got[2] == 2 / wa and got[3] == 2 / wb


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_cpu_eigensolvers_agree(monkeypatch, direction):
    # numpy's LAPACK (the CPU default) and torch's give the same merge (sign-invariant).
    import numpy

    deltas = structured(6, 96, 160, seed=11)
    p = DrmParams(direction=direction)
    monkeypatch.setattr(decompose, "_available_cpus", lambda: torch.get_num_threads())  # this process owns its CPUs
    calls = []
    real_eigh = numpy.linalg.eigh
    monkeypatch.setattr(numpy.linalg, "eigh", lambda *a, **k: calls.append(1) or real_eigh(*a, **k))
    got = {}
    for solver in ("numpy", "torch"):
        monkeypatch.setattr(decompose, "CPU_EIGH", solver)
        got[solver] = drm_matrix_delta(deltas, torch.ones(6), p)
    assert calls == [1]  # the numpy solver really ran, once
    assert rel(got["numpy"], got["torch"].double()) < 1e-6
    assert rel(got["numpy"], f64_drm(deltas, direction)) < 1e-5


def test_numpy_eigensolver_only_when_the_process_may_use_every_cpu(monkeypatch):
    # OpenBLAS ignores torch.set_num_threads: a process held to fewer threads than CPUs
    # (bench/quality's single-thread workers) must stay on torch's solver.
    import numpy

    monkeypatch.setattr(decompose, "CPU_EIGH", "numpy")
    monkeypatch.setattr(decompose, "_available_cpus", lambda: torch.get_num_threads() + 1)
    monkeypatch.setattr(numpy.linalg, "eigh", lambda *a, **k: pytest.fail("numpy eigh used"))
    deltas = structured(4, 64, 96, seed=3)
    got = drm_matrix_delta(deltas, torch.ones(4), DrmParams())
    assert rel(got, f64_drm(deltas, "vertical")) < 1e-5

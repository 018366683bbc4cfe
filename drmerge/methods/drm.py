"""DRM (Decom-Renorm-Merge), exactly as DESIGN.md section 3 states it.

Read this file top to bottom next to that section: ``drm_matrix_delta`` is steps 1-9 for
one weight matrix, ``drm_vector_delta`` is the rule for vector-like tensors.

How the decomposition is computed (step 2). We never form the SVD of the tall stack
``S = [D_1; ...; D_T]``. Its right singular vectors and values are the eigenpairs of the
Gram matrix of the stack's smaller side (``S^T S = sum_t D_t^T D_t`` or ``S S^T``), which
costs one GEMM pass plus one symmetric eigendecomposition of a matrix no larger than
``min(T*n, m)`` square.

Precision, measured against a float64 SVD of the stack (bench/README.md). The
eigendecomposition is always float64: in float32 the Gram's squared spectrum (1e-4 of
its top at DRM's 1% threshold) leaves the small components' vectors wrong (~0.3
relative error in the merged delta). The Gram GEMM and the GEMMs around it (``D_t V``,
``M V^T``) run in float64 only while they are cheap (``_EXACT_WORK``): that keeps small
matrices within 1e-7 of float64. Above it they run in the compute dtype (float32),
which is 2x faster and still 3-4x more accurate than a float32 SVD of the stack
(e.g. 5e-3 vs 2e-2 at 768x3072 with 6 models): the float64 eigensolver, not the GEMMs,
is what a float32 SVD lacks.

Everything after step 2 only needs the per-task *loadings* ``P_t = D_t V = U_t diag(s)``
(n x r) and the shared basis ``V`` (m x r):
  - renormalized vectors: ``U_t'[:, i] = P_t[:, i] / ||P_t[:, i]||``,
  - per-task spectrum:   ``s_ti = s_i * ||U_t[:, i]|| = ||P_t[:, i]||``,
so no division by singular values is ever needed on this path. The low-rank (LoRA) path
produces the same two objects from adapter factors and shares ``merge_loadings``.

Horizontal DRM on ``D_t`` is vertical DRM on ``D_t^T``, transposed back: stacking the
transposes vertically gives ``S_h^T``, whose U-blocks are the V-blocks of ``S_h``.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..spec import Parameters
from .common import add_agreeing_, combine, fallback_sign, keep_top_magnitudes, kth_largest

DECOMP_DTYPE = torch.float64


def drm_matrix_delta(deltas: torch.Tensor, weights: torch.Tensor, p: Parameters) -> torch.Tensor:
    """Merged delta ``D`` (n x m) of a (T, n, m) stack of task deltas (step 1 done by the caller)."""
    if p.direction == "horizontal":
        return drm_matrix_delta(deltas.transpose(1, 2), weights, replace(p, direction="vertical")).transpose(0, 1)
    basis = shared_row_basis(deltas, p.rank_threshold)
    if basis is None:  # every delta is zero
        return torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    loadings, v = basis
    merged = merge_loadings(loadings, weights, p)  # steps 3-8
    return (merged @ v.T).to(deltas.dtype)  # step 9


def shared_row_basis(deltas: torch.Tensor, rank_threshold: float):
    """Step 2 (vertical): ``(P, V)`` with ``P[t] = D_t V`` (T, n, r) and ``V`` (m, r), keeping
    components with ``s_i > rho * s_1``; ``None`` if the stack is zero."""
    t, n, m = deltas.shape
    work = _work_dtype(deltas)
    d = deltas.to(work)
    if m <= t * n:
        # Right side is smaller: eigenvectors of S^T S are V directly.
        flat = d.reshape(t * n, m)
        s, v = _top_eigenpairs(_gram(flat.T, flat), rank_threshold)
        if v is None:
            return None
        v = v.to(work)
        return d @ v, v
    # Stack side is smaller: eigenvectors of S S^T are U; P_t = U_t diag(s), V = S^T U / s.
    flat = d.reshape(t * n, m)
    s, u = _top_eigenpairs(_gram(flat, flat.T), rank_threshold)
    if u is None:
        return None
    s, u = s.to(work), u.to(work)
    v = (flat.T @ u) / s
    return (u * s).reshape(t, n, -1), v


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the work dtype, handed over in float64 (the work-dtype copy is freed
    before the eigendecomposition starts)."""
    return (a @ b).to(DECOMP_DTYPE)


def _work_dtype(deltas: torch.Tensor) -> torch.dtype:
    """float64 while the Gram GEMM is cheap (or the input is float64), else the input dtype."""
    t, n, m = deltas.shape
    if deltas.dtype == torch.float64 or t * n * m * min(t * n, m) <= _EXACT_WORK:
        return torch.float64
    return deltas.dtype


# Multiply-adds of the Gram GEMM up to which every GEMM runs in float64 (~25 ms on one
# CPU core): every matrix with sides <= 128 for up to 256 models, 512x512 with 8.
_EXACT_WORK = 2**30


def _top_eigenpairs(gram: torch.Tensor, rank_threshold: float):
    """Singular values (descending) and vectors above ``rho * s_1`` from a Gram matrix,
    decomposed in float64 whatever its dtype."""
    evals, evecs = _eigh(gram.to(DECOMP_DTYPE))  # ascending
    s = evals.clamp_min(0).sqrt()
    if s.numel() == 0 or s[-1] <= 0:
        return None, None
    r = int((s > rank_threshold * s[-1]).sum())  # the kept components are the last r
    # Copy only the kept columns, already in descending order (no full-size flip copy).
    return s[-r:].flip(0), evecs[:, -r:].flip(1)


# CPU symmetric eigensolver: "numpy" (numpy's LAPACK; the PyPI wheels bundle OpenBLAS) or
# "torch" (MKL in torch's CPU wheels). Same driver (dsyevd), same float64; measured for the
# 3072 x 3072 Gram of W1 on 2 cores (bench/PERF.md): numpy 2.9-3.0 s, torch 4.0-4.5 s.
CPU_EIGH = "numpy"


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (eigenvalues ascending, eigenvectors in columns, lower
    triangle used), through numpy's LAPACK for CPU tensors (see CPU_EIGH) when this
    process may use every CPU it has.

    OpenBLAS ignores ``torch.set_num_threads`` and starts one thread per CPU: in a process
    held to fewer threads (several merges side by side, e.g. bench/quality's single-thread
    workers) it oversubscribes the cores and ran 2.7x slower than MKL here (1536 x 1536
    Gram, two 1-thread processes on 2 cores: 2.2 s vs 0.8 s). MKL follows torch's setting.
    """
    if gram.device.type == "cpu" and CPU_EIGH == "numpy" and torch.get_num_threads() >= _available_cpus():
        import numpy

        evals, evecs = numpy.linalg.eigh(gram.numpy(), UPLO="L")
        return torch.from_numpy(evals), torch.from_numpy(evecs)
    return torch.linalg.eigh(gram)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def merge_loadings(loadings: torch.Tensor, weights: torch.Tensor, p: Parameters) -> torch.Tensor:
    """Steps 3-8 on the per-task loadings ``P`` (T, n, r); returns ``M`` (n, r).

    One new (T, n, r) tensor; every step after the renormalization works in place on it."""
    # Step 3: renormalize each task's singular vectors; their norms become its spectrum.
    if p.renormalize:
        spectrum = torch.linalg.vector_norm(loadings, dim=1, keepdim=True)  # (T, 1, r) = s_ti
    else:  # research ablation: keep U_t as the SVD gives it, with the shared spectrum s_i
        spectrum = torch.linalg.vector_norm(loadings, dim=(0, 1), keepdim=True)  # s_i
    vectors = loadings / spectrum.clamp_min(torch.finfo(loadings.dtype).tiny)
    vectors.masked_fill_(~(spectrum > 0), 0.0)  # zero where the norm is zero
    # Step 4: prune the pooled vectors below the k-th smallest magnitude.
    _prune_pooled_(vectors, p.drop_rate)
    # Step 5: rescale.
    vectors *= spectrum
    # Steps 6-8: elect signs, weight, disjoint mean.
    if p.sign_election and bool((weights == 1).all()):
        return _elect_unit_(vectors, p.disjoint_mean)
    return combine(vectors, weights, sign_election=p.sign_election, disjoint_mean=p.disjoint_mean)


def _elect_unit_(stack: torch.Tensor, disjoint_mean: bool) -> torch.Tensor:
    """``combine(stack, ones, sign_election=True)`` model by
    model (``add_agreeing_``), overwriting ``stack``, instead of whole-stack temporaries."""
    total = stack.sum(dim=0)
    sigma = torch.sign(total)
    fallback = fallback_sign(sigma.sum())
    sigma.masked_fill_(total == 0, fallback)  # elect_signs: where(total == 0, fallback, sign)
    merged = torch.zeros_like(total)
    count = torch.zeros_like(total)
    sign = torch.empty_like(total)
    agree = torch.empty(total.shape, dtype=torch.bool, device=total.device)
    for row in stack:
        add_agreeing_(row, sigma, merged, count, sign, agree)
    if disjoint_mean:
        return merged.div_(count.clamp_min_(1))
    return merged.div_(stack.shape[0])


def prune_pooled(vectors: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Zero every entry whose magnitude is below the k-th smallest of the whole pool,
    ``k = N - round(N * (1 - p))``."""
    return _prune_pooled_(vectors.clone(), drop_rate)


def _prune_pooled_(vectors: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """``prune_pooled`` in place."""
    n = vectors.numel()
    k = n - round(n * (1.0 - drop_rate))
    if k <= 0:
        return vectors
    mags = vectors.abs()
    threshold = kth_largest(mags.reshape(-1), n - k + 1)[0]  # the k-th smallest (kthvalue's, faster)
    return vectors.masked_fill_(mags < threshold, 0.0)


def drm_vector_delta(deltas: torch.Tensor, weights: torch.Tensor, p: Parameters) -> torch.Tensor:
    """Vector-like tensors (biases, norms, excluded embeddings/heads): TIES-like per tensor
    with an optional trim to the top ``1 - nonlinear_drop_rate`` magnitudes, but with DRM's
    steps 6-8 (signs elected before weighting, mean by count; not mergekit's TIES rule,
    methods/ties.py)."""
    if p.nonlinear_drop_rate > 0:
        deltas = torch.stack([keep_top_magnitudes(d, 1.0 - p.nonlinear_drop_rate) for d in deltas])
    return combine(deltas, weights, sign_election=p.sign_election, disjoint_mean=p.disjoint_mean)

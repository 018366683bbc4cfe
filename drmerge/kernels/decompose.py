"""DRM's step 2, the joint decomposition of a stack of task deltas, dense or factored
(docs/DESIGN.md, "DRM, step by step" and "Precision of the decomposition").

Both return what DRM's later steps need, never the full SVD: the per-task *loadings*
``P_t = D_t V = U_t diag(s)`` (T, n, r) and the shared right basis ``V`` (m, r), keeping
the components with ``s_i > rho * s_1``.

Dense (``shared_row_basis``). We never form the SVD of the tall stack
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

Factored (``lowrank_row_basis``). A LoRA adapter's delta is ``D_t = B_t A_t`` (scaling
folded into ``B_t``), so the vertical stack factors as

    S = [B_1 A_1; ...; B_T A_T] = blockdiag(B_1..B_T) @ [A_1; ...; A_T].

With ``B_t = Q_t R_t`` and ``[A_1; ...; A_T]^T = Q_A R_A`` (thin QRs),
``S = blockdiag(Q_t) (blockdiag(R_t) R_A^T) Q_A^T``; both outer factors have orthonormal
columns, so the SVD of the small core ``C = blockdiag(R_t) R_A^T`` (at most ``sum r_t``
square) ``C = U_c diag(s) V_c^T`` gives the SVD of ``S``: ``U = blockdiag(Q_t) U_c``,
``V = Q_A V_c``, same s. Every step costs O((n + m) R^2 + R^3) for R = sum of ranks; it
runs in float64 like the dense path's eigendecomposition, so the two agree to rounding.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

DECOMP_DTYPE = torch.float64


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


def stack_spectrum(deltas: torch.Tensor | None, factors: Sequence | None = None,
                   shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The singular values (float64, any order) of the vertical stack ``[D_1; ...; D_T]``
    of a (T, n, m) stack of deltas (the eigenvalues of its smaller Gram), or of factored
    deltas (those of the small core, as in ``lowrank_row_basis``). DRM's ``direction:
    auto`` compares the ranks of both stacks with them."""
    if deltas is not None:
        t, n, m = deltas.shape
        flat = deltas.to(_work_dtype(deltas)).reshape(t * n, m)
        gram = _gram(flat.T, flat) if m <= t * n else _gram(flat, flat.T)
        return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    live = [f for f in factors if f is not None and f.rank > 0]
    if not live:
        return torch.zeros(0, dtype=DECOMP_DTYPE)
    rs = [torch.linalg.qr(f.left.to(DECOMP_DTYPE))[1] for f in live]
    r_a = torch.linalg.qr(torch.cat([f.right.to(DECOMP_DTYPE) for f in live]).T)[1]
    return torch.linalg.svdvals(torch.block_diag(*rs) @ r_a.T)


def lowrank_row_basis(factors: Sequence, shape: tuple[int, int], rank_threshold: float):
    """Step 2 (vertical) from factors (``kernels.lowrank.LowRank`` or ``None`` per task): ``(P, V)`` with ``P[t] = D_t V`` (T, n, k) and ``V``
    (m, k), keeping ``s_i > rho * s_1``; ``None`` if every delta is zero.

    Same contract as ``shared_row_basis`` on the materialised stack.
    """
    n, m = shape
    live = [(t, f) for t, f in enumerate(factors) if f is not None and f.rank > 0]
    if not live:
        return None
    device = live[0][1].left.device
    qs, rs = [], []
    for _, f in live:
        q, r = torch.linalg.qr(f.left.to(DECOMP_DTYPE))  # q (n, k_t), r (k_t, r_t)
        qs.append(q)
        rs.append(r)
    a_stack = torch.cat([f.right.to(DECOMP_DTYPE) for _, f in live])  # (R, m)
    q_a, r_a = torch.linalg.qr(a_stack.T)  # q_a (m, k_a), r_a (k_a, R)
    core = torch.block_diag(*rs) @ r_a.T  # (sum k_t, k_a)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return None
    keep = (s > rank_threshold * s[0]) & (s > 0)
    s, u_c, v_c = s[keep], u_c[:, keep], vh_c[keep].T
    v = q_a @ v_c  # (m, k)
    loadings = torch.zeros(len(factors), n, s.numel(), dtype=DECOMP_DTYPE, device=device)
    row = 0
    for (t, _), q in zip(live, qs):
        rows = q.shape[1]
        loadings[t] = q @ (u_c[row:row + rows] * s)
        row += rows
    return loadings, v

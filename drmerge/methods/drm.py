"""DRM (Decom-Renorm-Merge), exactly as docs/DESIGN.md ("DRM, step by step") states it.

Read this file top to bottom next to that section: ``drm_matrix_delta`` is steps 1-9 for
one weight matrix (step 2, the joint decomposition, is kernels/decompose.py),
``drm_lowrank_delta`` the same steps on LoRA factors, ``merge_loadings`` steps 3-8 shared
by both, and ``drm_vector_delta`` the rule for vector-like tensors.

Everything after step 2 only needs the per-task *loadings* ``P_t = D_t V = U_t diag(s)``
(n x r) and the shared basis ``V`` (m x r):
  - renormalized vectors: ``U_t'[:, i] = P_t[:, i] / ||P_t[:, i]||``,
  - per-task spectrum:   ``s_ti = s_i * ||U_t[:, i]|| = ||P_t[:, i]||``,
so no division by singular values is ever needed on this path.

Horizontal DRM on ``D_t`` is vertical DRM on ``D_t^T``, transposed back: stacking the
transposes vertically gives ``S_h^T``, whose U-blocks are the V-blocks of ``S_h``. For
factors, ``D_t^T = A_t^T B_t^T`` is again a factored delta with the roles swapped.

Torch-free at import (the API process validates DRM's parameters through this module):
every function that touches tensors imports torch in its body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import Field

from .base import COPY, MATRIX, Divide, ElementwiseRule, MergeMethod, Op, Params, PerModel, Sign

if TYPE_CHECKING:
    import torch

    from ..kernels.lowrank import LowRank


class DrmParams(Params):
    direction: Literal["vertical", "horizontal"] = Field(
        "vertical", description="Stack the task deltas vertically (shared right basis) or horizontally.")
    drop_rate: float = Field(0.8, ge=0.0, lt=1.0, description="Fraction of the pooled renormalized singular "
                                                              "vectors' entries pruned (step 4).")
    rank_threshold: float = Field(0.01, ge=0.0, lt=1.0, description="Components with s_i <= rank_threshold * "
                                                                    "s_1 are dropped (step 2).")
    scale: float = Field(1.0, description="The global scale lam of W0 + lam * D.")
    sign_election: bool = Field(True, description="Elect a majority sign per entry and drop the entries that "
                                                  "disagree (step 6).")
    disjoint_mean: bool = Field(True, description="Divide by the number of kept entries (true) or by the number "
                                                  "of models (step 8).")
    nonlinear_drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Vector-like tensors: fraction of each "
                                                                        "task delta's smallest entries dropped.")
    renormalize: bool = Field(True, description="Research ablation: false skips the renormalization (step 3).")


def drm_matrix_delta(deltas: "torch.Tensor", weights: "torch.Tensor", p: DrmParams) -> "torch.Tensor":
    """Merged delta ``D`` (n x m) of a (T, n, m) stack of task deltas (step 1 done by the caller)."""
    import torch

    from ..kernels.decompose import shared_row_basis

    if p.direction == "horizontal":
        vertical = p.model_copy(update={"direction": "vertical"})
        return drm_matrix_delta(deltas.transpose(1, 2), weights, vertical).transpose(0, 1)
    basis = shared_row_basis(deltas, p.rank_threshold)  # step 2
    if basis is None:  # every delta is zero
        return torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    loadings, v = basis
    merged = merge_loadings(loadings, weights, p)  # steps 3-8
    return (merged @ v.T).to(deltas.dtype)  # step 9


def drm_lowrank_delta(factors: Sequence["LowRank | None"], shape: tuple[int, int], weights: "torch.Tensor",
                      p: DrmParams) -> "LowRank":
    """Merged DRM delta (steps 2-9) of T factored deltas (``None``: the task leaves the
    matrix alone), returned factored: ``M @ V^T`` (vertical) or ``V M^T`` (horizontal).
    Float64; the caller casts. Nothing n x m is formed."""
    from ..kernels.decompose import lowrank_row_basis
    from ..kernels.lowrank import LowRank

    if p.direction == "horizontal":
        transposed = [f.t() if f is not None else None for f in factors]
        vertical = p.model_copy(update={"direction": "vertical"})
        return drm_lowrank_delta(transposed, (shape[1], shape[0]), weights, vertical).t()
    basis = lowrank_row_basis(factors, shape, p.rank_threshold)  # step 2
    if basis is None:  # every delta is zero
        device = next((f.left.device for f in factors if f is not None), None)
        return LowRank.zeros(*shape, device=device)
    loadings, v = basis
    merged = merge_loadings(loadings, weights.to(device=loadings.device, dtype=loadings.dtype), p)  # steps 3-8
    return LowRank(merged, v.T)  # step 9, kept factored


def merge_loadings(loadings: "torch.Tensor", weights: "torch.Tensor", p: DrmParams) -> "torch.Tensor":
    """Steps 3-8 on the per-task loadings ``P`` (T, n, r); returns ``M`` (n, r).

    One new (T, n, r) tensor; every step after the renormalization works in place on it."""
    import torch

    from ..kernels.signs import combine, elect_unit_

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
    # Steps 6-8: elect signs (on the unweighted values), weight, disjoint mean.
    if p.sign_election and bool((weights == 1).all()):
        return elect_unit_(vectors, p.disjoint_mean)
    return combine(vectors, weights, Sign.UNWEIGHTED if p.sign_election else Sign.NONE, _divide(p))


def prune_pooled(vectors: "torch.Tensor", drop_rate: float) -> "torch.Tensor":
    """Zero every entry whose magnitude is below the k-th smallest of the whole pool,
    ``k = N - round(N * (1 - p))``."""
    return _prune_pooled_(vectors.clone(), drop_rate)


def _prune_pooled_(vectors: "torch.Tensor", drop_rate: float) -> "torch.Tensor":
    """``prune_pooled`` in place."""
    from ..kernels.topk import kth_largest

    n = vectors.numel()
    k = n - round(n * (1.0 - drop_rate))
    if k <= 0:
        return vectors
    mags = vectors.abs()
    threshold = kth_largest(mags.reshape(-1), n - k + 1)[0]  # the k-th smallest (kthvalue's, faster)
    return vectors.masked_fill_(mags < threshold, 0.0)


def vector_rule(p: DrmParams) -> ElementwiseRule:
    """Vector-like tensors (biases, norms, excluded embeddings/heads): TIES-like per tensor
    with an optional trim to the top ``1 - nonlinear_drop_rate`` magnitudes, but with DRM's
    steps 6-8 (signs elected on the unweighted values, before weighting; the mean over the
    kept entries' count; a zero sum takes the sign of the sum of all elected signs). Not
    mergekit's TIES rule (methods/ties.py)."""
    return ElementwiseRule(keep=1.0 - p.nonlinear_drop_rate, sign=Sign.UNWEIGHTED if p.sign_election else Sign.NONE,
                           divide=_divide(p), scale=p.scale)


def drm_vector_delta(deltas: "torch.Tensor", weights: "torch.Tensor", p: DrmParams) -> "torch.Tensor":
    """``vector_rule`` on a whole (T, ...) stack of task deltas."""
    from ..kernels.elementwise import rule_delta

    return rule_delta(vector_rule(p), deltas, weights)


def _divide(p: DrmParams) -> Divide:
    return Divide.COUNT if p.disjoint_mean else Divide.MODELS


class Drm(MergeMethod):
    name = "drm"
    Params = DrmParams
    summary = ("Decom-Renorm-Merge: a joint SVD of the task deltas of each weight matrix, renormalized "
               "singular vectors, pruning, sign election and a disjoint mean; TIES-like on vector-like tensors.")

    def operation(self, kind: str, params: DrmParams) -> Op:
        return Op.DENSE if kind == MATRIX else Op.ELEMENTWISE

    def has_lowrank(self, kind: str, params: DrmParams) -> bool:
        return kind == MATRIX

    def elementwise_rule(self, kind: str, params: DrmParams, models: PerModel | None = None) -> ElementwiseRule | None:
        return vector_rule(params) if kind not in (MATRIX, COPY) else None

    def dense_delta(self, kind: str, deltas, weights, params: DrmParams, models: PerModel | None = None):
        if kind == MATRIX:
            flat = deltas.reshape(deltas.shape[0], deltas.shape[1], -1)
            return drm_matrix_delta(flat, weights, params).reshape(deltas.shape[1:])
        return drm_vector_delta(deltas, weights, params)

    def lowrank_delta(self, kind: str, factors, shape, weights, params: DrmParams, models: PerModel | None = None):
        return drm_lowrank_delta(factors, shape, weights, params)


METHOD = Drm()

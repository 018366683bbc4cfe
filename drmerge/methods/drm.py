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
``direction: auto`` chooses one of the two per matrix (``choose_direction``: the authors'
stacked-rank or orthogonality rule), and ``nonlinear_trim: global`` makes the trim of the
vector-like tensors one per model over all of them (``pool_keep``).

Every matrix arrives as the linear map ``out x in`` and every part of a fused projection as
its own matrix (``splits_fused``: the plan's views, drmerge/layouts.py).

Torch-free at import (the API process validates DRM's parameters through this module):
every function that touches tensors imports torch in its body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import Field, ValidationInfo, field_validator

from .base import COPY, MATRIX, POOL_FLOOR, VECTOR, Divide, ElementwiseRule, MergeMethod, Op, Params, PerModel, Sign

if TYPE_CHECKING:
    import torch

    from ..kernels.lowrank import LowRank

# The rule ``direction: auto`` uses unless the spec names one (``auto_rule``). "rank" until
# the quality benchmark (bench/quality) has measured both rules; the lead sets it from there.
AUTO_RULE = "rank"
AUTO_RULES = ("rank", "orthogonality")
# The authors' stacked-rank rule counts singular values above RANK_RULE_RTOL times the
# largest (torch.linalg.matrix_rank(S, rtol=0.1)), not DRM's 0.01.
RANK_RULE_RTOL = 0.1
# Orthogonality scores closer than this times T^2 are a tie (vertical). The authors compare
# strictly; but exact ties are common (LoRA deltas: the blocks are orthogonal, G = diag(r_t)
# in both directions, so both scores are T^2 - sum_t |r_t - 1| exactly), and there the
# strict comparison is decided by rounding, differently on the dense and factored paths or
# another device. Any real difference between the scores is far above it.
ORTH_TIE = 1e-9


class DrmParams(Params):
    direction: Literal["vertical", "horizontal", "auto"] = Field(
        "vertical", description="Stack the task deltas vertically (shared right basis) or horizontally, or choose per "
                                "matrix from its deltas (auto, by auto_rule).")
    auto_rule: Literal["rank", "orthogonality"] = Field(
        AUTO_RULE, description="direction: auto: horizontal where the horizontal stack has the smaller rank at rtol "
                               "0.1 (rank), or the higher orthogonality score of its singular-vector blocks "
                               "(orthogonality); ties go vertical.")
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
    nonlinear_trim: Literal["tensor", "global"] = Field(
        "tensor", description="Scope of nonlinear_drop_rate: each vector-like tensor on its own (tensor), or one "
                              "threshold per model over all of them together (global, the authors').")
    renormalize: bool = Field(True, description="Research ablation: false skips the renormalization (step 3).")

    @field_validator("auto_rule")
    @classmethod
    def _auto_rule_needs_auto(cls, value: str, info: ValidationInfo) -> str:
        if value != AUTO_RULE and info.data.get("direction") != "auto":
            raise ValueError("only applies with direction: auto")
        return value

    @field_validator("nonlinear_trim")
    @classmethod
    def _global_needs_a_rate(cls, value: str, info: ValidationInfo) -> str:
        if value == "global" and info.data.get("nonlinear_drop_rate") == 0.0:
            raise ValueError("needs nonlinear_drop_rate > 0 (with nothing to trim there is no scope to choose)")
        return value


def choose_direction(deltas: "torch.Tensor | None", rule: str, rank_threshold: float,
                     factors: "Sequence[LowRank | None] | None" = None, shape: tuple[int, int] | None = None) -> str:
    """``direction: auto`` for one matrix (docs/DESIGN.md, "DRM, step by step"), from its
    (T, n, m) stack of task deltas or its factors, by the authors' rules:

    - ``rank``: horizontal iff ``rank(S_h) < rank(S_v)``, each rank counting the singular
      values above ``RANK_RULE_RTOL`` (0.1) times the largest (their ``matrix_rank(S, rtol=0.1)``),
      for ``S_v = [D_1; ...; D_T]`` and ``S_h = [D_1 ... D_T]``;
    - ``orthogonality``: horizontal iff ``score(S_h) > score(S_v)``; ``score = sum_ts (1 -
      |G_ts - delta_ts|)`` over the Gram ``G_ts = <U_t, U_s>`` of the per-task blocks of the
      stack's singular vectors (U blocks of ``S_v``, V blocks of ``S_h``), the components
      above ``rank_threshold`` (their 0.01) kept.

    Ties go vertical, as in their code (orthogonality: scores within ``ORTH_TIE * T^2``)."""
    from ..kernels.decompose import lowrank_row_basis, shared_row_basis, stack_spectrum

    if rule == "rank":
        s_v = stack_spectrum(deltas, factors, shape)
        s_h = stack_spectrum(deltas.transpose(1, 2) if deltas is not None else None,
                             [f.t() if f is not None else None for f in factors] if factors is not None else None,
                             (shape[1], shape[0]) if shape is not None else None)
        return "horizontal" if _count_above(s_h, RANK_RULE_RTOL) < _count_above(s_v, RANK_RULE_RTOL) else "vertical"
    # One stack's decomposition at a time: only its score is kept.
    if deltas is not None:
        score_v = _orthogonality(shared_row_basis(deltas, rank_threshold))
        score_h = _orthogonality(shared_row_basis(deltas.transpose(1, 2), rank_threshold))
    else:
        score_v = _orthogonality(lowrank_row_basis(factors, shape, rank_threshold))
        score_h = _orthogonality(lowrank_row_basis([f.t() if f is not None else None for f in factors],
                                                   (shape[1], shape[0]), rank_threshold))
    tasks = len(factors) if deltas is None else deltas.shape[0]
    return "horizontal" if score_h > score_v + ORTH_TIE * tasks**2 else "vertical"


def _count_above(s: "torch.Tensor", rtol: float) -> int:
    """``torch.linalg.matrix_rank(S, rtol=rtol)`` from S's singular values: ``s_i > rtol * s_1``."""
    if s.numel() == 0 or not bool(s.max() > 0):
        return 0
    return int((s > rtol * s.max()).sum())


def _orthogonality(basis) -> float:
    """The authors' orthogonality score of a stack from its loadings ``P_t = U_t diag(s)``
    (kernels/decompose.py): ``U_t = P_t / s``, ``G = [<U_t, U_s>]``, ``sum(1 - |G - I|)``.
    An all-zero stack (no components) scores -inf either way: a tie, so vertical."""
    import torch

    if basis is None:
        return float("-inf")
    loadings, _ = basis
    s = torch.linalg.vector_norm(loadings, dim=(0, 1))  # the stack's singular values
    blocks = (loadings / s.clamp_min(torch.finfo(loadings.dtype).tiny)).reshape(loadings.shape[0], -1)
    gram = blocks @ blocks.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return float((1 - (gram - eye).abs()).sum())


def drm_matrix_delta(deltas: "torch.Tensor", weights: "torch.Tensor", p: DrmParams) -> "torch.Tensor":
    """Merged delta ``D`` (n x m) of a (T, n, m) stack of task deltas (step 1 done by the caller)."""
    import torch

    from ..kernels.decompose import shared_row_basis

    if p.direction == "auto":
        p = p.model_copy(update={"direction": choose_direction(deltas, p.auto_rule, p.rank_threshold)})
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

    if p.direction == "auto":
        p = p.model_copy(update={"direction": choose_direction(None, p.auto_rule, p.rank_threshold, factors, shape)})
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


def vector_rule(p: DrmParams, models: PerModel | None = None) -> ElementwiseRule:
    """Vector-like tensors (biases, norms, excluded embeddings/heads): TIES-like per tensor
    with an optional trim, but with DRM's steps 6-8 (signs elected on the unweighted values,
    before weighting; the mean over the kept entries' count; a zero sum takes the sign of
    the sum of all elected signs). Not mergekit's TIES rule (methods/ties.py).

    The trim (``nonlinear_drop_rate``): ``tensor``, each delta's top ``1 - rate``
    magnitudes; ``global``, the entries at or above the model's threshold over all its
    vector-like tensors together (the per-model value ``POOL_FLOOR``, see ``pool_keep``)."""
    sign = Sign.UNWEIGHTED if p.sign_election else Sign.NONE
    if p.nonlinear_trim == "global":
        floor = models.values.get(POOL_FLOOR) if models is not None else None
        if floor is None:
            from ..errors import MergeError

            raise MergeError("internal_error", "nonlinear_trim: global needs the pooled thresholds, which were not "
                             "computed for this tensor (execute.resolve_pools)")
        return ElementwiseRule(floor=tuple(floor), sign=sign, divide=_divide(p), scale=p.scale)
    return ElementwiseRule(keep=1.0 - p.nonlinear_drop_rate, sign=sign, divide=_divide(p), scale=p.scale)


def drm_vector_delta(deltas: "torch.Tensor", weights: "torch.Tensor", p: DrmParams,
                     models: PerModel | None = None) -> "torch.Tensor":
    """``vector_rule`` on a whole (T, ...) stack of task deltas."""
    from ..kernels.elementwise import rule_delta

    return rule_delta(vector_rule(p, models), deltas, weights)


def _divide(p: DrmParams) -> Divide:
    return Divide.COUNT if p.disjoint_mean else Divide.MODELS


class Drm(MergeMethod):
    name = "drm"
    Params = DrmParams
    summary = ("Decom-Renorm-Merge: a joint SVD of the task deltas of each weight matrix, renormalized "
               "singular vectors, pruning, sign election and a disjoint mean; TIES-like on vector-like tensors.")
    splits_fused = True

    def operation(self, kind: str, params: DrmParams) -> Op:
        return Op.DENSE if kind == MATRIX else Op.ELEMENTWISE

    def has_lowrank(self, kind: str, params: DrmParams) -> bool:
        return kind == MATRIX

    def pool_keep(self, kind: str, params: DrmParams) -> float | None:
        if kind == VECTOR and params.nonlinear_trim == "global":
            return 1.0 - params.nonlinear_drop_rate
        return None

    def decided(self, params: DrmParams) -> dict[str, str]:
        out = {}
        if params.direction == "auto":
            out["direction"] = f"decided at merge time, per matrix (or part), by the {params.auto_rule} rule"
        if params.nonlinear_trim == "global":
            out["nonlinear_threshold"] = ("decided at merge time: one magnitude threshold per model over all "
                                          "vector-like tensors")
        return out

    def decide(self, kind, params: DrmParams, deltas=None, factors=None, shape=None):
        if kind != MATRIX or params.direction != "auto":
            return params, {}
        if deltas is not None:
            deltas = deltas.reshape(deltas.shape[0], deltas.shape[1], -1)
        direction = choose_direction(deltas, params.auto_rule, params.rank_threshold, factors, shape)
        return params.model_copy(update={"direction": direction}), {"direction": direction}

    def elementwise_rule(self, kind: str, params: DrmParams, models: PerModel | None = None) -> ElementwiseRule | None:
        return vector_rule(params, models) if kind not in (MATRIX, COPY) else None

    def dense_delta(self, kind: str, deltas, weights, params: DrmParams, models: PerModel | None = None):
        if kind == MATRIX:
            flat = deltas.reshape(deltas.shape[0], deltas.shape[1], -1)
            return drm_matrix_delta(flat, weights, params).reshape(deltas.shape[1:])
        return drm_vector_delta(deltas, weights, params, models)

    def lowrank_delta(self, kind: str, factors, shape, weights, params: DrmParams, models: PerModel | None = None):
        return drm_lowrank_delta(factors, shape, weights, params)


METHOD = Drm()

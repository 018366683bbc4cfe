"""TIES merging with mergekit's semantics (docs/DESIGN.md, "TIES"): the numbers users
compare against when they rerun a mergekit TIES config through drmerge.

Per tensor: trim each delta to its top ``density`` magnitudes; weight them, ``E_t = w_t D_t``;
elect the majority sign of ``sum_t E_t``, +1 where that sum is exactly zero (mergekit's
``(sum >= 0) * 2 - 1``); keep the entries of each ``E_t`` with that sign (a zero entry never
matches); divide their sum by the sum of the *weights* of the kept entries, 0 -> 1
(``disjoint_mean``, mergekit's ``normalize``). A negative weight flips its model's entries
before the vote, and its weight counts negatively in the divisor, exactly as in mergekit.

DRM's rule for vector-like tensors looks alike but follows its authors (methods/drm.py
``vector_rule``): sign elected on the unweighted values, the kept entries counted, and a
zero sum falling back to the sign of the sum of the elected signs.
"""

from __future__ import annotations

from pydantic import Field

from .base import Divide, ElementwiseRule, MergeMethod, Params, PerModel, Sign


class TiesParams(Params):
    density: float = Field(0.2, gt=0.0, le=1.0, description="Fraction of each task delta's largest-magnitude "
                                                            "entries kept.")
    scale: float = Field(1.0, description="The global scale lam of W0 + lam * D (mergekit's lambda).")
    sign_election: bool = Field(True, description="Elect the majority sign of the weighted deltas and keep only "
                                                  "the entries that agree.")
    disjoint_mean: bool = Field(True, description="Divide by the sum of the kept entries' weights (mergekit's "
                                                  "normalize) or, false, by the number of models.")


class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    summary = ("TIES-merging (trim, elect sign, disjoint merge) as mergekit computes it: the sign elected on the "
               "weighted deltas, their sum divided by the kept weights.")

    def elementwise_rule(self, kind: str, params: TiesParams, models: PerModel | None = None) -> ElementwiseRule:
        return ElementwiseRule(keep=params.density, sign=Sign.WEIGHTED if params.sign_election else Sign.NONZERO,
                               divide=Divide.KEPT_WEIGHTS if params.disjoint_mean else Divide.MODELS,
                               scale=params.scale)


METHOD = Ties()

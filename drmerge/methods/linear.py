"""Linear averaging: ``sum_t w_t W_t / sum_t w_t`` of the models' weights (mergekit's
``linear`` with ``normalize: true``). No base model is involved: given one, it only shapes
the plan and supplies the tensors that are copied.

On task deltas (a merge with LoRA adapters among its inputs, whose inputs are deltas from
the base) the same average is ``W0 + sum_t (w_t / sum_t w_t) D_t``: a weighted sum, exact
on factors too.
"""

from __future__ import annotations

from .base import Divide, ElementwiseRule, MergeMethod, Params, PerModel, Sign


class LinearParams(Params):
    pass


def normalized(weights):
    """``w_t / sum_t w_t`` (the sum may not be 0)."""
    from ..kernels.signs import weight_sum

    return weights / weight_sum(weights)


class Linear(MergeMethod):
    name = "linear"
    Params = LinearParams
    summary = "The weighted average of the models' weights, sum_t w_t W_t / sum_t w_t; needs no base_model."
    needs_base = False

    def elementwise_rule(self, kind: str, params: LinearParams, models: PerModel | None = None) -> ElementwiseRule:
        return ElementwiseRule(sign=Sign.NONE, divide=Divide.WEIGHTS, of_weights=True)

    def dense_delta(self, kind: str, deltas, weights, params: LinearParams, models: PerModel | None = None):
        from ..kernels.signs import combine

        return combine(deltas, normalized(weights), Sign.NONE, Divide.NONE)

    def has_lowrank(self, kind: str, params: LinearParams) -> bool:
        return True

    def lowrank_delta(self, kind: str, factors, shape, weights, params, models: PerModel | None = None):
        from ..kernels.lowrank import weighted_sum

        return weighted_sum(factors, shape, normalized(weights))


METHOD = Linear()

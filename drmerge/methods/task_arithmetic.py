"""Task arithmetic: ``W0 + lam * sum_t w_t D_t`` (mergekit's ``task_arithmetic`` with
``lambda`` = ``scale``). Element-wise, and exact on LoRA factors (a weighted sum of
factored deltas is their concatenation)."""

from __future__ import annotations

from pydantic import Field

from .base import Divide, ElementwiseRule, MergeMethod, Params, PerModel, Sign


class TaskArithmeticParams(Params):
    scale: float = Field(1.0, description="The global scale lam of W0 + lam * sum_t w_t D_t (mergekit's lambda).")


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    summary = "The weighted sum of the task deltas, scaled: W0 + lam * sum_t w_t D_t."

    def elementwise_rule(self, kind: str, params: TaskArithmeticParams,
                         models: PerModel | None = None) -> ElementwiseRule:
        return ElementwiseRule(sign=Sign.NONE, divide=Divide.NONE, scale=params.scale)

    def has_lowrank(self, kind: str, params: TaskArithmeticParams) -> bool:
        return True

    def lowrank_delta(self, kind: str, factors, shape, weights, params, models: PerModel | None = None):
        from ..kernels.lowrank import weighted_sum

        return weighted_sum(factors, shape, weights)


METHOD = TaskArithmetic()

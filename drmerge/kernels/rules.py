"""The element-wise rules a method hands the generic executor (kernels/elementwise.py),
as plain data: torch-free, so that method modules can build them at import time in the
API process. ``MergeMethod.elementwise_rule`` returns one per tensor."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Sign(StrEnum):
    """Which entries of the (trimmed) task deltas an element-wise rule keeps."""

    NONE = "none"  # every entry
    NONZERO = "nonzero"  # the nonzero weighted entries (TIES with sign_election false)
    WEIGHTED = "weighted"  # those whose sign is the majority sign of the weighted sum, +1 at a zero sum (TIES)
    UNWEIGHTED = "unweighted"  # majority sign of the unweighted sum, the tensor-wide fallback at a zero sum (DRM)


class Divide(StrEnum):
    """What the sum of the kept weighted entries is divided by, per entry."""

    NONE = "none"  # nothing: the weighted sum (task arithmetic)
    COUNT = "count"  # the number of kept nonzero entries, at least 1 (DRM's disjoint mean)
    KEPT_WEIGHTS = "kept_weights"  # the sum of the kept entries' weights, 0 -> 1 (TIES's, mergekit's normalize)
    MODELS = "models"  # the number of models
    WEIGHTS = "weights"  # the sum of every model's weight, which may not be 0 (linear)


@dataclass(frozen=True)
class ElementwiseRule:
    """An element-wise merge as the generic executor (kernels/elementwise.py) runs it: per
    entry, ``W0 + scale * combine(trim(D_t))``, or ``combine(W_t)`` when ``of_weights``.

    ``keep``: the fraction of each model's largest-magnitude entries kept (1: no trim), one
    value for every model or one per model. ``floor`` (instead): per model, the magnitude
    below which its entries are dropped (a threshold computed over a pool of tensors,
    e.g. DRM's ``nonlinear_trim: global``); entries equal to it are kept."""

    keep: float | tuple[float, ...] = 1.0
    sign: Sign = Sign.NONE
    divide: Divide = Divide.NONE
    of_weights: bool = False  # combine the models' weights themselves, not their deltas from the base
    scale: float = 1.0
    floor: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.floor is not None and self.keep != 1.0:
            raise ValueError("an element-wise rule trims by keep or by floor, not both")

    def keeps(self, n_models: int) -> tuple[float, ...]:
        return self.keep if isinstance(self.keep, tuple) else (self.keep,) * n_models

    @property
    def trims(self) -> bool:
        if self.floor is not None:
            return any(f > 0 for f in self.floor)
        return any(k < 1.0 for k in (self.keep if isinstance(self.keep, tuple) else (self.keep,)))

    @property
    def elects(self) -> bool:
        return self.sign in (Sign.WEIGHTED, Sign.UNWEIGHTED)

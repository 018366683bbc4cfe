"""Sign election and the combine step of the element-wise rules (methods/base.py ``Sign``,
``Divide``): TIES's and DRM's steps after the trim, task arithmetic's weighted sum and
linear's weighted average are all ``combine`` with their own sign and divisor rules.

Where TIES and DRM differ (docs/DESIGN.md, "Where DRM and TIES differ"): TIES elects on the
weighted values, +1 at an exactly-zero sum (mergekit's ``(sum >= 0) * 2 - 1``), and divides
by the kept weights; DRM elects on the unweighted values, falls back to the sign of the sum
of all elected signs at a zero sum, and divides by the count of kept entries.
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from .rules import Divide, Sign


def elect_signs(stack: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Per-entry majority sign of a (T, ...) stack: ``sign(sum_t stack_t)``, and ``fallback``
    where that sum is exactly zero, so every entry gets a definite sign.

    DRM's fallback (the default) is the sign of the sum of all elected signs; given, it is
    that sign computed over a whole tensor this stack is a chunk of (kernels.elementwise).
    TIES passes +1, mergekit's choice.
    """
    total = stack.sum(dim=0)
    sigma = torch.sign(total)
    if fallback is None:
        fallback = fallback_sign(sigma.sum())
    return torch.where(total == 0, fallback.to(sigma.dtype), sigma)


def fallback_sign(sign_sum: torch.Tensor) -> torch.Tensor:
    """Sign used where an entry's sum is zero: that of the sum of elected signs, else +1."""
    fallback = torch.sign(sign_sum)
    if fallback == 0:
        fallback = torch.ones((), dtype=fallback.dtype, device=fallback.device)
    return fallback


def combine(stack: torch.Tensor, weights: torch.Tensor, sign: Sign, divide: Divide,
            fallback: torch.Tensor | None = None) -> torch.Tensor:
    """One element-wise rule after the trim, over a (T, ...) stack (a whole tensor or any
    chunk of it: each entry depends on its own column only, except DRM's fallback sign,
    which ``fallback`` gives for a chunk; see ``elect_signs``). ``weights``: shape (T,).

    Weight the entries, keep those the sign rule keeps, sum them and divide per ``divide``.
    """
    w = weights.to(stack.dtype).reshape((-1,) + (1,) * (stack.dim() - 1))
    weighted = stack * w
    zero = torch.zeros((), dtype=stack.dtype, device=stack.device)
    keep = None
    if sign == Sign.UNWEIGHTED:
        keep = torch.sign(stack) == elect_signs(stack, fallback)
    elif sign == Sign.WEIGHTED:
        keep = torch.sign(weighted) == elect_signs(weighted, torch.ones((), dtype=stack.dtype, device=stack.device))
    elif sign == Sign.NONZERO:
        keep = weighted != 0
    if keep is not None:
        weighted = torch.where(keep, weighted, zero)
    total = weighted.sum(dim=0)
    if divide == Divide.NONE:
        return total
    if divide == Divide.MODELS:
        return total / stack.shape[0]
    if divide == Divide.COUNT:
        return total / (weighted != 0).sum(dim=0).clamp_min(1)
    if divide == Divide.KEPT_WEIGHTS:
        divisor = (w * keep).sum(dim=0) if keep is not None else w.sum(dim=0).expand(total.shape).clone()
        return total / divisor.masked_fill_(divisor == 0, 1.0)
    if divide == Divide.WEIGHTS:
        return total / weight_sum(weights)
    raise MergeError("internal_error", f"unknown divisor {divide!r}")


def weight_sum(weights: torch.Tensor) -> float:
    """The sum of the models' weights, the divisor of a weighted average: never 0."""
    total = float(weights.sum())
    if total == 0.0:
        raise MergeError("invalid_spec", "linear merge needs model weights that do not sum to zero", param="models")
    return total


def add_agreeing_(row: torch.Tensor, sigma: torch.Tensor, merged: torch.Tensor, count: torch.Tensor,
                  sign: torch.Tensor, agree: torch.Tensor) -> None:
    """One model's step of a sign-elected disjoint mean, in place: add to ``merged`` the
    entries of ``row`` whose sign equals the elected ``sigma`` (+-1 everywhere, so zero
    entries never agree) and count them in ``count``. ``row`` is overwritten; ``sign`` and
    ``agree`` are scratch buffers of its shape. A disagreeing entry is multiplied by 0 rather
    than replaced by +0; the sums start from +0, so no sum changes."""
    torch.sign(row, out=sign)
    torch.eq(sign, sigma, out=agree)
    count += agree
    row *= agree
    merged += row


def elect_unit_(stack: torch.Tensor, disjoint_mean: bool) -> torch.Tensor:
    """``combine(stack, ones, Sign.UNWEIGHTED, COUNT or MODELS)`` model by model
    (``add_agreeing_``), overwriting ``stack``, instead of whole-stack temporaries."""
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

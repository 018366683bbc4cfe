"""An independent, deliberately plain float64 implementation of docs/DESIGN.md, "The merge math".

Written with numpy and a full dense SVD, step by step as the design states it, so the
engine's Gram/eigen shortcuts and torch code are checked against something that shares
none of their code.
"""

from __future__ import annotations

import numpy as np


def _prune(blocks, drop_rate):
    pool = np.concatenate([np.abs(b).ravel() for b in blocks])
    n = pool.size
    k = n - int(round(n * (1 - drop_rate)))
    if k <= 0:
        return blocks
    threshold = np.sort(pool)[k - 1]
    return [np.where(np.abs(b) < threshold, 0.0, b) for b in blocks]


def _elect_and_mean(ms, weights, sign_election, disjoint_mean):
    """DRM's steps 6-8: signs elected on the unweighted values, then weights, then the
    mean over the surviving entries' count."""
    ms = [np.array(m, dtype=np.float64) for m in ms]
    weighted = [m * w for m, w in zip(ms, weights)]
    if sign_election:
        total = sum(ms)
        sigma = np.sign(total)
        fallback = np.sign(sigma.sum()) or 1.0
        sigma = np.where(total == 0, fallback, sigma)
        weighted = [np.where(np.sign(m) == sigma, wm, 0.0) for m, wm in zip(ms, weighted)]
    total = sum(weighted)
    if disjoint_mean:
        count = sum((wm != 0).astype(np.float64) for wm in weighted)
        return total / np.maximum(count, 1.0)
    return total / len(ms)


def drm_delta(deltas, weights, direction="vertical", drop_rate=0.8, rank_threshold=0.01,
              sign_election=True, disjoint_mean=True, renormalize=True, flip_signs=None):
    """Merged delta of 2-D float64 deltas. ``flip_signs``: optional +-1 vector applied to
    singular-vector pairs, to check that the result does not depend on SVD signs."""
    deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
    t = len(deltas)
    n, m = deltas[0].shape
    if direction == "vertical":
        stack = np.vstack(deltas)
    else:
        stack = np.hstack(deltas)
    if not np.any(stack):
        return np.zeros((n, m))
    u, s, vt = np.linalg.svd(stack, full_matrices=False)
    keep = s > rank_threshold * s[0]
    u, s, vt = u[:, keep], s[keep], vt[keep]
    if flip_signs is not None:
        f = np.asarray(flip_signs[: s.size], dtype=np.float64)
        u, vt = u * f, vt * f[:, None]
    if direction == "vertical":
        blocks = [u[i * n:(i + 1) * n] for i in range(t)]  # n x r each
        norms = [np.linalg.norm(b, axis=0) for b in blocks]
        if renormalize:
            vecs = [np.divide(b, c, out=np.zeros_like(b), where=c > 0) for b, c in zip(blocks, norms)]
            spectra = [s * c for c in norms]
        else:
            vecs, spectra = blocks, [s] * t
        vecs = _prune(vecs, drop_rate)
        ms = [v * sp[None, :] for v, sp in zip(vecs, spectra)]
        merged = _elect_and_mean(ms, weights, sign_election, disjoint_mean)
        return merged @ vt
    blocks = [vt[:, i * m:(i + 1) * m] for i in range(t)]  # r x m each
    norms = [np.linalg.norm(b, axis=1) for b in blocks]
    if renormalize:
        vecs = [np.divide(b, c[:, None], out=np.zeros_like(b), where=c[:, None] > 0) for b, c in zip(blocks, norms)]
        spectra = [s * c for c in norms]
    else:
        vecs, spectra = blocks, [s] * t
    vecs = _prune(vecs, drop_rate)
    ms = [sp[:, None] * v for v, sp in zip(vecs, spectra)]
    merged = _elect_and_mean(ms, weights, sign_election, disjoint_mean)
    return u @ merged


def drm_vector_delta(deltas, weights, nonlinear_drop_rate=0.0, sign_election=True, disjoint_mean=True):
    deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
    if nonlinear_drop_rate > 0:
        deltas = [top_k(d, 1 - nonlinear_drop_rate) for d in deltas]
    return _elect_and_mean(deltas, weights, sign_election, disjoint_mean)


def top_k(d, fraction):
    flat = d.ravel()
    k = max(1, int(fraction * flat.size))
    order = np.argsort(-np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(d.shape)


def ties_delta(deltas, weights, density=0.2, sign_election=True, disjoint_mean=True):
    """TIES as mergekit computes it: elect on the weighted deltas, +1 where their sum is
    exactly zero, keep the weighted entries of that sign, divide by the sum of the kept
    entries' weights (0 -> 1). ``disjoint_mean=False``: drmerge's sum over T instead;
    ``sign_election=False``: every nonzero weighted entry is kept."""
    weighted = [w * top_k(np.asarray(d, dtype=np.float64), density) for d, w in zip(deltas, weights)]
    if sign_election:
        majority = np.where(sum(weighted) >= 0, 1.0, -1.0)
        keep = [np.sign(e) == majority for e in weighted]
    else:
        keep = [e != 0 for e in weighted]
    total = sum(np.where(k, e, 0.0) for k, e in zip(keep, weighted))
    if not disjoint_mean:
        return total / len(deltas)
    divisor = sum(w * k.astype(np.float64) for w, k in zip(weights, keep))
    return total / np.where(divisor == 0, 1.0, divisor)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))

"""Plain numpy references for the observer tests. Nothing here calls qat: each function
restates, from its definition, what an observer should compute."""

import numpy as np
import torch

F32 = np.float32


def channel_rows(x: torch.Tensor, axis) -> np.ndarray:
    """``x`` as float32 rows: one row in all (``axis`` None) or one per channel of ``axis``."""
    a = x.detach().cpu().to(torch.float32).numpy()
    if axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def stack_rows(xs, axis) -> np.ndarray:
    """The rows of several batches joined: the data an observer saw, channel by channel."""
    return np.concatenate([channel_rows(x, axis) for x in xs], axis=1)


def finite_minmax(rows: np.ndarray):
    """(min, max) of the finite values of each row, float32; +inf / -inf for a row without any."""
    lo = np.full(rows.shape[0], np.inf, dtype=F32)
    hi = np.full(rows.shape[0], -np.inf, dtype=F32)
    for i, row in enumerate(rows):
        finite = row[np.isfinite(row)]
        if finite.size:
            lo[i], hi[i] = finite.min(), finite.max()
    return lo, hi


def reference_qparams(lo, hi, quant_min, quant_max, symmetric):
    """PyTorch's observer qparam math, in float32: the range widened to include 0, the
    scale never below float32 eps; (scale 1, default zero point) where min > max."""
    eps = np.finfo(F32).eps
    lo = np.asarray(lo, dtype=F32).reshape(-1)
    hi = np.asarray(hi, dtype=F32).reshape(-1)
    scale = np.empty(lo.shape, dtype=F32)
    zero_point = np.empty(lo.shape, dtype=np.int32)
    if symmetric:
        default = 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
    else:
        default = min(max(0, quant_min), quant_max)
    for i, (l, h) in enumerate(zip(lo, hi)):
        if not l <= h:
            scale[i], zero_point[i] = 1.0, default
            continue
        min_neg, max_pos = F32(min(l, F32(0))), F32(max(h, F32(0)))
        if symmetric:
            s = F32(max(-min_neg, max_pos)) / F32((quant_max - quant_min) / 2)
            scale[i], zero_point[i] = max(s, eps), default
        else:
            s = max((max_pos - min_neg) / F32(quant_max - quant_min), eps)
            z = F32(quant_min) - np.round(min_neg / F32(s))
            scale[i], zero_point[i] = s, int(min(max(z, quant_min), quant_max))
    return scale, zero_point


def reference_fake_quantize(rows, scale, zero_point, quant_min, quant_max):
    """(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale per row, in float64."""
    x = np.asarray(rows, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    z = np.asarray(zero_point, dtype=np.float64).reshape(-1, 1)
    q = np.clip(np.round(x / s) + z, quant_min, quant_max)
    return (q - z) * s


def reference_rebin(counts, old_lo, old_hi, new_lo, new_hi):
    """Counts over [old_lo, old_hi] spread onto as many bins over [new_lo, new_hi], each old
    bin in proportion to its overlap with each new one (uniform mass within a bin): the
    cumulative count, linear within old bins, read at the new edges."""
    bins = len(counts)
    old_edges = np.linspace(old_lo, old_hi, bins + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=np.float64))])
    new_edges = np.linspace(new_lo, new_hi, bins + 1)
    return np.diff(np.interp(new_edges, old_edges, cumulative))


def entropy_divergences(magnitudes, bins, levels):
    """TensorRT's entropy calibration on a histogram of |x| over [0, max |x|]: for each
    candidate number i of leading bins (``levels`` .. ``bins``), P is those bins with all
    the mass beyond them added to the last one; Q is the same i bins (without that mass)
    merged into ``levels`` groups, each group's mass spread evenly over its non-empty bins.
    Returns (bin width, {i: KL(P || Q)}) over the candidates where Q covers P."""
    counts, edges = np.histogram(magnitudes, bins=bins, range=(0.0, float(magnitudes.max())))
    counts = counts.astype(np.float64)
    divergences = {}
    for i in range(levels, bins + 1):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        group = np.arange(i) * levels // i  # `levels` runs of consecutive bins
        nonzero = counts[:i] > 0
        mass = np.bincount(group, weights=counts[:i], minlength=levels)
        size = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, mass[group] / np.maximum(size[group], 1), 0.0)
        if q.sum() == 0 or np.any((p > 0) & (q == 0)):
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        divergences[i] = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
    return edges[1] - edges[0], divergences

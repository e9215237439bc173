"""Statistics for comparing runs: means, t-intervals over seeds, paired differences, test-set noise.

Plain Python (``math`` only), so the sweep needs no SciPy. Two sources of noise decide whether a difference in
top-1 is real: the training seed and the finite test set. With several seeds per variant the sweep reports
the mean and a Student-t interval (n - 1 degrees of freedom); a variant is compared with the baseline
*paired*, seed by seed (the same seed gives the same data order and head init to both), and the interval of
the per-seed differences says whether the difference excludes zero. For one run, :func:`binomial_se` is the
standard error that the test set's size alone puts on an accuracy.
"""
import math
from typing import Dict, Optional, Sequence

__all__ = ['mean_sd', 't_quantile', 't_interval', 'paired_difference', 'binomial_se']


def mean_sd(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (n - 1 in the denominator; ``None`` for fewer than two values)."""
    n = len(values)
    if n == 0:
        raise ValueError('mean_sd needs at least one value')
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    # continued fraction of the regularised incomplete beta function (modified Lentz's method)
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 4)`` = 2.776)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f't_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}')
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):  # bisection to machine precision
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Dict[str, Optional[float]]:
    """``{n, mean, sd, low, high}``: the mean with a two-sided Student-t interval (``None`` bounds for n < 2)."""
    mean, sd = mean_sd(values)
    n = len(values)
    if sd is None:
        return dict(n=n, mean=mean, sd=None, low=None, high=None)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return dict(n=n, mean=mean, sd=sd, low=mean - half, high=mean + half)


def paired_difference(values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Dict[str, object]:
    """The per-pair differences ``values[i] - baseline[i]`` as :func:`t_interval`, plus ``excludes_zero``
    (``True``/``False``; ``None`` when there are fewer than two pairs, so no interval)."""
    if len(values) != len(baseline):
        raise ValueError(f'paired_difference needs pairs: {len(values)} values vs {len(baseline)} baselines')
    out = t_interval([v - b for v, b in zip(values, baseline)], confidence)
    out['excludes_zero'] = None if out['low'] is None else (out['low'] > 0 or out['high'] < 0)
    return out


def binomial_se(accuracy_percent: float, n: int) -> float:
    """Standard error (in points) of an accuracy measured on ``n`` independent test images."""
    p = accuracy_percent / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n)

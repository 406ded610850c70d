"""significance.py: whether a difference is real. The intervals and tests every report here uses,
each small enough to check by hand (tests/test_evaluate.py, tests/test_study.py):
  * Student's t: its CDF and quantiles (numpy has neither);
  * a number measured once per seed: its mean and 95% t-interval (`seed_interval`), the paired
    t-test (`paired_t`) and Holm's step-down adjustment across several tests (`holm`);
  * a difference measured on every (seed, prompt): its mean and 95% interval from a hierarchical
    bootstrap, seeds then prompts (`hierarchical_bootstrap`);
  * the verdict an interval gives, with the smallest difference the design detects at 80% power.
"""
import functools
import math

import numpy as np


def t_cdf(t, df, n=2000):
    """P(T <= t) for Student's t with df degrees of freedom: Simpson's rule on the density from
    0 to |t| (n intervals), then the symmetry of the density."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda u: math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df))
    a = abs(t)
    h = a / n
    s = density(0) + density(a) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    half = s * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


@functools.lru_cache(maxsize=None)  # pure, and asked for the same (q, df) by every comparison
def t_quantile(q, df):
    """The q-quantile (q > 0.5) of Student's t with df degrees of freedom (df = inf: the
    normal), by bisection on t_cdf."""
    if math.isinf(df):
        return t_quantile(q, 1e7)
    lo, hi = 0.0, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------------
# One number per seed
# ---------------------------------------------------------------------------------------------
def seed_interval(values):
    """Mean of one number per seed and its 95% t-interval (a number measured once per seed, such
    as an RM's gold agreement on a round's samples, has no prompt level to resample)."""
    x = np.asarray(values, dtype=float)
    m, S = float(x.mean()), len(x)
    if S < 2:
        return {"mean": m, "lo": m, "hi": m, "se": 0.0}
    se = float(x.std(ddof=1)) / math.sqrt(S)
    t = t_quantile(0.975, S - 1)
    return {"mean": m, "lo": m - t * se, "hi": m + t * se, "se": se}


def paired_t(diffs):
    """Mean of the per-seed differences, its 95% t-interval and the two-sided p of t = mean / se."""
    ci = seed_interval(diffs)
    n = len(diffs)
    if ci["se"] == 0:
        p = 1.0 if ci["mean"] == 0 else 0.0
    else:
        p = 2 * (1 - t_cdf(abs(ci["mean"]) / ci["se"], n - 1, n=4000))
    return {**ci, "p": max(0.0, min(1.0, p)), "n": n}


def holm(p_values):
    """Holm's step-down adjusted p-values, in the order given."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------------------------------------
# One difference per (seed, prompt)
# ---------------------------------------------------------------------------------------------
def hierarchical_bootstrap(x, n_boot=2000, seed=0):
    """Mean of x [seeds, prompts] (paired differences, one per seed and prompt) and its 95%
    interval. The standard error comes from a hierarchical bootstrap: resample seeds with
    replacement, then prompts with replacement within each drawn seed, and take the grand mean.
    A percentile interval from a handful of seeds covers far less than 95% (resampling S seeds
    underestimates the seed-to-seed variance by (S-1)/S, and the normal quantile is too small),
    so the interval is mean +- t_{S-1} * se with that variance corrected; with one seed it is
    over prompts only (normal quantile). tests/test_evaluate.py measures the coverage."""
    x = np.asarray(x, dtype=float)
    S, P = x.shape
    rng = np.random.default_rng(seed)
    s = rng.integers(0, S, (n_boot, S))
    p = rng.integers(0, P, (n_boot, S, P))
    means = x[s[:, :, None], p].mean(axis=(1, 2))
    se = float(means.std()) * (math.sqrt(S / (S - 1)) if S > 1 else 1.0)
    t = t_quantile(0.975, S - 1 if S > 1 else math.inf)
    m = float(x.mean())
    return {"mean": m, "lo": m - t * se, "hi": m + t * se, "se": se}


POWER_Z = 0.8416  # the 80% quantile of the normal: detectable effects are quoted at 80% power


def detectable(se, n_seeds):
    """The smallest difference a design with this standard error and n_seeds seeds detects with
    80% power (two-sided, 0.05): (t_{0.975, S-1} + z_0.8) * se."""
    return (t_quantile(0.975, n_seeds - 1) + POWER_Z) * se


def verdict(interval, n_seeds, what="gold", words=("better", "worse"), digits=2):
    """better / worse / no detectable difference, from a 95% interval of a paired difference,
    with the smallest difference this design detects with 80% power, (t_{S-1} + z_0.8) * se."""
    if n_seeds < 2:
        return "one seed: no verdict across seeds is possible"
    if interval["lo"] > 0:
        return words[0]
    if interval["hi"] < 0:
        return words[1]
    smallest = detectable(interval["se"], n_seeds)
    return f"no detectable difference (this run detects |{what} difference| >= {smallest:.{digits}f} at 80% power)"

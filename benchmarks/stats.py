"""Means with 95% confidence intervals over seeds, and paired differences over the same seeds.

A seed fixes a run's initialisation and data order, so two methods run with the same seeds are compared seed by
seed: the interval of the paired difference is the one of the per-seed differences (Student's t).
"""

import math
import statistics

# t quantile 0.975 for 1-30 degrees of freedom (beyond: the normal's 1.96 is within 2%)
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(degrees_of_freedom: int) -> float:
    """The two-sided 95% quantile of Student's t.

    >>> t_975(4)
    2.776
    """
    return _T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T_975) else 1.96


def mean_ci(values: list[float]) -> list[float]:
    """``[mean, half-width]`` of the 95% interval over ``values`` (half-width NaN for a single value).

    >>> [round(x, 4) for x in mean_ci([0.5, 0.6, 0.7])]
    [0.6, 0.2484]
    """
    if not values:
        return [float("nan"), float("nan")]
    if len(values) < 2:
        return [float(values[0]), float("nan")]
    return [statistics.fmean(values), t_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))]


def paired_difference(values: dict, baseline: dict) -> list[float]:
    """``[mean, half-width]`` of ``values[seed] - baseline[seed]`` over the seeds both have; NaNs when none.

    >>> [round(x, 4) for x in paired_difference({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.65, 2: 0.7, 3: 0.9})]
    [0.0833, 0.0717]
    """
    return mean_ci([values[seed] - baseline[seed] for seed in sorted(values) if seed in baseline])

"""The one percentile definition of every benchmark and report (``benchmarks/``, ``export``).

``percentile(values, q)``, ``q`` in [0, 100]: sort the ``n`` values, take the fractional rank
``r = (n - 1) * q / 100`` and interpolate linearly between the values at ranks ``floor(r)`` and
``floor(r) + 1``. This is numpy's default (``method="linear"``, Hyndman and Fan's type 7): ``p0``
is the minimum, ``p100`` the maximum, ``p50`` the median (for an even count the mean of the two
middle values, as :func:`statistics.median`). A ``p90`` of 10 values therefore lies between
the 9th and 10th smallest, not on the slowest one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentile", "median"]


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``, linearly interpolated (module
    docstring). Raises ``ValueError`` for no values, a non-finite value or ``q`` outside [0, 100]."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q is a percent in [0, 100], got {q!r}")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("percentile of values holding NaN or infinities")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    """``percentile(values, 50)``."""
    return percentile(values, 50)

"""One percentile definition (sf_sdk.stats): numpy's default linear interpolation, used by every
benchmark and by the export benchmark (no second definition anywhere)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from sf_sdk.stats import median, percentile

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 37])
def test_percentile_is_numpys_linear_default(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.exponential(size=n).tolist()
    for q in (0, 1, 25, 50, 90, 95, 99, 100, 33.3):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)
    assert percentile(values, 0) == min(values) and percentile(values, 100) == max(values)
    assert median(values) == pytest.approx(statistics.median(values), rel=1e-12)


def test_worked_example() -> None:
    xs = [float(i) for i in range(1, 11)]  # 1..10
    assert percentile(xs, 90) == pytest.approx(9.1)  # between the 9th and 10th, not the slowest
    assert percentile(xs, 50) == 5.5
    assert percentile(reversed(xs), 10) == pytest.approx(1.9)  # order of the input does not matter


def test_bad_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"q is a percent in \[0, 100\], got 0.9|got 101"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="NaN"):
        percentile([1.0, float("nan")], 50)


def test_no_other_percentile_definition() -> None:
    # a function of its own, or statistics.quantiles (whose default method, "exclusive", differs)
    pattern = re.compile(r"^\s*def \w*(percentile|quantile)\w*\(|statistics\.quantiles\(", re.M)
    own = []
    for folder in ("benchmarks", "export", "sf_sdk"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != ROOT / "sf_sdk" / "stats.py" and pattern.search(path.read_text()):
                own.append(str(path.relative_to(ROOT)))
    assert not own, f"these define their own percentile; use sf_sdk.stats.percentile: {own}"

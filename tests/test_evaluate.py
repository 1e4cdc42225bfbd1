"""The evaluate stage's intervals: a percentile bootstrap over test cells (or whole groups), checked against
sklearn draw by draw."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from helical_workflow.evaluate import bootstrap_intervals


def _labels(n: int, k: int, right: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    wrong = rng.random(n) > right
    return y, np.where(wrong, (y + 1 + rng.integers(0, k - 1, n)) % k, y)


def test_one_draw_is_sklearn_on_the_resampled_cells():
    y, p = _labels(120, 4, 0.7)
    got = bootstrap_intervals(y, p, 4, resamples=1, seed=3)
    idx = np.random.default_rng(3).integers(0, len(y), size=(1, len(y)))[0]
    macro = f1_score(y[idx], p[idx], average="macro", zero_division=0)
    assert got["accuracy_ci"] == [accuracy_score(y[idx], p[idx])] * 2
    assert np.allclose(got["macro_f1_ci"], [macro, macro])
    per_class = f1_score(y[idx], p[idx], labels=range(4), average=None, zero_division=0)
    assert np.allclose([c[0] for c in got["f1_ci"]], per_class)


def test_intervals_hold_the_estimate_narrow_with_more_cells_and_repeat_with_the_seed():
    small, big = _labels(100, 5, 0.6), _labels(1600, 5, 0.6)
    a = bootstrap_intervals(*small, 5, seed=0)
    b = bootstrap_intervals(*big, 5, seed=0)
    for (y, p), ci in ((small, a), (big, b)):
        assert ci["accuracy_ci"][0] < accuracy_score(y, p) < ci["accuracy_ci"][1]
        assert ci["macro_f1_ci"][0] < f1_score(y, p, average="macro") < ci["macro_f1_ci"][1]
    width = lambda ci: ci["macro_f1_ci"][1] - ci["macro_f1_ci"][0]
    assert width(b) < width(a) / 2  # about 1/sqrt(16) as wide
    assert bootstrap_intervals(*small, 5, seed=0) == a and bootstrap_intervals(*small, 5, seed=1) != a
    perfect = bootstrap_intervals(small[0], small[0], 5)
    assert perfect["accuracy_ci"] == [1.0, 1.0] and perfect["macro_f1_ci"] == [1.0, 1.0]


def test_grouped_resampling_is_wider_when_groups_differ():
    """Cells of one donor share its difficulty: resampling cells hides that; resampling donors shows it."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(8), 50)
    right = np.repeat(rng.uniform(0.3, 0.95, 8), 50)  # each donor's own accuracy
    y = rng.integers(0, 3, 400)
    p = np.where(rng.random(400) < right, y, (y + 1) % 3)
    cells = bootstrap_intervals(y, p, 3, seed=0)
    donors = bootstrap_intervals(y, p, 3, seed=0, groups=groups)
    assert donors["accuracy_ci"][1] - donors["accuracy_ci"][0] > 1.5 * (
        cells["accuracy_ci"][1] - cells["accuracy_ci"][0]
    )

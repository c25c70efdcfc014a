"""Prediction-quality metrics: known answers against scikit-learn and by hand, and the properties AUC must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import log_loss as sk_log_loss

from evaluator.stats.classification import (
    METRICS,
    accuracy,
    auc,
    brier,
    ece,
    log_loss,
    precision,
    recall,
)


def calibrated(seed: int, n: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels drawn so that P(label = 1 | score) = score**1.3 (mildly miscalibrated)."""
    rng = np.random.default_rng(seed)
    s = rng.beta(2, 5, n)
    if decimals is not None:
        s = np.round(s, decimals)  # ties, and scores exactly on bin edges
    y = (rng.random(n) < s**1.3).astype(np.int64)
    return s, y


# -- known answers against scikit-learn -------------------------------------------------------------------------

@pytest.mark.parametrize(("seed", "decimals"), [(1, None), (2, 2), (3, 1), (4, 1)])
def test_auc_equals_roc_auc_score_with_ties(seed: int, decimals: int | None) -> None:
    """Average ranks for ties give roc_auc_score's trapezoids (rounded scores: ten or a hundred tie groups)."""
    s, y = calibrated(seed, 20_000, decimals)
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert 0.5 < auc(s, y) < 1.0


def test_auc_on_integer_scores_and_bool_labels() -> None:
    """Integer scores with heavy ties and boolean labels."""
    rng = np.random.default_rng(5)
    s = rng.integers(0, 5, 3_000)
    y = rng.random(3_000) < (s + 1) / 7
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-9)


@pytest.mark.parametrize("seed", [6, 7])
def test_brier_and_log_loss_equal_sklearn(seed: int) -> None:
    """Brier score and log loss, including scores of exactly 0 and 1 (clipped at the float64 epsilon)."""
    s, y = calibrated(seed, 10_000, decimals=3)
    s[:3], y[:3] = [0.0, 1.0, 0.0], [1, 0, 0]  # two confident misses and a confident hit
    assert brier(s, y) == pytest.approx(brier_score_loss(y, s), rel=1e-9)
    assert log_loss(s, y) == pytest.approx(sk_log_loss(y, s), rel=1e-9)
    assert log_loss(s[3:], y[3:]) == pytest.approx(sk_log_loss(y[3:], s[3:]), rel=1e-9)


def test_log_loss_clips_at_eps() -> None:
    """With eps 1e-15 a confident miss costs -ln(1e-15) = 34.54 nats: [miss, hit at 0.8] averages to 17.381."""
    value = log_loss([0.0, 0.8], [1, 1], eps=1e-15)
    assert value == pytest.approx((-math.log(1e-15) - math.log(0.8)) / 2, rel=1e-12)
    assert value == pytest.approx(17.380960, rel=1e-6)


@pytest.mark.parametrize("threshold", [0.2, 0.35, 0.5])
def test_threshold_metrics_equal_sklearn(threshold: float) -> None:
    """accuracy, precision and recall with score >= threshold predicting positive (scores sit on the threshold)."""
    s, y = calibrated(8, 10_000, decimals=2)
    pred = (s >= threshold).astype(np.int64)
    assert np.count_nonzero(s == threshold) > 0
    assert accuracy(s, y, threshold) == pytest.approx(accuracy_score(y, pred), rel=1e-9)
    assert precision(s, y, threshold) == pytest.approx(precision_score(y, pred, zero_division=0), rel=1e-9)
    assert recall(s, y, threshold) == pytest.approx(recall_score(y, pred), rel=1e-9)


def test_precision_without_positive_predictions_is_zero_and_recall_without_positives_refuses() -> None:
    """No positive prediction: precision 0.0 (sklearn zero_division=0). No positive label: recall has no answer."""
    assert precision([0.1, 0.2, 0.3], [1, 0, 1], threshold=0.5) == 0.0
    assert precision_score([1, 0, 1], [0, 0, 0], zero_division=0) == 0.0
    with pytest.raises(ValueError, match="positive label"):
        recall([0.1, 0.9], [0, 0])


# -- calibration ------------------------------------------------------------------------------------------------

def test_ece_by_hand() -> None:
    """Two bins, [0, 0.5] and (0.5, 1]; 0.5 sits on the edge and belongs to the first.

    bin [0, 0.5]:  scores 0.1, 0.2, 0.5 (mean 0.8/3), labels 0, 1, 1 (rate 2/3): gap 0.4
    bin (0.5, 1]:  scores 0.6, 0.9, 1.0 (mean 2.5/3), labels 1, 1, 0 (rate 2/3): gap 0.5/3
    ECE = 3/6 * 0.4 + 3/6 * 0.5/3 = 17/60
    """
    result = ece([0.1, 0.2, 0.5, 0.6, 0.9, 1.0], [0, 1, 1, 1, 1, 0], bins=2)
    assert result.value == pytest.approx(17 / 60, rel=1e-12)
    low, high = result.bins
    assert (low.lower, low.upper, low.count) == (0.0, 0.5, 3)
    assert low.mean_score == pytest.approx(0.8 / 3) and low.positive_rate == pytest.approx(2 / 3)
    assert (high.lower, high.upper, high.count) == (0.5, 1.0, 3)
    assert high.mean_score == pytest.approx(2.5 / 3) and high.positive_rate == pytest.approx(2 / 3)


def test_ece_edges_are_closed_on_the_right_and_empty_bins_are_reported() -> None:
    """Ten bins: 0 and 0.1 fall in [0, 0.1], 0.95 and 1 in (0.9, 1], the bins between are empty."""
    result = ece([0.0, 0.1, 0.95, 1.0], [0, 0, 1, 1], bins=10)
    assert [b.count for b in result.bins] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert result.bins[1].mean_score is None and result.bins[1].positive_rate is None
    assert result.value == pytest.approx(0.5 * 0.05 + 0.5 * 0.025, rel=1e-12)


@pytest.mark.parametrize(("seed", "bins"), [(9, 10), (10, 7), (11, 20)])
def test_reliability_bins_equal_sklearn_calibration_curve(seed: int, bins: int) -> None:
    """Non-empty bins' mean score and positive rate equal calibration_curve(strategy='uniform')."""
    s, y = calibrated(seed, 8_000, decimals=2)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=bins, strategy="uniform")
    result = ece(s, y, bins=bins)
    filled = [b for b in result.bins if b.count]
    np.testing.assert_allclose([b.positive_rate for b in filled], prob_true, rtol=1e-9)
    np.testing.assert_allclose([b.mean_score for b in filled], prob_pred, rtol=1e-9)
    counts = np.array([b.count for b in filled])
    by_hand = float(np.sum(counts / s.size * np.abs(prob_pred - prob_true)))
    assert result.value == pytest.approx(by_hand, rel=1e-9)
    assert sum(b.count for b in result.bins) == s.size


# -- refusals and the registry ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("call", "message"), [
    (lambda: auc([0.1, 0.2], [1, 1]), "both classes"),
    (lambda: auc([], []), "empty"),
    (lambda: auc([0.1, 0.2], [1]), "differ in length"),
    (lambda: auc([0.1, np.nan], [0, 1]), "NaN"),
    (lambda: brier([0.1, 1.2], [0, 1]), r"\[0, 1\]"),
    (lambda: log_loss([0.5], [2]), "0 or 1"),
    (lambda: ece([0.5], [1], bins=0), "bins"),
])
def test_unanswerable_input_is_a_value_error(call: object, message: str) -> None:
    """One class, empty input, mismatched lengths, NaN, scores outside [0, 1], labels other than 0/1."""
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


def test_metrics_are_registered_by_name() -> None:
    """A prediction_quality rule names a metric; each says which way is better and whether it takes a threshold."""
    assert sorted(METRICS) == ["accuracy", "auc", "brier", "ece", "log_loss", "precision", "recall"]
    s, y = calibrated(12, 2_000)
    assert METRICS["auc"].func(s, y) == auc(s, y) and METRICS["auc"].higher_is_better
    assert METRICS["ece"].func(s, y, bins=5) == ece(s, y, bins=5).value and not METRICS["ece"].higher_is_better
    assert METRICS["recall"].uses_threshold and METRICS["recall"].func(s, y, threshold=0.3) == recall(s, y, 0.3)
    assert METRICS["brier"].probabilities and not METRICS["auc"].probabilities


# -- properties -------------------------------------------------------------------------------------------------

labelled = st.integers(2, 80).flatmap(lambda n: st.tuples(
    hnp.arrays(np.int64, n, elements=st.integers(-20, 20)),
    hnp.arrays(np.int64, n, elements=st.integers(0, 1)),
)).filter(lambda t: 0 < t[1].sum() < t[1].size)


@settings(max_examples=100, deadline=None)
@given(labelled)
def test_auc_is_invariant_under_monotone_transforms(data: tuple[np.ndarray, np.ndarray]) -> None:
    """Only the order of scores matters: 2x + 1, exp(x / 10) and x**3 give the same AUC, equal to sklearn's."""
    s, y = data
    x = s.astype(np.float64)
    value = auc(x, y)
    assert value == pytest.approx(roc_auc_score(y, x), abs=1e-12)
    for transformed in (2 * x + 1, np.exp(x / 10), x**3):
        assert auc(transformed, y) == value


@settings(max_examples=100, deadline=None)
@given(labelled)
def test_auc_of_a_perfect_ranking_is_1_and_of_its_reverse_0(data: tuple[np.ndarray, np.ndarray]) -> None:
    """Every positive above every negative: 1; the order reversed: 0; label flip gives 1 - AUC."""
    s, y = data
    perfect = y + (s + 20) / 100  # positives in [1, 1.4], negatives in [0, 0.4], any ties inside a class
    assert auc(perfect, y) == 1.0
    assert auc(-perfect, y) == 0.0
    assert auc(s, 1 - y) == pytest.approx(1 - auc(s, y), abs=1e-12)

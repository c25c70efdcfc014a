"""Prediction quality of a binary classifier (rung 4): scores in, labels joined on the prediction id, one number.

Pure functions over numpy arrays, each equal to its scikit-learn counterpart (tested), registered in METRICS
so a `prediction_quality` rule names one. Inputs: `scores` are floats (probabilities of the positive class for
brier, log_loss and ece, which check they lie in [0, 1]; any real ranking score for auc and the threshold
metrics), `labels` are 0/1 (ints, bools or 0.0/1.0). Empty input, NaN, mismatched lengths and labels other than
0/1 are a ValueError, never a silent nan. A minimum label count is the rule's business, not these functions'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# scikit-learn >= 1.5 clips probabilities at the float64 machine epsilon (2.2e-16) before taking logs; older
# releases used 1e-15. Same as the installed sklearn, so a known-answer test can hold on scores of exactly 0 or 1.
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)


def _inputs(scores: npt.ArrayLike, labels: npt.ArrayLike, *,
            probabilities: bool) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError("scores and labels must be one-dimensional")
    if s.size != y.size:
        raise ValueError(f"scores and labels differ in length ({s.size} and {y.size})")
    if s.size == 0:
        raise ValueError("no predictions (scores and labels are empty)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if probabilities and ((s < 0) | (s > 1)).any():
        raise ValueError("scores must be probabilities in [0, 1]")
    yf = y.astype(np.float64)
    if not ((yf == 0) | (yf == 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, yf == 1


def auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic: the probability that a random positive scores
    above a random negative, ties counting half. Only the order of the scores matters, so any monotone transform
    gives the same value. Equal to sklearn.metrics.roc_auc_score.

    U is the rank-sum statistic with average ranks for ties (U = R_pos - n_pos (n_pos + 1) / 2), counted
    directly: each class sorted, each positive located among the negatives, 2U = sum over positives of
    (negatives strictly below + negatives at or below). Integer counts, so the only rounding is the final
    division; half the time of ranking all scores (1M scores: 0.07 s). A single class: ValueError.
    """
    s, y = _inputs(scores, labels, probabilities=False)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"auc needs both classes, got {pos.size} positive and {neg.size} negative labels")
    twice_u = int(np.searchsorted(neg, pos, side="left").sum()) + int(np.searchsorted(neg, pos, side="right").sum())
    return twice_u / (2 * pos.size * neg.size)


def brier(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean squared difference between probability and outcome (0 is perfect, 0.25 is a coin at 0.5).
    Equal to sklearn.metrics.brier_score_loss."""
    s, y = _inputs(scores, labels, probabilities=True)
    return float(np.mean((s - y) ** 2))


def log_loss(scores: npt.ArrayLike, labels: npt.ArrayLike, *, eps: float = LOG_LOSS_EPS) -> float:
    """Mean negative log-likelihood, natural log, with probabilities clipped to [eps, 1 - eps] so one confident
    miss costs -ln(eps) (36 nats at the default) instead of infinity. Equal to sklearn.metrics.log_loss."""
    if not (0.0 < eps < 0.5):
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    s, y = _inputs(scores, labels, probabilities=True)
    p = np.clip(s, eps, 1 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram; `mean_score` and `positive_rate` are None when the bin is empty."""

    lower: float
    upper: float
    count: int
    mean_score: float | None
    positive_rate: float | None


@dataclass(frozen=True)
class Calibration:
    value: float  # expected calibration error, in probability units
    bins: tuple[ReliabilityBin, ...]


def ece(scores: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 10) -> Calibration:
    """Expected calibration error over `bins` equal-width bins of [0, 1], and the reliability bins behind it:

        ECE = sum over non-empty bins b of (n_b / n) * |mean score in b - positive rate in b|

    Bin edges are numpy.linspace(0, 1, bins + 1); bins are closed on the right and the first also holds 0:
    [0, e1], (e1, e2], ..., (e_{bins-1}, 1]. A score equal to an edge counts in the bin that edge closes, the
    same assignment as sklearn.calibration.calibration_curve(strategy="uniform") and as the drift bins.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    s, y = _inputs(scores, labels, probabilities=True)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.searchsorted(edges[1:-1], s, side="left")
    counts = np.bincount(idx, minlength=bins)
    score_sums = np.bincount(idx, weights=s, minlength=bins)
    positives = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    out = []
    value = 0.0
    for b in range(bins):
        n_b = int(counts[b])
        if n_b == 0:
            out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), 0, None, None))
            continue
        mean_score, rate = float(score_sums[b] / n_b), float(positives[b] / n_b)
        value += n_b / s.size * abs(mean_score - rate)
        out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), n_b, mean_score, rate))
    return Calibration(value, tuple(out))


def _confusion(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> tuple[int, int, int, int]:
    """(true positives, false positives, false negatives, true negatives) with score >= threshold positive."""
    s, y = _inputs(scores, labels, probabilities=False)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    return tp, fp, fn, s.size - tp - fp - fn


def accuracy(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float = 0.5) -> float:
    """Share of predictions on the right side of `threshold` (score >= threshold predicts positive)."""
    tp, fp, fn, tn = _confusion(scores, labels, threshold)
    return (tp + tn) / (tp + fp + fn + tn)


def precision(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float = 0.5) -> float:
    """Share of positive predictions (score >= threshold) that are positive.

    No positive prediction at all gives 0.0 (sklearn's zero_division=0): a fraud model that stopped flagging
    anything should fail a precision floor, not drop out of the rule as "no data".
    """
    tp, fp, _, _ = _confusion(scores, labels, threshold)
    return tp / (tp + fp) if tp + fp else 0.0


def recall(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float = 0.5) -> float:
    """Share of positives predicted positive (score >= threshold).

    No positive label at all is a ValueError, like auc with one class: the window says nothing about recall, and
    the rule should report "no data" rather than a perfect or a zero score.
    """
    tp, _, fn, _ = _confusion(scores, labels, threshold)
    if tp + fn == 0:
        raise ValueError("recall needs at least one positive label")
    return tp / (tp + fn)


@dataclass(frozen=True)
class Metric:
    """A registered metric: `func(scores, labels, **params) -> float`."""

    name: str
    func: Callable[..., float]
    higher_is_better: bool  # for a rule's default comparison and for wording ("fell" or "rose")
    uses_threshold: bool  # takes `threshold=` (score >= threshold predicts positive)
    probabilities: bool  # scores must be probabilities in [0, 1]


def _ece_value(scores: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 10) -> float:
    return ece(scores, labels, bins).value


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("auc", auc, higher_is_better=True, uses_threshold=False, probabilities=False),
    Metric("brier", brier, higher_is_better=False, uses_threshold=False, probabilities=True),
    Metric("log_loss", log_loss, higher_is_better=False, uses_threshold=False, probabilities=True),
    Metric("ece", _ece_value, higher_is_better=False, uses_threshold=False, probabilities=True),
    Metric("accuracy", accuracy, higher_is_better=True, uses_threshold=True, probabilities=False),
    Metric("precision", precision, higher_is_better=True, uses_threshold=True, probabilities=False),
    Metric("recall", recall, higher_is_better=True, uses_threshold=True, probabilities=False),
)}

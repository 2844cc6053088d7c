"""CoOp's linear-probe search, transcribed for the side-by-side bench (``bench.bench_upstream``).

Source: KaiyangZhou/CoOp at ff61507c790454bce7c5052c3ac39e60772f1f89, ``lpclip/linear_probe.py``: for one few-shot
draw, scikit-learn's ``LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2", C=c)`` is fitted on the raw
train features for 7 coarse values of C (1e6 .. 1e-6 in steps of 100) and scored on the validation rows; then 8
binary-search steps in log10(C) between 0.1x and 10x the best coarse value, each fitting the two ends and keeping
the better one (the left on ties), with the test accuracy of the last step's kept model reported. Only the
sampling is left out: the bench passes the rows of this project's draw. Needs scikit-learn (a test dependency).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

SEARCH_LIST = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]  # upstream's "search initialization"
NUM_STEP = 8  # upstream's --num_step default


@dataclass(frozen=True)
class SearchResult:
    """The last step's test accuracy (percent), its C, and the number of fits the search made."""

    test_acc: float
    c: float
    fits: int


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning, and the deprecation of penalty= in newer releases
        return LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2", C=c).fit(x, y)


def search(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, test_x: np.ndarray,
           test_y: np.ndarray, num_step: int = NUM_STEP) -> SearchResult:
    """Upstream's search on one draw: raw features train_x [N,D], val_x [Nv,D], test_x [Nt,D] with their labels."""
    acc_list = []
    for c_weight in SEARCH_LIST:
        pred = _fit(train_x, train_y, c_weight).predict(val_x)
        acc_list.append(sum(pred == val_y) / len(val_y))
    c_peak = SEARCH_LIST[int(np.argmax(acc_list))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    test_acc, c_final = 0.0, c_peak
    for _ in range(num_step):
        clf_left = _fit(train_x, train_y, c_left)
        acc_left = sum(clf_left.predict(val_x) == val_y) / len(val_y)
        clf_right = _fit(train_x, train_y, c_right)
        acc_right = sum(clf_right.predict(val_x) == val_y) / len(val_y)
        if acc_left < acc_right:
            c_final, clf_final = c_right, clf_right
            c_left, c_right = 0.5 * (np.log10(c_right) + np.log10(c_left)), np.log10(c_right)
        else:
            c_final, clf_final = c_left, clf_left
            c_right, c_left = 0.5 * (np.log10(c_right) + np.log10(c_left)), np.log10(c_left)
        test_acc = 100 * sum(clf_final.predict(test_x) == test_y) / len(test_y)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return SearchResult(float(test_acc), float(c_final), len(SEARCH_LIST) + 2 * num_step)


def plain_fits(train_x: np.ndarray, train_y: np.ndarray, cs: list[float]) -> int:
    """scikit-learn fits of the given C values, one after another, as CoOp calls them -> the number of fits."""
    for c in cs:
        _fit(train_x, train_y, c)
    return len(cs)

"""How the estimators choose what they are not told: the number of experts (held-out loss, or BIC
for EM) and the strength of the prior on the weights (the one-standard-error rule on held-out rows).

Shape legend: N rows, C candidates, V held-out rows.

Plain functions of the candidates and of callables that fit and score one candidate, so that the
rules can be read and tested apart from the estimator that calls them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split
from torch import nn

MIN_ROWS_TO_CHOOSE = 20  # below this, a 10 % hold-out is too small to choose alpha by


def holdout_split(n_rows: int, fraction: float, seed: int, labels: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out row positions; stratified by ``labels`` when every label has at
    least 2 rows (and the split can honour it), else a plain shuffled split."""
    rows = np.arange(n_rows)
    stratify = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        stratify = labels if counts.min() >= 2 else None
    try:
        return train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few rows of some class for this fraction
        return train_test_split(rows, test_size=fraction, random_state=seed)


def one_standard_error_choice(losses_CV: np.ndarray, strengths: Sequence[float]
                              ) -> tuple[int, np.ndarray, np.ndarray]:
    """Of C candidates scored on the same V held-out rows, the strongest (largest ``strengths``)
    whose mean loss is within one standard error of the lowest, the SE being that of the paired
    row-by-row difference from the lowest. Returns its index, the mean losses (C,) and the SEs (C,).
    A candidate with a non-finite loss (a diverged fit) is never chosen, unless all are: then
    the first.

    Example:
        >>> losses = np.array([[1.0, 1.2, 0.9, 1.1], [0.9, 1.2, 0.8, 1.1]])
        >>> one_standard_error_choice(losses, [2.0, 0.5])[0]  # 0.05 lower, over one SE (0.029)
        1
    """
    losses_CV = np.nan_to_num(losses_CV, nan=np.inf, posinf=np.inf)
    mean_C = losses_CV.mean(1)
    best = int(np.argmin(mean_C))
    n_val = losses_CV.shape[1]
    with np.errstate(invalid="ignore"):  # inf - inf where a fit diverged
        diff_CV = losses_CV - losses_CV[best]
        se_C = diff_CV.std(1, ddof=1) / math.sqrt(n_val) if n_val > 1 else np.zeros(len(mean_C))
        within = [c for c in range(len(mean_C)) if mean_C[c] - mean_C[best] <= se_C[c]]
    chosen = max(within, key=lambda c: strengths[c]) if within else 0
    return chosen, mean_C, se_C


def bic(log_likelihood: float, n_parameters: int, n_rows: int) -> float:
    """The Bayesian information criterion, -2 log L + k log n (lower is better).

    Example:
        >>> round(bic(-10.0, 3, 100), 4)  # 20 + 3 log 100
        33.8155
    """
    return -2.0 * log_likelihood + n_parameters * math.log(n_rows)


def select_n_experts(candidates: Sequence[int], fit: Callable[[int], Any],
                     score: Callable[[Any], float], criterion: str
                     ) -> tuple[int, dict[str, list], Any]:
    """Fit every candidate size with ``fit(n_experts)`` and keep the one whose ``score(fit)`` is
    lowest. Returns the chosen size, the curve (``{"n_experts": ..., criterion: scores}``) and the
    chosen fit, which the caller can keep as its final model.

    Example:
        >>> pick, curve, _ = select_n_experts([1, 2, 3], lambda k: k, lambda k: (k - 2) ** 2, "bic")
        >>> pick, curve
        (2, {'n_experts': [1, 2, 3], 'bic': [1, 0, 1]})
    """
    fits = [fit(n) for n in candidates]
    scores = [score(f) for f in fits]
    best = int(np.argmin(scores))
    return candidates[best], {"n_experts": list(candidates), criterion: scores}, fits[best]


def search_n_experts(candidates: Sequence[int], fit: Callable[[int], Any],
                     held_out_losses: Callable[[Any], np.ndarray], patience: int = 2
                     ) -> tuple[int, dict[str, list], Any]:
    """The fewest experts whose held-out loss is within one standard error of the lowest.

    Candidates are fitted from the smallest (``fit(n)``, each scored by ``held_out_losses(fit)``,
    one loss per held-out row); the search stops once ``patience`` larger counts in a row have not
    lowered the best mean loss by more than one SE, so the largest, dearest fits are often skipped.
    The choice, by :func:`one_standard_error_choice` with fewer experts the stronger, does not
    reward experts that only fit noise, and does not count parameters: an MLP expert's many weights
    do not decide it (BIC would). Returns the chosen count, the curve (``{"n_experts", "val_loss",
    "val_loss_se", "not_fitted"}``) and the chosen candidate's fit.

    Example:
        >>> rows = np.linspace(0, 1, 40)
        >>> loss = {1: 1.0 + rows, 2: 0.5 + rows, 3: 0.5 + rows, 4: 0.5 + rows, 6: 0.5 + rows}
        >>> pick, curve, _ = search_n_experts([1, 2, 3, 4, 6], lambda n: n, lambda n: loss[n])
        >>> pick, curve["n_experts"], curve["not_fitted"]
        (2, [1, 2, 3, 4], [6])
    """
    fits: list[Any] = []
    losses: list[np.ndarray] = []
    best = stale = 0  # the lowest mean so far, and the sizes since one beat it by an SE
    for n in candidates:
        fits.append(fit(n))
        losses.append(np.nan_to_num(np.asarray(held_out_losses(fits[-1]), dtype=np.float64),
                                    nan=np.inf, posinf=np.inf))
        if len(losses) > 1:
            with np.errstate(invalid="ignore"):  # inf - inf where a fit diverged
                diff_V = losses[-1] - losses[best]
                se = diff_V.std(ddof=1) / math.sqrt(len(diff_V)) if len(diff_V) > 1 else 0.0
            gain = -float(diff_V.mean())
            stale = 0 if (math.isfinite(gain) and gain > se) or not math.isfinite(
                float(losses[best].mean())) else stale + 1
            if float(losses[-1].mean()) < float(losses[best].mean()):
                best = len(losses) - 1
        if stale >= patience:
            break
    tried = list(candidates[:len(fits)])
    chosen, mean_C, se_C = one_standard_error_choice(np.stack(losses), [-n for n in tried])
    curve = {"n_experts": tried, "val_loss": mean_C.tolist(), "val_loss_se": se_C.tolist(),
             "not_fitted": list(candidates[len(fits):])}
    return tried[chosen], curve, fits[chosen]


def select_precision(precisions: Sequence[float], fit: Callable[[float], nn.Module],
                     held_out_losses: Callable[[nn.Module], np.ndarray]
                     ) -> tuple[float, dict[str, list[float]]]:
    """Fit one mixture per prior precision (``fit(c)``, on the training rows) and score each on the
    held-out rows (``held_out_losses(model)``, one loss per row); choose by
    :func:`one_standard_error_choice`, so that a small hold-out's noise does not pick a weak prior
    that overfits. Returns the chosen precision and the curve."""
    losses_CV = np.stack([held_out_losses(fit(c)) for c in precisions])
    chosen, mean_C, se_C = one_standard_error_choice(losses_CV, precisions)
    return precisions[chosen], {"alpha_candidates": list(precisions), "val_loss": mean_C.tolist(),
                                "val_loss_se": se_C.tolist()}


def precision_candidates(owner: str, alpha_candidates: Any) -> list[float]:
    """``alpha_candidates`` as a list of positive finite floats, or a ValueError naming it."""
    try:
        candidates = [float(c) for c in alpha_candidates]
    except (TypeError, ValueError):
        candidates = []
    if not candidates or not all(math.isfinite(c) and c > 0 for c in candidates):
        raise ValueError(f"{owner}: alpha_candidates must be positive numbers, the prior "
                         f"precisions c of alpha = c / n_samples; got "
                         f"alpha_candidates={alpha_candidates!r}. E.g. (2.0, 0.5).")
    return candidates


def size_candidates(owner: str, auto_candidates: Any) -> list[int]:
    """``auto_candidates`` sorted and without repeats, or a ValueError naming it."""
    candidates = sorted({int(c) for c in auto_candidates})
    if not candidates or candidates[0] < 1:
        raise ValueError(f"{owner}: auto_candidates must be positive integers; "
                         f"got auto_candidates={auto_candidates!r}.")
    return candidates

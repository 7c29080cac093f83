"""Which stages an estimator's fit runs, and which one it keeps: the number of experts first (for
n_experts='auto'), then the prior (for alpha='auto'), each choice recorded with its reason.

Shape legend: C candidates, V held-out rows.

With held-out rows (early stopping, the default for the gradient solvers) every candidate is a
possible final model: the chosen one is kept, never refitted, and each weaker prior is warm-started
from the stronger one's optimum. Without them (EM, or ``early_stopping=False``) the number of
experts is chosen by BIC on every row and the prior on a hold-out, then refitted on every row.
After Ctrl-C no further stage runs, and the best stage fitted so far is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.estimators._selection import (
    MIN_ROWS_TO_CHOOSE,
    bic,
    one_standard_error_choice,
    search_n_experts,
    select_n_experts,
    select_precision,
    size_candidates,
)
from moekit.estimators._stages import Stage, StageFitter


class StagePlan:
    """Runs the stages of one fit of ``estimator`` through ``fitter``; :meth:`run` returns the
    stage kept, and leaves the curves, the choices and the stop reasons on the plan."""

    def __init__(self, estimator: Any, fitter: StageFitter) -> None:
        self.estimator, self.fitter = estimator, fitter
        self.n_experts_curve: dict[str, list] | None = None
        self.alpha_curve: dict[str, list] | None = None
        self.choices: list[dict[str, Any]] = []
        self.stop_reasons: list[str] = []
        self.last: Stage | None = None

    @property
    def interrupted(self) -> bool:
        return "interrupted" in self.stop_reasons

    def run(self, precisions: list[float]) -> Stage:
        est, fitter = self.estimator, self.fitter
        first = precisions[0]  # the prior while the number of experts is chosen
        choose_alpha = (est.alpha == "auto" and len(precisions) > 1
                        and len(fitter.t) >= MIN_ROWS_TO_CHOOSE)
        stage = self._choose_size(first) if est.n_experts == "auto" else None
        n_experts = est.n_experts if stage is None else stage.n_experts
        if self.interrupted:
            return stage or self.last
        if not choose_alpha:
            return stage or self._stage(n_experts, first, "final", "final fit")
        if fitter.val_rows is None:
            return self._choose_prior_refit(n_experts, stage, precisions)
        stage = stage or self._stage(n_experts, first, f"alpha_{first!r}",
                                     f"alpha c={first:g} (1 of {len(precisions)})")
        return stage if self.interrupted else self._choose_prior_warm(stage, precisions)

    def _stage(self, n_experts: int, precision: float, name: str, label: str,
               **kwargs: Any) -> Stage:
        if self.interrupted:
            return self.last  # Ctrl-C: no further stage is fitted
        self.last = self.fitter.fit(n_experts, precision, name, label, **kwargs)
        self.stop_reasons.append(self.last.result.stop_reason)
        return self.last

    def _choose_size(self, precision: float) -> Stage:
        """The number of experts: held-out loss (one-SE rule, fewest experts) or BIC."""
        est, fitter = self.estimator, self.fitter
        sizes = size_candidates(type(est).__name__, est.auto_candidates)
        rows = fitter.selection_rows()  # short candidate fits on a sample of a large table

        def candidate(n: int) -> Stage:
            label = f"n_experts={n} (candidate {sizes.index(n) + 1} of {len(sizes)})"
            return self._stage(n, precision, f"n_experts_{n}", label, rows=rows)

        if fitter.settings.criterion == "validation":
            n, curve, stage = search_n_experts(sizes, candidate, fitter.held_out_losses)
            why = _size_reason(n, curve)
            if rows is not None and not self.interrupted:
                why += (f"; candidates fitted on {len(rows):,} of the {fitter.n_train:,} training "
                        "rows, the chosen count then on every one")
                stage = self._stage(n, precision, f"n_experts_{n}_all_rows",
                                    f"n_experts={n} on every training row")
        else:
            def score(stage: Stage) -> float:
                x_ND, t = fitter.x_ND[fitter.train_rows], fitter.t[fitter.train_rows]
                n_parameters = sum(p.numel() for p in stage.model.parameters())
                return bic(est._log_likelihood(stage.model, x_ND, t), n_parameters, len(t))

            n, curve, stage = select_n_experts(sizes, candidate, score, "bic")
            why = "the lowest BIC (-2 log-likelihood + parameters x log rows) of the candidates"
        self.n_experts_curve = curve
        self.choices.append({"setting": "n_experts", "value": int(n), "why": why})
        return stage

    def _choose_prior_warm(self, first: Stage, precisions: list[float]) -> Stage:
        """Each weaker prior warm-started from the stage before; one-SE rule on held-out rows."""
        stages = [first]
        for i, c in enumerate(precisions[1:], 2):
            if self.interrupted:
                break
            stages.append(self._stage(first.n_experts, c, f"alpha_{c!r}",
                                      f"alpha c={c:g} ({i} of {len(precisions)}, warm start)",
                                      warm_from=stages[-1]))
        losses_CV = np.stack([self.fitter.held_out_losses(s) for s in stages])
        chosen, mean_C, se_C = one_standard_error_choice(losses_CV, [s.precision for s in stages])
        self.alpha_curve = {"alpha_candidates": [s.precision for s in stages],
                            "val_loss": mean_C.tolist(), "val_loss_se": se_C.tolist()}
        self.choices.append({"setting": "alpha", "value": f"{stages[chosen].precision:g} / rows",
                             "why": "the strongest prior whose held-out loss is within one "
                             "standard error of the lowest (each weaker one warm-started)"})
        return stages[chosen]

    def _choose_prior_refit(self, n_experts: int, stage: Stage | None, precisions: list[float]
                            ) -> Stage:
        """Candidates on a hold-out, then the chosen prior on every row (``stage``, fitted on
        every row at the first prior, is kept when that prior wins)."""
        est, fitter = self.estimator, self.fitter
        train_rows, val_rows = est._holdout_rows(fitter.t, fitter.seed)
        precision, self.alpha_curve = select_precision(
            precisions,
            lambda c: self._stage(n_experts, c, f"alpha_{c!r}", f"alpha c={c:g}",
                                  rows=train_rows),
            lambda s: fitter.held_out_losses(s, val_rows))
        self.choices.append({"setting": "alpha", "value": f"{precision:g} / rows",
                             "why": "the strongest prior within one standard error of the "
                             "lowest held-out loss, then refitted on every row"})
        if stage is not None and precision == stage.precision:
            return stage
        return self._stage(n_experts, precision, "final", "final fit")


def _size_reason(n: int, curve: dict[str, list]) -> str:
    losses = dict(zip(curve["n_experts"], curve["val_loss"], strict=True))
    best = min(losses, key=losses.__getitem__)
    why = (f"the fewest experts whose held-out loss ({losses[n]:.4g}) is within one standard "
           f"error of the lowest ({losses[best]:.4g}, {best} experts)")
    if curve["not_fitted"]:
        why += (f"; {', '.join(map(str, curve['not_fitted']))} not fitted: two larger counts in "
                "a row did not lower the held-out loss")
    return why

"""Table 1 beside the paper's, and the t-tests of the epochs (the verdict on each claim is in
:mod:`moekit.experiments.vowels_verdict`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from moekit.experiments.vowels import PAPER_TABLE, SystemResult, VowelsConfig
from moekit.experiments.vowels_measures import rising_epochs


@dataclass(frozen=True)
class Row:
    """One system's line of Table 1 (means over runs at the criterion)."""

    system: str
    lr: float
    runs: int
    reached: int
    train: float
    test: float
    epochs: float
    sd: float
    active_experts: float
    experts_per_case: float
    rising: float  # % of epochs on which the training error went up (oscillation at a large step)
    paper: dict[str, float] | None
    edge: str | None = None  # 'low' / 'high': the step chosen is at that end of the grid
    figure2: int = 0  # runs whose experts divide the vowels as the paper's Figure 2


def table_rows(results: list[SystemResult]) -> list[Row]:
    return [Row(system=r.system.name, lr=r.lr, runs=len(r.epochs_R), reached=int(r.reached_R.sum()),
                train=float(r.train_acc_R.mean()), test=float(r.test_acc_R.mean()),
                epochs=float(r.epochs_R.mean()),
                sd=float(r.epochs_R.std(ddof=1)) if len(r.epochs_R) > 1 else 0.0,
                active_experts=float(r.active_experts_R.mean()),
                experts_per_case=float(r.experts_per_case_R.mean()),
                rising=rising_epochs(r.curves_RT),
                paper=PAPER_TABLE.get(r.system.name), edge=r.edge,
                figure2=r.partition_R.count("figure 2")) for r in results]


@dataclass(frozen=True)
class TTest:
    """Backprop's epochs against a mixture's: the ratio of the means and a one-sided t-test (the
    paper: mixtures need fewer epochs). ``kind`` 'pooled' is the paper's test (a pooled variance,
    n_m + n_b - 2 = 48 degrees of freedom for 25 and 25 runs); 'welch' does not pool. ``complete``
    is False when a run of either system missed the criterion (its count is then where it stopped,
    and the comparison is not the paper's)."""

    mixture: str
    backprop: str
    ratio: float  # backprop mean epochs / mixture mean epochs
    t: float
    p_less: float  # one-sided: mixtures need fewer epochs
    df: float
    kind: str
    complete: bool = True


def t_test(a: np.ndarray, b: np.ndarray, kind: str = "pooled") -> tuple[float, float, float]:
    """One-sided two-sample t-test that mean(a) < mean(b): (t, p, degrees of freedom).

    Example (pooled: s^2 = (2 + 2) / 4 = 1, t = (2 - 5) / sqrt(1/3 + 1/3), 4 df):
        >>> [round(v, 4) for v in t_test(np.array([1.0, 2, 3]), np.array([4.0, 5, 6]))]
        [-3.6742, 0.0107, 4.0]
    """
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return float("nan"), float("nan"), float(len(a) + len(b) - 2)  # no spread at all
    # imported here: SciPy takes 0.6 s to import, and the worker processes of `moekit vowels`,
    # which import this module through the readings, never test
    from scipy import stats

    with warnings.catch_warnings():  # near-identical samples: scipy warns, we report it
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=kind == "pooled", alternative="less")
    return float(result.statistic), float(result.pvalue), float(result.df)


def compare_epochs(mixture: SystemResult, backprop: SystemResult, kind: str) -> TTest:
    """Epochs to the criterion of ``mixture`` against ``backprop`` (both at their own steps)."""
    t, p, df = t_test(mixture.epochs_R, backprop.epochs_R, kind)
    complete = bool(mixture.reached_R.all() and backprop.reached_R.all())
    return TTest(mixture.system.name, backprop.system.name,
                 float(backprop.epochs_R.mean() / mixture.epochs_R.mean()), t, p, df, kind,
                 complete)


def epoch_t_tests(results: list[SystemResult], kind: str = "pooled") -> list[TTest]:
    """Every mixture of ``results`` against every backprop net, each at its step."""
    mixtures = [r for r in results if r.system.kind == "mixture"]
    nets = [r for r in results if r.system.kind == "backprop"]
    return [compare_epochs(m, b, kind) for m in mixtures for b in nets
            if len(m.epochs_R) > 1 and len(b.epochs_R) > 1]


def format_table(rows: list[Row], tests: list[TTest], config: VowelsConfig) -> str:
    """Table 1 as plain text, each system beside the paper's numbers."""
    average = "per output unit" if config.average == "unit" else "per case"
    lines = [(f"Table 1: stop at average squared error {config.criterion} ({average}); "
              f"mean over runs, paper's value in brackets"),
             (f"{'System':<18}{'step':>8}{'reached':>9}{'Train %':>15}{'Test %':>15}"
              f"{'Avg epochs':>18}{'SD':>13}{'active':>8}{'rising':>8}{'fig. 2':>8}")]
    for r in rows:
        p = r.paper or {}

        def cell(value: float, key: str, fmt: str, p: dict[str, float] = p) -> str:
            ref = f" [{p[key]:{fmt}}]" if key in p else ""
            return f"{value:{fmt}}{ref}"

        step = f"{r.lr:g}" + ("*" if r.edge else "")
        lines.append(f"{r.system:<18}{step:>8}{f'{r.reached}/{r.runs}':>9}"
                     f"{cell(r.train, 'train', '.1f'):>15}{cell(r.test, 'test', '.1f'):>15}"
                     f"{cell(r.epochs, 'epochs', '.0f'):>18}{cell(r.sd, 'sd', '.0f'):>13}"
                     f"{r.active_experts:>8.1f}{r.rising:>7.0f}%{f'{r.figure2}/{r.runs}':>8}")
    lines.append("active: experts with mean mixing proportion >= 1%; rising: % of epochs on which "
                 "the training error went up; fig. 2: runs whose experts divide the vowels as "
                 "the paper's Figure 2")
    edges = [r for r in rows if r.edge]
    if edges:
        lines.append("* the step chosen is at the " + ", ".join(
            f"{r.edge} end ({r.system})" for r in edges) + " of the grid explored: a wider "
            "grid (--lr-grid) could choose another.")
    short = [r for r in rows if r.reached < r.runs]
    lines.append("Every run reached the criterion." if not short else
                 f"Runs that did not reach the criterion within the cap of {config.max_epochs} "
                 "epochs (counted where they stopped): "
                 + ", ".join(f"{r.system} {r.runs - r.reached}/{r.runs}" for r in short) + ".")
    lines.extend(f"t-test ({t.kind}, {t.df:g} df) {t.mixture} vs {t.backprop}: backprop needs "
                 f"{t.ratio:.2f}x the epochs; t = {t.t:.2f}, one-sided p = {t.p_less:.3g}"
                 for t in tests)
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> list[dict[str, object]]:
    return [dict(r.__dict__) for r in rows]


def _stopped_short(result: SystemResult) -> dict[str, int]:
    """Why the runs at the chosen step that missed the criterion stopped (from its trial)."""
    trial = next(t for t in result.trials if t.lr == result.lr)
    return {"hit_cap": trial.hit_cap, "diverged": trial.diverged, "pruned": trial.pruned}


def describe_runs(result: SystemResult) -> dict[str, object]:
    """Per-run numbers for results.json."""
    return {
        "system": result.system.name, "kind": result.system.kind, "size": result.system.size,
        "loss": result.system.loss, "parameters": result.system.n_parameters(), "lr": result.lr,
        "exploration": [dict(t.__dict__, status=t.status) for t in result.trials],
        "epochs": result.epochs_R.tolist(), "reached": result.reached_R.tolist(),
        **_stopped_short(result),
        "train_accuracy": np.round(result.train_acc_R, 3).tolist(),
        "test_accuracy": np.round(result.test_acc_R, 3).tolist(),
        "active_experts": result.active_experts_R.tolist(),
        "experts_per_case": np.round(result.experts_per_case_R, 4).tolist(),
        "partitions": result.partition_R, "edge": result.edge,
    }

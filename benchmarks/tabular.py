"""moekit's estimators against scikit-learn's on its bundled data sets (nothing is downloaded).

    .venv/bin/python benchmarks/tabular.py [--folds 5] [--seeds 0,2,3,4,10,...,15]
        [--tuned-seeds 0,2,10,11] [--threads 2] [--out benchmarks/tabular.json] [--resume]

Repeated 5-fold cross-validation (stratified for classifiers): one split per seed, the same folds
for every model; mean and spread of the test score (accuracy, or R^2 for diabetes) over every fold
of every seed, and the mean fit time. The default seeds, 0, 2, 3, 4 and 10 to 15, never chose
anything: the estimators' defaults were chosen on seeds 1 and 5 to 9
(benchmarks/tabular_selection.py). The
scikit-learn models get a StandardScaler in front (moekit standardises inside); every model uses its
default settings except max_iter, raised so that the MLP converges.
The mixtures use one configuration for every data set: the defaults (alpha chosen per fit from
2 / n and 0.5 / n by held-out loss), and 4 linear experts (the paper's) for reference.

A second block of rows (on ``--tuned-seeds`` only: it costs 25 fits per fold) tunes the mixture and
the MLP alike, each over a grid of 8 settings by 3-fold cross-validation inside each training fold
(nested, so the test folds never choose a setting); the tuned mixture keeps alpha at 2 / n.

Every finished cell (a data set, a seed's split, a model) is written to ``--out`` at once,
atomically; ``--resume`` keeps the cells already there (same --folds) and runs only the missing
ones, so an interrupted run goes on and a run with more seeds adds only their cells. Resume only
with the code and defaults that wrote the cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import (
    GridSearchCV,
    KFold,
    ParameterGrid,
    StratifiedKFold,
    cross_validate,
)
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.io import write_text_atomic

CLASSIFICATION = {"iris": load_iris, "wine": load_wine, "breast_cancer": load_breast_cancer,
                  "digits": load_digits}
REGRESSION = {"diabetes": load_diabetes}
EVALUATION_SEEDS = [0, 2, 3, 4, 10, 11, 12, 13, 14, 15]  # never used to choose a default


def classifiers(seed: int) -> dict[str, object]:
    return {
        "moekit MoE, defaults (4 MLP experts)": MixtureOfExpertsClassifier(random_state=seed),
        "moekit MoE, 4 linear experts": MixtureOfExpertsClassifier(expert="linear",
                                                                  random_state=seed),
        "LogisticRegression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "MLPClassifier": make_pipeline(StandardScaler(),
                                       MLPClassifier(max_iter=2000, random_state=seed)),
        "HistGradientBoosting": HistGradientBoostingClassifier(random_state=seed),
    }


def regressors(seed: int) -> dict[str, object]:
    return {
        "moekit MoE, defaults (4 MLP experts)": MixtureOfExpertsRegressor(random_state=seed),
        "moekit MoE, 4 linear experts": MixtureOfExpertsRegressor(expert="linear",
                                                                 random_state=seed),
        "LinearRegression": make_pipeline(StandardScaler(), LinearRegression()),
        "MLPRegressor": make_pipeline(StandardScaler(),
                                      MLPRegressor(max_iter=2000, random_state=seed)),
        "HistGradientBoosting": HistGradientBoostingRegressor(random_state=seed),
    }


# Both grids hold their model's defaults, listed first: GridSearchCV breaks a tie in the inner score
# in favour of the first setting, so on small data sets, where ties are common, each model falls
# back to its own defaults. 8 settings each. The tuned mixture keeps the fixed prior alpha = 2 / n
# (one alpha candidate): choosing alpha inside each of its 25 fits per fold would triple their cost.
MOEKIT_GRID = {"n_experts": [4, 8], "expert_hidden": [64, 32], "lr": [0.01, 0.003]}
TUNED_MIXTURE = {"alpha_candidates": (2.0,)}
MLP_GRID = {"alpha": [1e-4, 1e-3, 1e-2, 1e-1], "learning_rate_init": [1e-3, 1e-2]}


def tuned(models: dict[str, object]) -> dict[str, object]:
    """The default mixture and MLP, each tuned over its 8-setting grid by inner 3-fold CV."""
    mixture = clone(next(m for n, m in models.items() if n.startswith("moekit")))
    mixture.set_params(**TUNED_MIXTURE)
    mlp = models[next(n for n in models if n.startswith("MLP"))]
    mlp_step = mlp.steps[-1][0]
    mlp_grid = {f"{mlp_step}__{k}": v for k, v in MLP_GRID.items()}
    return {
        "moekit MoE, tuned (experts, hidden, lr; alpha 2 / n)": _grid_search(mixture, MOEKIT_GRID),
        "MLP, tuned (alpha, lr)": _grid_search(mlp, mlp_grid),
    }


def _grid_search(model: object, grid: dict[str, list[object]]) -> GridSearchCV:
    """Inner 3-fold grid search, after checking that the grid's first setting (the one a tie
    falls to) is the model's defaults."""
    first, defaults = ParameterGrid(grid)[0], model.get_params()
    if any(defaults[k] != v for k, v in first.items()):
        raise ValueError(f"the grid's first setting {first} is not {type(model).__name__}'s "
                         "defaults; list each default first.")
    return GridSearchCV(model, grid, cv=3)


def _models(is_classification: bool, seed: int, with_tuned: bool) -> dict[str, object]:
    build = classifiers if is_classification else regressors
    models = build(seed)
    if with_tuned:  # cross_validate and GridSearchCV fit clones, so the tuned rows can share them
        models.update(tuned(models))
    return models


def splitter(is_classification: bool, folds: int, seed: int) -> KFold | StratifiedKFold:
    """One seed's shuffled split into ``folds`` folds (stratified for a classifier)."""
    return (StratifiedKFold if is_classification else KFold)(folds, shuffle=True,
                                                             random_state=seed)


Cell = dict[str, object]  # one data set, one seed's split, one model: its fold scores and times


def _cell_key(cell: Cell) -> tuple[object, object, object]:
    return cell["data"], cell["seed"], cell["model"]


def run(folds: int, seeds: list[int], tuned_seeds: list[int], done: list[Cell] | None = None,
        on_cell: Callable[[list[Cell]], object] | None = None) -> list[Cell]:
    """Every cell's test scores and fit times, reusing the cells in ``done``; ``on_cell`` gets
    all the cells so far after each new one."""
    cells = list(done or [])
    have = {_cell_key(c) for c in cells}
    tasks = [(name, loader, True) for name, loader in CLASSIFICATION.items()]
    tasks += [(name, loader, False) for name, loader in REGRESSION.items()]
    for data_name, loader, is_classification in tasks:
        X, y = loader(return_X_y=True)
        for seed in seeds:
            cv = splitter(is_classification, folds, seed)
            for model_name, model in _models(is_classification, seed, seed in tuned_seeds).items():
                if (data_name, seed, model_name) in have:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    result = cross_validate(model, X, y, cv=cv, n_jobs=1)
                cells.append({"data": data_name, "seed": seed, "model": model_name,
                              "rows": len(y), "features": X.shape[1],
                              "metric": "accuracy" if is_classification else "R^2",
                              "fold_scores": [float(v) for v in result["test_score"]],
                              "fit_times": [float(v) for v in result["fit_time"]]})
                print(f"{data_name:<14} seed {seed} {model_name:<38} "
                      f"{result['test_score'].mean():.4f}  fit {result['fit_time'].mean():.3f} s",
                      flush=True)
                if on_cell is not None:
                    on_cell(cells)
    return cells


def table_rows(cells: list[Cell], seeds: list[int]) -> list[dict[str, object]]:
    """One row per data set and model over the cells of ``seeds``, in the order the cells ran."""
    rows: dict[tuple[object, object], dict[str, object]] = {}
    order = {name: i for i, name in enumerate([*CLASSIFICATION, *REGRESSION])}
    chosen = sorted((c for c in cells if c["seed"] in seeds), key=lambda c: order[c["data"]])
    for cell in chosen:
        row = rows.setdefault((cell["data"], cell["model"]), {
            "data": cell["data"], "rows": cell["rows"], "features": cell["features"],
            "model": cell["model"], "metric": cell["metric"], "seeds": [], "fold_scores": [],
            "fit_times": []})
        row["seeds"].append(cell["seed"])
        row["fold_scores"] += cell["fold_scores"]
        row["fit_times"] += cell["fit_times"]
    for row in rows.values():
        scores = np.asarray(row["fold_scores"])
        row.update(mean=float(scores.mean()), std=float(scores.std()),
                   fit_seconds=float(np.mean(row.pop("fit_times"))))
    return list(rows.values())


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [("| data (rows × features) | model | seeds | score (mean ± sd over folds) "
              "| fit time (s) |"), "|---|---|---|---|---|"]
    for r in rows:
        seeds = ",".join(str(s) for s in r["seeds"])
        lines.append(f"| {r['data']} ({r['rows']} × {r['features']}) | {r['model']} | {seeds} | "
                     f"{r['metric']} {r['mean']:.3f} ± {r['std']:.3f} | {r['fit_seconds']:.3f} |")
    return "\n".join(lines)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same folds, and its standard error from the fold-to-fold spread
    (folds of one split share rows, so this SE is somewhat optimistic)."""
    diffs = np.asarray(a) - np.asarray(b)
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs)))


def _shared_folds(a: dict[str, object], b: dict[str, object]) -> tuple[list[float], list[float]]:
    """Two rows' fold scores on the seeds both ran (a partial run can hold more of one row)."""
    def by_seed(row: dict[str, object]) -> dict[int, list[float]]:
        # every seed's split has the same number of folds (--resume refuses other --folds)
        chunks = np.split(np.asarray(row["fold_scores"]), len(row["seeds"]))
        return {s: chunk.tolist() for s, chunk in zip(row["seeds"], chunks, strict=True)}
    a_seeds, b_seeds = by_seed(a), by_seed(b)
    shared = [s for s in a_seeds if s in b_seeds]
    return ([v for s in shared for v in a_seeds[s]], [v for s in shared for v in b_seeds[s]])


def verdicts(rows: list[dict[str, object]]) -> list[str]:
    """Does the mixture match the MLP on each data set (mean score over the same folds at least
    the MLP's, within 5e-4)? The default mixture against the default MLP, and the tuned one
    against the tuned one."""
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == data]
        for kind in ("default", "tuned"):
            is_tuned = kind == "tuned"
            mlp = next((r for r in mine
                        if r["model"].startswith("MLP") and ("tuned" in r["model"]) == is_tuned),
                       None)
            moe = next((r for r in mine if r["model"].startswith("moekit")
                        and ("tuned" if is_tuned else "defaults") in r["model"]), None)
            if mlp is None or moe is None:
                continue  # the tuned block did not run
            moe_scores, mlp_scores = _shared_folds(moe, mlp)
            if not moe_scores:
                continue
            moe_mean, mlp_mean = np.mean(moe_scores), np.mean(mlp_scores)
            verdict = "matches or beats" if moe_mean >= mlp_mean - 5e-4 else "is below"
            diff, se = paired_difference(moe_scores, mlp_scores)
            out.append(f"{data} ({kind}, {len(moe_scores)} folds): {moe['model']} "
                       f"{moe_mean:.4f} {verdict} {mlp['model']} {mlp_mean:.4f} (paired "
                       f"difference over the same folds {diff:+.4f} ± {se:.4f} SE)")
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _earlier_cells(path: Path, folds: int) -> list[Cell]:
    """The cells a previous run wrote to ``path``, refused if it used other folds."""
    if not path.exists():
        return []
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("folds") != folds or "cells" not in record:
        raise SystemExit(f"--resume: {path} holds a run with folds={record.get('folds')} and "
                         f"{'' if 'cells' in record else 'no '}cells; this run has --folds "
                         f"{folds}. Pass another --out, or the same --folds.")
    return record["cells"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=_ints, default=EVALUATION_SEEDS,
                        help="one cross-validation split per seed (the default leaves out seeds 1 "
                             "and 5 to 9, on which the defaults were chosen)")
    parser.add_argument("--tuned-seeds", type=_ints, default=[0, 2, 10, 11],
                        help="the seeds whose folds also run the tuned block ('' for none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tabular.json"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in --out and run only the missing ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = _earlier_cells(args.out, args.folds) if args.resume else []
    load_before = os.getloadavg()[0]
    print(f"torch threads {torch.get_num_threads()}, scikit-learn {sklearn.__version__}, "
          f"load average {load_before:.2f}, {len(done)} cells kept from {args.out}")

    def record(cells: list[Cell]) -> dict[str, object]:
        rows = table_rows(cells, args.seeds)
        return {"rows": rows, "cells": cells, "folds": args.folds, "threads": args.threads,
                "seeds": args.seeds, "tuned_seeds": args.tuned_seeds,
                "load_before": load_before, "load_after": os.getloadavg()[0],
                "machine": platform.processor() or platform.machine(), "verdicts": verdicts(rows)}

    def save(cells: list[Cell]) -> dict[str, object]:
        written = record(cells)
        write_text_atomic(args.out, json.dumps(written, indent=2))
        return written

    final = save(run(args.folds, args.seeds, args.tuned_seeds, done, save))
    print("\n" + markdown(final["rows"]) + "\n")
    for line in final["verdicts"]:
        print(line)
    print(f"\nload average before {load_before:.2f}, after {final['load_after']:.2f}")


if __name__ == "__main__":
    main()

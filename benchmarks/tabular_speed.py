"""Wall time, test score and peak memory of `moekit fit` against scikit-learn's MLP and boosting.

On real tables that ship offline (statsmodels, palmerpenguins, scikit-learn) and on synthetic tables
of 10^4 to 10^6 rows.

    .venv/bin/python benchmarks/tabular_speed.py [--tables star98,grunfeld,...,synthetic]
        [--models moekit,moekit-auto,mlp,hgb] [--sizes 10000,100000,1000000] [--max-seconds 900]
        [--max-mb MB] [--threads N] [--out benchmarks/results/tabular_speed.json] [--resume]
    .venv/bin/python benchmarks/tabular_speed.py --markdown [--out ...]   # the table for RESULTS.md

The models (``--models``), each at its defaults as read at run time:
  moekit       the estimator `moekit fit` builds: ``moekit.runs.fit._estimator`` from a
               ``FitRunConfig`` given nothing but its data (the CLI's defaults, seed 0, no
               progress bar)
  moekit-auto  the same with ``n_experts='auto'`` (`moekit fit --experts auto`)
  mlp          StandardScaler + MLPClassifier / MLPRegressor (scikit-learn's defaults, max_iter
               200 included; random_state 0)
  hgb          HistGradientBoostingClassifier / Regressor (defaults; random_state 0)

The tables (``--tables``; ``synthetic`` stands for one table per ``--sizes`` entry) are listed in
``TABLES`` and ``synthetic_table`` with their targets and inputs; every input is a float column.

Protocol. One fixed split per table: 20 % of the rows held out for the test score (accuracy, or
R^2), seed 0, stratified by class for a classifier. Every (table, model) cell runs in its own child
process (this script with ``--cell TABLE MODEL``), which loads or generates the table itself, so
that its peak memory is the child's own ``ru_maxrss``: the peak resident memory of the whole
process, the Python + numpy + pandas + scikit-learn + torch + moekit import baseline included. The
baseline is measured each run by a child that only imports (``--baseline``). Per cell: the fit's
wall time (perf_counter around ``fit``), the predict time, the whole child's wall time from the
parent (start-up and data included) and its CPU time, the test score, the peak memory before the
fit and overall, the fitted model's epochs / chosen number of experts / stop reason and any other
of ``FITTED_ATTRIBUTES`` it has, the estimator's parameters, the warnings raised, the torch thread
count, and the 1/5/15-minute load averages before and after the cell. Thread counts are left to
each library (moekit chooses its own) unless ``--threads`` sets OMP_NUM_THREADS, MKL_NUM_THREADS
and OPENBLAS_NUM_THREADS in the children. A child still running after ``--max-seconds`` (or over
``--max-mb`` of resident memory) is killed and its cell recorded as "did not finish within N s"
(or "over N MB").

Each cell runs once (not interleaved, not repeated): on these shared 2-core machines read only
ratios of several fold, and the load averages beside them. Run it on a quiet machine: at a load
average of 5, HistGradientBoosting's two OpenMP threads took 20.8 s to fit grunfeld's 176 rows
against 0.07 s with ``--threads 1`` (its threads spin waiting for a core).

Every finished cell is written to ``--out`` at once, atomically; ``--resume`` keeps the cells
already there (same split) and runs the missing ones, the failed ones, and the ones killed under a
smaller cap than this run's. Resume only with the code and defaults that wrote the cells: each cell
records the parameters it used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info

import moekit
from moekit.io import jsonable, write_text_atomic
from moekit.runs.fit import FitRunConfig, _estimator

TEST_FRACTION = 0.2
SPLIT_SEED = 0
MODEL_SEED = 0
SIZES = (10_000, 100_000, 1_000_000)
SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = Path("benchmarks/results/tabular_speed.json")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Fitted attributes recorded when the estimator has them (moekit's may grow: read, never required).
FITTED_ATTRIBUTES = ("n_experts_", "n_iter_", "stop_reason_", "alpha_", "n_experts_curve_",
                     "alpha_curve_", "n_threads_", "threads_", "batch_size_", "dtype_",
                     "best_epoch_", "expert_", "choices_", "interrupted_")
POLL_SECONDS = 0.05

MODELS = {
    "moekit": "moekit fit (defaults)",
    "moekit-auto": "moekit fit --experts auto",
    "mlp": "MLP (scaled, defaults)",
    "hgb": "HistGradientBoosting (defaults)",
}


# --- tables --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """One benchmark table; ``load()`` returns X (N, D) float64 and y (N,), labels or values."""

    name: str
    task: str  # "classify" or "regress", as `moekit fit` names them
    target: str  # what y is
    inputs: str  # what X holds
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


def _statsmodels_frame(name: str) -> pd.DataFrame:
    from statsmodels import datasets  # the bench extra (adds < 1 MB to a child)

    return getattr(datasets, name).load_pandas().data


def load_fair() -> tuple[np.ndarray, np.ndarray]:
    frame = _statsmodels_frame("fair")
    return (frame.drop(columns="affairs").to_numpy(np.float64),
            (frame["affairs"] > 0).to_numpy(np.int64))


def load_randhie() -> tuple[np.ndarray, np.ndarray]:
    frame = _statsmodels_frame("randhie")
    return frame.drop(columns="mdvis").to_numpy(np.float64), frame["mdvis"].to_numpy(np.float64)


def load_star98() -> tuple[np.ndarray, np.ndarray]:
    frame = _statsmodels_frame("star98")
    share = frame["NABOVE"] / (frame["NABOVE"] + frame["NBELOW"])
    return (frame.drop(columns=["NABOVE", "NBELOW"]).to_numpy(np.float64),
            share.to_numpy(np.float64))


def load_grunfeld() -> tuple[np.ndarray, np.ndarray]:
    frame = _statsmodels_frame("grunfeld")
    inputs = pd.get_dummies(frame.drop(columns="invest"), columns=["firm"], dtype=np.float64)
    return inputs.to_numpy(np.float64), frame["invest"].to_numpy(np.float64)


def load_penguins() -> tuple[np.ndarray, np.ndarray]:
    from palmerpenguins import load_penguins as penguins  # the bench extra

    frame = penguins().dropna()
    inputs = pd.get_dummies(frame.drop(columns="species"), columns=["island", "sex"],
                            dtype=np.float64)
    return inputs.to_numpy(np.float64), frame["species"].to_numpy(str)


def _sklearn_loader(load: Callable) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def loader() -> tuple[np.ndarray, np.ndarray]:
        X, y = load(return_X_y=True)
        return X.astype(np.float64), y

    return loader


TABLES = {t.name: t for t in [
    Table("star98", "regress", "NABOVE / (NABOVE + NBELOW): the share of a district's pupils above "
          "the national median in maths", "the 20 other columns (13 measures, 7 interactions)",
          load_star98),
    Table("grunfeld", "regress", "invest (gross investment)",
          "value, capital, year and the firm one-hot (11 columns)", load_grunfeld),
    Table("penguins", "classify", "species (3 classes)", "bill length and depth, flipper length, "
          "body mass, year; island (3) and sex (2) one-hot; rows with a missing value dropped",
          load_penguins),
    Table("breast_cancer", "classify", "malignant or benign", "30 measurements",
          _sklearn_loader(load_breast_cancer)),
    Table("digits", "classify", "the digit (10 classes)", "8x8 pixel intensities",
          _sklearn_loader(load_digits)),
    Table("fair", "classify", "affairs > 0", "the 8 other columns", load_fair),
    Table("randhie", "regress", "mdvis (outpatient visits to a doctor: the documented endog)",
          "the 9 other columns", load_randhie),
]}

SYNTHETIC_FEATURES, SYNTHETIC_REGIONS, SYNTHETIC_NOISE = 8, 4, 0.1


def make_synthetic(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A regression where each of 4 regions of input space has its own linear rule.

    X (rows, 8) is uniform on [-1, 1]; a row's region is the nearest of 4 fixed centres in its first
    3 features; y is that region's linear function of all 8 features plus N(0, 0.1^2) noise. The
    centres and functions are the same for every size (seed 1234); ``seed`` draws the rows.
    """
    rule = np.random.default_rng(1234)
    centres_R3 = rule.uniform(-0.7, 0.7, (SYNTHETIC_REGIONS, 3))
    weights_RD = rule.normal(0.0, 1.0, (SYNTHETIC_REGIONS, SYNTHETIC_FEATURES))
    bias_R = rule.normal(0.0, 1.0, SYNTHETIC_REGIONS)
    rng = np.random.default_rng(seed)
    X_ND = rng.uniform(-1.0, 1.0, (rows, SYNTHETIC_FEATURES))
    distance_NR = ((X_ND[:, None, :3] - centres_R3[None]) ** 2).sum(-1)
    region_N = distance_NR.argmin(1)
    y_N = np.einsum("nd,nd->n", X_ND, weights_RD[region_N]) + bias_R[region_N]
    return X_ND, y_N + rng.normal(0.0, SYNTHETIC_NOISE, rows)


def synthetic_table(rows: int) -> Table:
    return Table(f"synthetic_{rows}", "regress",
                 "4 regions (nearest of 4 centres in x0..x2), each its own linear function of "
                 "x0..x7, + N(0, 0.1^2) noise", "x0..x7 uniform on [-1, 1]",
                 lambda: make_synthetic(rows))


def get_table(name: str) -> Table:
    if name in TABLES:
        return TABLES[name]
    prefix, _, rows = name.partition("_")
    if prefix == "synthetic" and rows.isdigit() and int(rows) > 0:
        return synthetic_table(int(rows))
    raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}, synthetic_<rows>.")


def table_names(selection: Iterable[str], sizes: Iterable[int]) -> list[str]:
    """The tables of ``--tables``: ``synthetic`` expands to one table per size."""
    names: list[str] = []
    for name in selection:
        expanded = [f"synthetic_{n}" for n in sizes] if name == "synthetic" else [name]
        for each in expanded:
            get_table(each)  # refuse unknown names before anything runs
            if each not in names:
                names.append(each)
    return names


# --- models --------------------------------------------------------------------------------------
def build_model(model: str, task: str) -> object:
    """The estimator of one ``MODELS`` key, with the defaults of the code installed now."""
    classify = task == "classify"
    if model in ("moekit", "moekit-auto"):
        options = {"n_experts": "auto"} if model == "moekit-auto" else {}
        config = FitRunConfig(data="", target="", seed=MODEL_SEED, progress=False, **options)
        return _estimator(config, task)
    if model == "mlp":
        mlp = MLPClassifier if classify else MLPRegressor
        return make_pipeline(StandardScaler(), mlp(random_state=MODEL_SEED))
    if model == "hgb":
        hgb = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
        return hgb(random_state=MODEL_SEED)
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}.")


def fitted_attributes(model: object) -> dict[str, object]:
    """The ``FITTED_ATTRIBUTES`` the fitted model (or a pipeline's last step) has."""
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    found = {}
    for name in FITTED_ATTRIBUTES:
        value = getattr(final, name, None)
        if value is not None and not callable(value):
            found[name] = jsonable(value) if isinstance(value, (int, float, str, list, tuple,
                                                               dict, np.generic)) else str(value)
    return found


def split(X: np.ndarray, y: np.ndarray, task: str) -> list[np.ndarray]:
    """The table's one fixed split: X_train, X_test, y_train, y_test."""
    return train_test_split(X, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                            stratify=y if task == "classify" else None)


# --- the child: one cell -------------------------------------------------------------------------
def peak_mb() -> float:
    """This process's peak resident memory so far, in MB (ru_maxrss is in KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def child_cell(table_name: str, model_key: str, result: Path) -> None:
    """Run one cell in this process and write what it measured to ``result``; a first write after
    loading the data tells the parent the table's shape should the fit be killed."""
    table = get_table(table_name)
    record: dict[str, object] = {"threads_at_start": torch.get_num_threads()}
    started = time.perf_counter()
    X, y = table.load()
    X_train, X_test, y_train, y_test = split(X, y, table.task)
    record.update(rows=int(X.shape[0]), features=int(X.shape[1]), train_rows=len(y_train),
                  test_rows=len(y_test), load_seconds=time.perf_counter() - started,
                  peak_mb_before_fit=peak_mb())
    del X, y
    write_text_atomic(result, json.dumps(record))
    model = build_model(model_key, table.task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        model.fit(X_train, y_train)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        predicted = model.predict(X_test)
        predict_seconds = time.perf_counter() - started
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    score = (accuracy_score(y_test, predicted) if table.task == "classify"
             else r2_score(y_test, predicted))
    record.update(fit_seconds=fit_seconds, predict_seconds=predict_seconds, score=float(score),
                  peak_mb=peak_mb(), threads_after_fit=torch.get_num_threads(),
                  threadpools={pool["internal_api"]: pool["num_threads"]
                               for pool in threadpool_info()},
                  attributes=fitted_attributes(model),
                  params=jsonable({k: v if isinstance(v, (int, float, str, bool, type(None),
                                                          tuple, list)) else str(v)
                                   for k, v in final.get_params(deep=False).items()}),
                  warnings=sorted({f"{w.category.__name__}: {str(w.message)[:200]}"
                                   for w in caught}))
    write_text_atomic(result, json.dumps(record))


def child_baseline(result: Path) -> None:
    """What a child that only imports (this module's imports) holds."""
    write_text_atomic(result, json.dumps({"peak_mb": peak_mb(),
                                          "threads_at_start": torch.get_num_threads()}))


# --- the parent: children, caps, bookkeeping -----------------------------------------------------
Cell = dict[str, object]  # one table, one model: what its child measured


def cell_key(cell: Cell) -> tuple[object, object]:
    return cell["table"], cell["model"]


def _rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` now, in MB (0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _wait(proc: subprocess.Popen, max_seconds: float, max_mb: float | None
          ) -> tuple[str, int | None, resource.struct_rusage]:
    """Wait for the child, killing its process group past either cap: (status, exit code, usage)."""
    started = time.perf_counter()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ("ok" if proc.returncode == 0 else "failed"), proc.returncode, usage
        over_time = time.perf_counter() - started > max_seconds
        over_memory = max_mb is not None and _rss_mb(proc.pid) > max_mb
        if over_time or over_memory:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ("did not finish" if over_time else "over memory"), None, usage
        time.sleep(POLL_SECONDS)


def _child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    return env


def run_child(arguments: list[str], max_seconds: float, max_mb: float | None = None,
              threads: int | None = None) -> Cell:
    """Run this script with ``arguments`` in a child process; what it wrote, with its status, wall
    and CPU time, peak memory as the kernel saw it, and the load averages around it."""
    with tempfile.TemporaryDirectory(prefix="tabular_speed_") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        load_before = list(os.getloadavg())
        started = time.perf_counter()
        with open(log, "w") as log_file:
            proc = subprocess.Popen([sys.executable, str(SCRIPT), *arguments, "--result",
                                     str(result)], stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=_child_env(threads))
            status, code, usage = _wait(proc, max_seconds, max_mb)
        seconds = time.perf_counter() - started
        cell: Cell = json.loads(result.read_text()) if result.exists() else {}
        if status == "ok" and "peak_mb" not in cell:
            status = "failed"  # exited 0 without its record
        cell.update(status=status, child_seconds=seconds,
                    child_cpu_seconds=usage.ru_utime + usage.ru_stime,
                    child_peak_mb_kernel=usage.ru_maxrss / 1024, load_before=load_before,
                    load_after=list(os.getloadavg()), max_seconds=max_seconds, max_mb=max_mb,
                    threads_variable=threads)
        if status == "failed":
            cell["exit_code"] = code
            cell["error"] = log.read_text(errors="replace")[-2000:]
    return cell


def run_cell(table: str, model: str, max_seconds: float, max_mb: float | None = None,
             threads: int | None = None) -> Cell:
    """One (table, model) cell, measured in its own child process."""
    spec = get_table(table)
    cell = {"table": table, "model": model, "model_name": MODELS[model], "task": spec.task,
            "metric": "accuracy" if spec.task == "classify" else "R^2",
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    cell.update(run_child(["--cell", table, model], max_seconds, max_mb, threads))
    return cell


def keep_on_resume(cell: Cell, max_seconds: float, max_mb: float | None) -> bool:
    """Whether an earlier cell stands: finished, or killed under caps at least this run's."""
    if cell.get("status") == "ok":
        return True
    if cell.get("status") == "did not finish":
        return cell.get("max_seconds", 0) >= max_seconds
    if cell.get("status") == "over memory":
        return max_mb is not None and cell.get("max_mb") is not None and cell["max_mb"] >= max_mb
    return False


def pending(tables: list[str], models: list[str], done: list[Cell], max_seconds: float,
            max_mb: float | None = None) -> list[tuple[str, str]]:
    """The (table, model) cells still to run, in order: every one not kept from ``done``."""
    kept = {cell_key(c) for c in done if keep_on_resume(c, max_seconds, max_mb)}
    return [(t, m) for t in tables for m in models if (t, m) not in kept]


def protocol() -> dict[str, object]:
    return {"test_fraction": TEST_FRACTION, "split_seed": SPLIT_SEED, "model_seed": MODEL_SEED}


def earlier_record(path: Path) -> dict[str, object]:
    """The record a previous run wrote to ``path`` (empty when there is none), refused if it was
    split otherwise."""
    if not path.exists():
        return {}
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("protocol") != protocol() or "cells" not in record:
        raise SystemExit(f"--resume: {path} holds a run with protocol {record.get('protocol')}; "
                         f"this script's is {protocol()}. Pass another --out.")
    return record


def merge(cells: list[Cell], cell: Cell) -> list[Cell]:
    """``cells`` with ``cell`` in place of the earlier one of its key, or appended."""
    out = [c for c in cells if cell_key(c) != cell_key(cell)]
    where = next((i for i, c in enumerate(cells) if cell_key(c) == cell_key(cell)), len(out))
    out.insert(where, cell)
    return out


def machine() -> dict[str, object]:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "cores_usable": cores,
            "memory_gib": round(memory_gib, 1), "python": platform.python_version(),
            "torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "moekit": getattr(moekit, "__version__", "?"),
            "torch_threads": torch.get_num_threads(),
            "thread_variables": {v: os.environ.get(v) for v in THREAD_VARIABLES}}


# --- markdown ------------------------------------------------------------------------------------
def _seconds(value: float) -> str:
    """3 significant figures from 1 s on: 0.52 s, 4.31 s, 40.2 s, 402 s."""
    if value < 10:
        return f"{value:.2f} s"
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def _summary(cell: Cell | None) -> str:
    """One model's entry in the side-by-side table."""
    if cell is None:
        return "not run"
    status = cell.get("status")
    if status == "did not finish":
        return f"did not finish within {cell['max_seconds']:g} s"
    if status == "over memory":
        return f"over {cell['max_mb']:g} MB, killed"
    if status != "ok":
        return "failed"
    return f"{_seconds(cell['fit_seconds'])}, {cell['score']:.3f}, {cell['peak_mb']:.0f} MB"


def _ratio(moe: Cell | None, mlp: Cell | None) -> str:
    if moe is None or mlp is None or mlp.get("status") != "ok":
        return ""
    if moe.get("status") == "ok":
        return f"{moe['fit_seconds'] / mlp['fit_seconds']:.1f}x"
    if moe.get("status") == "did not finish":
        return f"> {moe['max_seconds'] / mlp['fit_seconds']:.0f}x"
    return ""


def _settings(attributes: dict[str, object]) -> str:
    """moekit's resolved settings from ``choices_``: dtype, rows per update, early stopping."""
    found = {c.get("setting"): c.get("value") for c in attributes.get("choices_") or []
             if isinstance(c, dict)}
    parts = []
    if "dtype" in found:
        parts.append(str(found["dtype"]))
    if "batch_size" in found:
        batch = found["batch_size"]
        parts.append(f"batch {batch}" if isinstance(batch, int) else str(batch))
    if "early_stopping" in found:
        parts.append("early stopping" if found["early_stopping"] else "no early stopping")
    return ", ".join(parts)


def _threads(cell: Cell) -> str:
    """moekit's chosen thread count, else the largest thread pool scikit-learn had."""
    attributes = cell.get("attributes", {})
    for name in ("n_threads_", "threads_"):
        if name in attributes:
            return str(attributes[name])
    pools = cell.get("threadpools") or {}
    return str(max(pools.values())) if pools else ""


def _warnings(cell: Cell) -> str:
    return ", ".join(sorted({w.split(":")[0] for w in cell.get("warnings", [])}))


def _load(values: object) -> str:
    return f"{values[0]:.2f}" if isinstance(values, list) and values else "?"


def markdown(record: dict[str, object]) -> str:
    """The side-by-side table, a detail table of every cell, and the machine: for RESULTS.md."""
    cells: list[Cell] = record.get("cells", [])
    tables = list(dict.fromkeys(c["table"] for c in cells))
    models = [m for m in MODELS if any(c["model"] == m for c in cells)]
    by_key = {cell_key(c): c for c in cells}
    header = ["table (rows × features, score)", *(MODELS[m] for m in models)]
    show_ratio = "moekit" in models and "mlp" in models
    if show_ratio:
        header.append("moekit default / MLP fit time")
    lines = ["Fit time, test score, peak RSS of the child process (import baseline included):",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for table in tables:
        mine = [c for c in cells if c["table"] == table]
        shaped = next((c for c in mine if "rows" in c), None)
        shape = f"{shaped['rows']} × {shaped['features']}" if shaped else "?"
        row = [f"{table} ({shape}, {mine[0]['metric']})",
               *(_summary(by_key.get((table, m))) for m in models)]
        if show_ratio:
            row.append(_ratio(by_key.get((table, "moekit")), by_key.get((table, "mlp"))))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", ("Every cell (child = the whole child process, start-up and data included; "
                   "load = 1-minute load average before → after):"), "",
              ("| table | model | fit | child wall / CPU | peak before fit → peak | epochs | "
               "experts | stop | settings | threads | warnings | load |"), "|---" * 12 + "|"]
    for table in tables:
        for model in models:
            cell = by_key.get((table, model))
            if cell is None:
                continue
            attributes = cell.get("attributes", {})
            fit = _seconds(cell["fit_seconds"]) if "fit_seconds" in cell else cell["status"]
            before = cell.get("peak_mb_before_fit")
            peak = cell.get("peak_mb", cell.get("child_peak_mb_kernel", 0.0))
            memory = (f"{before:.0f} → {peak:.0f} MB" if before is not None
                      else f"{peak:.0f} MB")
            lines.append(
                f"| {table} | {MODELS[model]} | {fit} | {_seconds(cell['child_seconds'])} / "
                f"{_seconds(cell['child_cpu_seconds'])} | {memory} | "
                f"{attributes.get('n_iter_', '')} | {attributes.get('n_experts_', '')} | "
                f"{attributes.get('stop_reason_', '')} | {_settings(attributes)} | "
                f"{_threads(cell)} | {_warnings(cell)} | {_load(cell.get('load_before'))} → "
                f"{_load(cell.get('load_after'))} |")
    m, base = record.get("machine", {}), record.get("baseline", {})
    if m:
        lines += ["", (f"Machine: {m.get('platform')}, {m.get('cores_usable')} usable cores, "
                       f"{m.get('memory_gib')} GiB; Python {m.get('python')}, torch "
                       f"{m.get('torch')} ({m.get('torch_threads')} threads by default), "
                       f"scikit-learn {m.get('sklearn')}, numpy {m.get('numpy')}, moekit "
                       f"{m.get('moekit')}.")]
    if base.get("status") == "ok":
        lines.append(f"A child that only imports peaks at {base['peak_mb']:.0f} MB and takes "
                     f"{_seconds(base['child_seconds'])} from start to exit.")
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------
def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in _names(text)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=_names, default=[*TABLES, "synthetic"],
                        help=f"comma-separated, from {', '.join(TABLES)}, synthetic (one per "
                             "--sizes entry) or synthetic_<rows>; default all")
    parser.add_argument("--models", type=_names, default=list(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}; default all")
    parser.add_argument("--sizes", type=_ints, default=list(SIZES),
                        help="the synthetic tables' rows (default 10000,100000,1000000)")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="kill a cell's child after this long (default 900)")
    parser.add_argument("--max-mb", type=float, default=None,
                        help="kill a cell's child whose resident memory passes this many MB "
                             "(default: 75%% of the machine's memory)")
    parser.add_argument("--threads", type=int, default=None,
                        help="set OMP/MKL/OPENBLAS_NUM_THREADS in the children (default: each "
                             "library's own choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in --out and run only the missing ones")
    parser.add_argument("--markdown", action="store_true",
                        help="print the tables of --out for benchmarks/RESULTS.md; run nothing")
    parser.add_argument("--cell", nargs=2, metavar=("TABLE", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        child_cell(*args.cell, args.result)
        return
    if args.baseline:
        child_baseline(args.result)
        return
    if args.markdown:
        if not args.out.is_file():
            parser.error(f"--markdown reads --out, and there is no {args.out}; run the benchmark "
                         "first, or pass --out.")
        print(markdown(json.loads(args.out.read_text(encoding="utf-8"))))
        return
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; known: {', '.join(MODELS)}")
    try:
        tables = table_names(args.tables, args.sizes)
    except ValueError as error:
        parser.error(str(error))
    max_mb = args.max_mb
    if max_mb is None:
        max_mb = 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    record = earlier_record(args.out) if args.resume else {}
    cells: list[Cell] = record.get("cells", [])
    todo = pending(tables, args.models, cells, args.max_seconds, max_mb)
    record.update(protocol=protocol(), machine=machine(),
                  tables={t: {"task": get_table(t).task, "target": get_table(t).target,
                              "inputs": get_table(t).inputs} for t in tables} | {
                      k: v for k, v in record.get("tables", {}).items() if k not in tables})
    print(f"{len(todo)} cells to run, {len(cells)} kept from {args.out}; load average "
          f"{os.getloadavg()[0]:.2f}; cap {args.max_seconds:g} s, {max_mb:.0f} MB", flush=True)
    if todo or "baseline" not in record:  # this run's own, beside the cells it measures
        record["baseline"] = run_child(["--baseline"], args.max_seconds, threads=args.threads)
        print(f"import-only child: {record['baseline'].get('peak_mb', math.nan):.0f} MB, "
              f"{record['baseline']['child_seconds']:.1f} s", flush=True)
    record["cells"] = cells
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(jsonable(record), indent=1))
    for table, model in todo:
        cell = run_cell(table, model, args.max_seconds, max_mb, args.threads)
        record["cells"] = merge(record["cells"], cell)
        write_text_atomic(args.out, json.dumps(jsonable(record), indent=1))
        score = cell.get("score", math.nan)
        print(f"{table:<18} {model:<12} {cell['status']:<15} fit "
              f"{cell.get('fit_seconds', math.nan):9.2f} s  score {score:7.4f}  peak "
              f"{cell.get('peak_mb', cell['child_peak_mb_kernel']):7.0f} MB  load "
              f"{cell['load_before'][0]:.2f} -> {cell['load_after'][0]:.2f}", flush=True)
    print("\n" + markdown(record))


if __name__ == "__main__":
    main()

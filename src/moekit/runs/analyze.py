"""`moekit analyze RUN`: the routing analysis of a run folder, whichever command made it.

A `moekit vowels` folder lists its saved mixtures in results.json; a `moekit fit` folder holds one
fitted estimator and names the CSV it was fitted on. Either way each model is analysed with
:func:`moekit.reports.analysis.analyze_input` into ``RUN/analysis/<name>/`` (analysis.json,
analysis.html and the figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.exceptions import DataError, Setting
from moekit.experiments.vowels_models import load_vowels_run, saved_models
from moekit.io.paths import inside
from moekit.io.run_folder import clean_leftovers
from moekit.reports.analysis import AnalysisInput, analyze_input
from moekit.reports.fit import ANALYSIS_DIR, fit_analysis_input
from moekit.runs.folder import load_run_data, require_run


@dataclass(frozen=True)
class AnalyzedModel:
    name: str
    stats: dict[str, Any]
    directory: Path


def run_kind(run: Path) -> tuple[str, dict[str, Any] | None]:
    """'vowels' or 'fit', from the manifest of a complete run; for a vowels run, also the record
    of its saved models (results.json's "analysis", checked)."""
    kind = require_run(run, ("fit", "vowels"))["command"]
    return kind, saved_models(run) if kind == "vowels" else None


def fit_run_input(run: Path, data: Path | str | None = None) -> AnalysisInput:
    """The fitted estimator of a `moekit fit` run and its data (the CSV it was fitted on, or
    ``data``), as an :class:`AnalysisInput`."""
    d = load_run_data(run, data)
    return fit_analysis_input(d.estimator, d.inputs, d.y, d.prep.target, d.source)


def analyze_run(run: Path | str, data: Path | str | None = None) -> list[AnalyzedModel]:
    """Analyse every model of a complete run folder into ``RUN/analysis/<name>/`` (each folder
    replaced whole); returns their statistics. Nothing is written outside ``RUN/analysis/``."""
    run = Path(run)
    kind, saved = run_kind(run)
    if kind == "vowels":
        if data is not None:
            raise DataError(Setting("data"), " applies to `moekit fit` runs; a vowels run is "
                            "analysed on the vowel data it was trained on.")
        items = load_vowels_run(run, saved=saved)
    else:
        items = [fit_run_input(run, data)]
    out = inside(run, ANALYSIS_DIR, source=run, field="the analysis folder")
    clean_leftovers(run)
    return [AnalyzedModel(item.name, analyze_input(item, out), out / item.name) for item in items]

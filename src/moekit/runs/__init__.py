"""What the `moekit fit`, `predict`, `report` and `analyze` commands do, callable from Python: a
mixture fitted to a CSV file (:mod:`~moekit.runs.fit`), its run folder read back
(:mod:`~moekit.runs.folder`), predictions (:mod:`~moekit.runs.predict`) and the routing analysis of
any run folder (:mod:`~moekit.runs.analyze`)."""

from moekit.runs.analyze import analyze_run
from moekit.runs.fit import FitRunConfig, report_run, run_fit
from moekit.runs.folder import load_run, load_run_data
from moekit.runs.predict import predict_run

__all__ = ["FitRunConfig", "analyze_run", "load_run", "load_run_data", "predict_run", "report_run",
           "run_fit"]

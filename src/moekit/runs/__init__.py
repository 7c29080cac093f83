"""What the `moekit fit`, `predict`, `report` and `analyze` commands do, callable from Python: a
mixture fitted to a CSV file (:mod:`~moekit.runs.fit`), its run folder read back
(:mod:`~moekit.runs.folder`), predictions (:mod:`~moekit.runs.predict`) and the routing analysis of
any run folder (:mod:`~moekit.runs.analyze`); `moekit lm train`: a byte-level MoE language model
beside its dense twin (:mod:`~moekit.runs.lm_train`)."""

from moekit.runs.analyze import analyze_run
from moekit.runs.fit import FitRunConfig, report_run, run_fit
from moekit.runs.folder import load_run, load_run_data
from moekit.runs.lm_analyze import analyze_lm
from moekit.runs.lm_routing import analyze_model, mixtral_demo
from moekit.runs.lm_train import LMTrainConfig, LMTrainOutcome, train_lm
from moekit.runs.predict import predict_run

__all__ = ["FitRunConfig", "LMTrainConfig", "LMTrainOutcome", "analyze_lm", "analyze_model",
           "analyze_run", "load_run", "load_run_data", "mixtral_demo", "predict_run", "report_run",
           "run_fit", "train_lm"]

"""Self-contained HTML reports: the building blocks (:mod:`~moekit.reports.html`), the routing
analysis of one model (:mod:`~moekit.reports.analysis`) and the report of a `moekit fit` run
(:mod:`~moekit.reports.fit`) with its scores in the target's units
(:mod:`~moekit.reports.metrics`)."""

from moekit.reports.analysis import AnalysisInput, analysis_sections, analyze, analyze_input
from moekit.reports.html import Section, write_report
from moekit.reports.lm import lm_report, lm_summary
from moekit.reports.metrics import fit_metrics

__all__ = ["AnalysisInput", "Section", "analysis_sections", "analyze", "analyze_input",
           "fit_metrics", "lm_report", "lm_summary", "write_report"]

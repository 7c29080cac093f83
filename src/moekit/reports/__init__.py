"""Self-contained HTML reports: the building blocks (:mod:`~moekit.reports.html`), the routing
analysis of one model (:mod:`~moekit.reports.analysis`) and the report of a `moekit fit` run
(:mod:`~moekit.reports.fit`)."""

from moekit.reports.analysis import AnalysisInput, analysis_sections, analyze, analyze_input
from moekit.reports.html import Section, write_report

__all__ = ["AnalysisInput", "Section", "analysis_sections", "analyze", "analyze_input",
           "write_report"]

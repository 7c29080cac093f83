"""Figures (matplotlib's object API; no backend is chosen at import): the shared style
(:mod:`~moekit.plotting.style`), the gate's partition (:mod:`~moekit.plotting.partition`), the
experts' decision lines (:mod:`~moekit.plotting.expert_lines`), routing statistics
(:mod:`~moekit.plotting.routing`), curves over training (:mod:`~moekit.plotting.curves`) and a
fitted model's predictions against the truth (:mod:`~moekit.plotting.diagnostics`)."""

from moekit.plotting.curves import plot_learning_curves, plot_training_curves
from moekit.plotting.diagnostics import plot_confusion_matrix, plot_predicted_vs_actual
from moekit.plotting.expert_lines import expert_decision_lines, plot_lines_over_time
from moekit.plotting.lm import (
                                       plot_ablation_deltas,
                                       plot_category_shares,
                                       plot_layer_load,
                                       plot_lm_training,
                                       plot_repeat_rates,
                                       plot_selectivity,
                                       plot_transitions,
)
from moekit.plotting.lm_text import plot_byte_experts
from moekit.plotting.partition import (
                                       ExpertLine,
                                       Plane,
                                       gate_probs,
                                       plot_mixing_proportions,
                                       plot_partition,
)
from moekit.plotting.routing import (
                                       plot_coactivation,
                                       plot_expert_by_label,
                                       plot_importance,
                                       plot_load,
                                       plot_routing_over_training,
)
from moekit.plotting.style import expert_colors, save_figure

__all__ = [
    "ExpertLine",
    "Plane",
    "expert_colors",
    "expert_decision_lines",
    "gate_probs",
    "plot_ablation_deltas",
    "plot_byte_experts",
    "plot_category_shares",
    "plot_coactivation",
    "plot_confusion_matrix",
    "plot_expert_by_label",
    "plot_importance",
    "plot_layer_load",
    "plot_learning_curves",
    "plot_lines_over_time",
    "plot_lm_training",
    "plot_load",
    "plot_mixing_proportions",
    "plot_partition",
    "plot_predicted_vs_actual",
    "plot_repeat_rates",
    "plot_routing_over_training",
    "plot_selectivity",
    "plot_training_curves",
    "plot_transitions",
    "save_figure",
]

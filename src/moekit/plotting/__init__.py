"""Figures (matplotlib's object API; no backend is chosen at import): the shared style
(:mod:`~moekit.plotting.style`), the gate's partition (:mod:`~moekit.plotting.partition`), the
experts' decision lines (:mod:`~moekit.plotting.expert_lines`), routing statistics
(:mod:`~moekit.plotting.routing`), curves over training (:mod:`~moekit.plotting.curves`) and a
fitted model's predictions against the truth (:mod:`~moekit.plotting.diagnostics`)."""

from moekit._lazy import lazy_names as _lazy_names

# Each name imports its module, and so matplotlib (0.3 s), when first asked for: the worker
# processes of `moekit vowels` import moekit.plotting.expert_lines for INACTIVE_PROPORTION, which
# runs this file first, and draw nothing.
_LAZY = {
    "ExpertLine": "moekit.plotting.partition",
    "Plane": "moekit.plotting.partition",
    "expert_colors": "moekit.plotting.style",
    "expert_decision_lines": "moekit.plotting.expert_lines",
    "gate_probs": "moekit.plotting.partition",
    "plot_ablation_deltas": "moekit.plotting.lm",
    "plot_byte_experts": "moekit.plotting.lm_text",
    "plot_category_shares": "moekit.plotting.lm",
    "plot_coactivation": "moekit.plotting.routing",
    "plot_confusion_matrix": "moekit.plotting.diagnostics",
    "plot_expert_by_label": "moekit.plotting.routing",
    "plot_importance": "moekit.plotting.routing",
    "plot_layer_load": "moekit.plotting.lm",
    "plot_learning_curves": "moekit.plotting.curves",
    "plot_lines_over_time": "moekit.plotting.expert_lines",
    "plot_lm_training": "moekit.plotting.lm",
    "plot_load": "moekit.plotting.routing",
    "plot_mixing_proportions": "moekit.plotting.partition",
    "plot_partition": "moekit.plotting.partition",
    "plot_predicted_vs_actual": "moekit.plotting.diagnostics",
    "plot_repeat_rates": "moekit.plotting.lm",
    "plot_routing_over_training": "moekit.plotting.routing",
    "plot_selectivity": "moekit.plotting.lm",
    "plot_training_curves": "moekit.plotting.curves",
    "plot_transitions": "moekit.plotting.lm",
    "save_figure": "moekit.plotting.style",
}

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


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

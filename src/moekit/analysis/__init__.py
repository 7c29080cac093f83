"""What the experts do: routing recorded over a data set with bounded memory
(:mod:`~moekit.analysis.recorder`, :mod:`~moekit.analysis.store`), its statistics
(:mod:`~moekit.analysis.stats`), agreement between two models (:mod:`~moekit.analysis.agreement`),
interventions on the routing (:mod:`~moekit.analysis.interventions`) and what they do to the task
(:mod:`~moekit.analysis.importance`), routing over training
(:mod:`~moekit.analysis.over_training`), and the routing of a language model's layers
(:mod:`~moekit.analysis.layer_stats`): its paths across layers
(:mod:`~moekit.analysis.layer_paths`), experts against token categories
(:mod:`~moekit.analysis.layer_categories`), consecutive tokens repeating an expert
(:mod:`~moekit.analysis.layer_repeats`), and two routings of the same tokens compared
(:mod:`~moekit.analysis.layer_overlap`)."""

from moekit.analysis.agreement import Agreement, routing_agreement
from moekit.analysis.importance import ImportanceRow, ImportanceTable, expert_importance
from moekit.analysis.interventions import ablate_expert, force_expert, intervene, scale_temperature
from moekit.analysis.layer_categories import CategoryTables, lift_table, top_lift_pairs
from moekit.analysis.layer_hooks import routing_hooks
from moekit.analysis.layer_interventions import (
    AblationTable,
    InterventionEffect,
    ablate_layer_experts,
    ablation_table,
    intervention_effect,
    steer_layer_experts,
)
from moekit.analysis.layer_overlap import (
    ExpertMatch,
    RoutingOverlap,
    Saturation,
    match_seed_experts,
    routing_saturation,
)
from moekit.analysis.layer_recorder import LayerRecording, record_layers
from moekit.analysis.layer_repeats import RepeatRates
from moekit.analysis.layer_replay import replay_layers
from moekit.analysis.layer_risk import RiskDifference, risk_difference
from moekit.analysis.layer_stats import LayerRoutingResult, LayerRoutingStats
from moekit.analysis.over_training import RoutingHistory, routing_summary
from moekit.analysis.recorder import (
                                      Recording,
                                      batch_routing,
                                      bin_names,
                                      iter_batches,
                                      record_routing,
                                      target_bin_edges,
)
from moekit.analysis.stats import (
                                      BatchRouting,
                                      RoutingStats,
                                      coefficient_of_variation,
                                      match_experts,
                                      max_over_mean,
                                      nmi_from_contingency,
)
from moekit.analysis.store import RoutingStore

__all__ = [
    "AblationTable",
    "Agreement",
    "BatchRouting",
    "CategoryTables",
    "ExpertMatch",
    "ImportanceRow",
    "ImportanceTable",
    "InterventionEffect",
    "LayerRecording",
    "LayerRoutingResult",
    "LayerRoutingStats",
    "Recording",
    "RepeatRates",
    "RiskDifference",
    "RoutingHistory",
    "RoutingOverlap",
    "RoutingStats",
    "RoutingStore",
    "Saturation",
    "ablate_expert",
    "ablate_layer_experts",
    "ablation_table",
    "batch_routing",
    "bin_names",
    "coefficient_of_variation",
    "expert_importance",
    "force_expert",
    "intervene",
    "intervention_effect",
    "iter_batches",
    "lift_table",
    "match_experts",
    "match_seed_experts",
    "max_over_mean",
    "nmi_from_contingency",
    "record_layers",
    "record_routing",
    "replay_layers",
    "risk_difference",
    "routing_agreement",
    "routing_hooks",
    "routing_saturation",
    "routing_summary",
    "scale_temperature",
    "steer_layer_experts",
    "target_bin_edges",
    "top_lift_pairs",
]

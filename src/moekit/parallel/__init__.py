"""Expert parallelism over torch.distributed: a :class:`~moekit.nn.sparse.SparseMoE` whose experts
are sharded over the ranks of an "ep" group, exactly one process's layer over the global batch.

Read bottom up: :mod:`~moekit.parallel.mesh` (the ep group, checked before any work),
:mod:`~moekit.parallel.exchange` (counts, capacity and the all-to-all row exchange),
:mod:`~moekit.parallel.global_losses` (auxiliary losses from statistics summed over the ranks),
:mod:`~moekit.parallel.expert_parallel` (the layer, :func:`shard_experts`).
"""

from moekit.parallel.exchange import ExchangePlan, plan_exchange, sum_over_ranks
from moekit.parallel.expert_parallel import ExpertParallelMoE, ExpertParallelOutput, shard_experts
from moekit.parallel.global_losses import global_aux_losses
from moekit.parallel.mesh import EP_DIM, ExpertGroup, check_divisible, resolve_group

__all__ = [
    "EP_DIM",
    "ExchangePlan",
    "ExpertGroup",
    "ExpertParallelMoE",
    "ExpertParallelOutput",
    "check_divisible",
    "global_aux_losses",
    "plan_exchange",
    "resolve_group",
    "shard_experts",
    "sum_over_ranks",
]

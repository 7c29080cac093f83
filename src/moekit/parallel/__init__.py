"""Expert parallelism over torch.distributed: a :class:`~moekit.nn.sparse.SparseMoE` whose experts
are sharded over the ranks of an "ep" group, exactly one process's layer over the global batch.

Read bottom up: :mod:`~moekit.parallel.mesh` (the ep group, checked before any work),
:mod:`~moekit.parallel.exchange` (counts, capacity and the all-to-all row exchange),
:mod:`~moekit.parallel.global_losses` (auxiliary losses from statistics summed over the ranks),
:mod:`~moekit.parallel.expert_parallel` (the layer, :func:`shard_experts`),
:mod:`~moekit.parallel.data_parallel` (a (dp, ep) mesh: experts over ep, the rest under DDP),
:mod:`~moekit.parallel.checkpoint` (checkpoints that reload at any EP size),
:mod:`~moekit.parallel.train` (the byte LM trained with expert parallelism: `moekit lm train-ep`).
"""

from moekit.parallel.checkpoint import (
    CheckpointInfo,
    checkpoint_to_model_folder,
    load_checkpoint,
    model_folder_to_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from moekit.parallel.data_parallel import DP_DIM, parallelize_moe, reduce_expert_grads
from moekit.parallel.exchange import ExchangePlan, plan_exchange, sum_over_ranks
from moekit.parallel.expert_parallel import ExpertParallelMoE, ExpertParallelOutput, shard_experts
from moekit.parallel.global_losses import global_aux_losses
from moekit.parallel.mesh import EP_DIM, ExpertGroup, check_divisible, resolve_group

__all__ = [
    "DP_DIM",
    "EP_DIM",
    "CheckpointInfo",
    "ExchangePlan",
    "ExpertGroup",
    "ExpertParallelMoE",
    "ExpertParallelOutput",
    "check_divisible",
    "checkpoint_to_model_folder",
    "global_aux_losses",
    "load_checkpoint",
    "model_folder_to_checkpoint",
    "parallelize_moe",
    "plan_exchange",
    "read_checkpoint_info",
    "reduce_expert_grads",
    "resolve_group",
    "save_checkpoint",
    "shard_experts",
    "sum_over_ranks",
]

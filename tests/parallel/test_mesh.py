"""The errors expert parallelism raises before any work, in one process (no process group)."""

import re

import pytest
import torch.distributed as dist

from moekit.nn.sparse import SparseMoE, SparseMoEConfig
from moekit.parallel import ExpertParallelMoE, check_divisible, shard_experts


def test_no_process_group_is_refused_with_the_fix():
    assert not dist.is_initialized()
    layer = SparseMoE(8, 4, hidden=8)
    message = ("ExpertParallelMoE: torch.distributed is not initialised, so there are no ranks to "
               "share the experts with. Call torch.distributed.init_process_group(backend='gloo')")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ExpertParallelMoE(layer)
    with pytest.raises(RuntimeError, match="not initialised"):
        shard_experts(layer)


def test_experts_not_divisible_by_the_ep_size():
    # 6 experts over 4 ranks: 6 % 4 = 2; the ep sizes that work are the divisors of 6.
    message = ("ExpertParallelMoE: n_experts=6 cannot be split evenly over an expert-parallel "
               "group of 4 ranks (6 % 4 = 2). Use an ep size that divides n_experts (1, 2, 3, 6), "
               "or n_experts a multiple of 4.")
    with pytest.raises(ValueError, match=re.escape(message)):
        check_divisible("ExpertParallelMoE", 6, 4)
    assert check_divisible("ExpertParallelMoE", 6, 3) == 2


def test_a_sharded_layer_is_not_built_from_a_config():
    with pytest.raises(TypeError, match=re.escape("ExpertParallelMoE(SparseMoE.from_config(")):
        ExpertParallelMoE.from_config(SparseMoEConfig(8, 4, 8))

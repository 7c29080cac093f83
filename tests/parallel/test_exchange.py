"""The exchange bookkeeping of expert parallelism, in one process (no process group): the worked
example, the global capacity rule against one process's dispatch, and the layer at world size 1."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moekit.nn.dispatch import plan_dispatch
from moekit.nn.outputs import Routing
from moekit.parallel import plan_exchange
from moekit.parallel.exchange import apply_capacity

sys.path.insert(0, str(Path(__file__).parent))
import ep_cases  # the cases the spawned tests run, here at world size 1


def test_worked_example_with_capacity():
    # 2 ranks, 4 experts: rank 0 owns experts 0, 1; rank 1 owns 2, 3. M = 11 assignments,
    # C = ceil(1.0 * 11 / 4) = 3. Rank 1's assignments to e come after rank 0's:
    # prefix = [[0, 0, 0, 0], [3, 0, 2, 1]]; kept = min(max(C - prefix, 0), counts).
    counts_WE = torch.tensor([[3, 0, 2, 1], [1, 2, 2, 0]])
    zero = plan_exchange([4, 3], counts_WE, 0, capacity_factor=1.0)
    one = plan_exchange([4, 3], counts_WE, 1, capacity_factor=1.0)
    assert zero.capacity == one.capacity == 3
    assert zero.kept_WE.tolist() == [[3, 0, 2, 1], [0, 2, 1, 0]]
    assert (zero.send_splits, zero.recv_splits, zero.recv_counts_L.tolist()) == ([3, 3], [3, 2],
                                                                                [3, 2])
    assert (one.send_splits, one.recv_splits, one.recv_counts_L.tolist()) == ([2, 1], [3, 1],
                                                                             [3, 1])
    # Rank 1 receives [e2, e2, e3] from rank 0 then [e2] from rank 1: expert-major order puts
    # rank 1's e2 row third (global row order inside each expert), then e3's.
    assert one.order_R.tolist() == [0, 1, 3, 2]
    assert one.order_R[one.restore_R].tolist() == [0, 1, 2, 3]
    assert (zero.row_offset, one.row_offset, one.n_global_rows) == (0, 4, 7)
    dropless = plan_exchange([4, 3], counts_WE, 1, capacity_factor=None)
    assert dropless.capacity is None and dropless.kept_WE.tolist() == counts_WE.tolist()


@pytest.mark.parametrize("world, k, capacity_factor", [(2, 2, 1.0), (4, 1, 1.25), (4, 2, 0.5),
                                                       (3, 3, 1.0)])
def test_global_capacity_drops_what_one_process_drops(gen, world, k, capacity_factor):
    """Split a batch over W ranks: each rank's kept and dropped assignments, with the global
    capacity, are exactly one process's, by global row."""
    n_experts, rows_W = 12, [int(n) for n in torch.randint(0, 9, (world,), generator=gen)]
    rows_W[0] += 1
    logits_NE = torch.randn(sum(rows_W), n_experts, generator=gen)
    experts_NK = logits_NE.topk(k, dim=-1).indices
    routing = Routing(torch.rand(experts_NK.shape, generator=gen), experts_NK,
                      torch.softmax(logits_NE, -1), logits_NE)
    one = plan_dispatch(routing, n_experts, capacity_factor=capacity_factor)
    parts = [Routing(*(t[sum(rows_W[:r]):sum(rows_W[:r + 1])] for t in
                       (routing.weights_NK, experts_NK, routing.probs_NE, logits_NE)))
             for r in range(world)]
    plans = [plan_dispatch(p, n_experts) for p in parts]
    counts_WE = torch.stack([p.counts_E for p in plans])
    kept, dropped = [], []
    for r, plan in enumerate(plans):
        exchange = plan_exchange(rows_W, counts_WE, r, capacity_factor=capacity_factor)
        local = apply_capacity(plan, exchange, r)
        assert local.counts_E.tolist() == exchange.kept_WE[r].tolist()
        kept += zip((local.rows_M + exchange.row_offset).tolist(), local.experts_M.tolist(),
                    strict=True)
        dropped += zip((local.dropped_rows + exchange.row_offset).tolist(),
                       local.dropped_experts.tolist(), strict=True)
    assert sorted(kept) == sorted(zip(one.rows_M.tolist(), one.experts_M.tolist(), strict=True))
    assert sorted(dropped) == sorted(zip(one.dropped_rows.tolist(), one.dropped_experts.tolist(),
                                         strict=True))
    assert counts_WE.sum(0).tolist() == torch.bincount(experts_NK.flatten(),
                                                       minlength=n_experts).tolist()


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process (no spawn), torn down after the test."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("case", [c.name for c in ep_cases.CASES])
def test_world_size_one_equals_one_process(one_process_group, case):
    case = ep_cases.CASES_BY_NAME[case]
    ep_cases.check_against_one_process(case, 1, [ep_cases.run_case(case, 0, 1)])

"""Expert parallelism over real process groups (gloo, spawn, 127.0.0.1), at world sizes 2 and 4:
every router, with and without capacity, with shared experts, equals one process's SparseMoE on the
global batch (outputs, auxiliary losses, drops, every gradient) in float64 to 1e-10; the bias update
equals one process's at every world size and micro-batching; misbuilt layers fail on every rank; a
rank that dies fails the others within the group's timeout.

One spawned group per world size runs every case (``ep_cases.worker``) and sends back its results;
the tests below compare them in this process.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ep_cases  # the workers must import it by this name in the spawned processes
from spawned import Results, result, spawn_and_collect

DEADLINE_S = 240  # the whole run of one world size; a hang fails here instead of blocking


def _run_world(world: int, store_dir: Path) -> Results:
    wanted = {(r, "done") for r in range(world)} | {(r, "dying_peer") for r in range(world - 1)}
    return spawn_and_collect(ep_cases.worker, world, (world, str(store_dir / "store")), wanted,
                             DEADLINE_S)


class World:
    def __init__(self, size: int, results: dict) -> None:
        self.size, self.results = size, results

    def get(self, rank: int, name: str):
        return result(self.results, rank, name, f"world size {self.size}, ")

    def ranks(self, name: str) -> list:
        return [self.get(rank, name) for rank in range(self.size)]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world(request, tmp_path_factory) -> World:
    size = request.param
    return World(size, _run_world(size, tmp_path_factory.mktemp(f"world{size}")))


@pytest.mark.parametrize("case", [c.name for c in ep_cases.CASES])
def test_equals_one_process(world, case):
    ep_cases.check_against_one_process(ep_cases.CASES_BY_NAME[case], world.size,
                                       world.ranks(case))


def test_bias_steps_from_the_global_counts_of_every_micro_batch(world):
    """Each rank ran two micro-batches per step; the bias after each step equals one process's
    on the whole global batch at once, and on it in two halves."""
    whole, halves = ep_cases.bias_layer(), ep_cases.bias_layer()
    local_only = ep_cases.bias_layer()  # what the old per-rank update would follow
    for step, rows in enumerate(ep_cases.bias_rows(world.size)):
        x = torch.cat(rows)
        whole(x)
        whole.router.step_bias()
        for half in x.chunk(2):
            halves(half)
        halves.router.step_bias()
        local_only(rows[0])
        local_only.router.step_bias()
        np.testing.assert_array_equal(halves.router.bias_E.numpy(), whole.router.bias_E.numpy())
        for rank, got in enumerate(world.ranks("bias")):
            np.testing.assert_array_equal(got["biases"][step], whole.router.bias_E.numpy(),
                                          err_msg=f"rank {rank}, step {step}")
    assert whole.router.bias_E.abs().sum() > 0
    assert not torch.equal(local_only.router.bias_E, whole.router.bias_E)


def test_global_views_and_shard_experts(world):
    layer = ep_cases.build_layer(ep_cases.CASES_BY_NAME["topk"])
    want = {k: v.numpy() for k, v in layer.state_dict().items()}
    for got in world.ranks("extras"):
        for name, value in got["dtensor_full"].items():
            np.testing.assert_array_equal(value, want[f"experts.{name}"])
        assert got["full_layer"].keys() == want.keys()
        for name, value in got["full_layer"].items():
            np.testing.assert_array_equal(value, want[name], err_msg=name)
        assert got["stack"] == ["ExpertParallelMoE", "ExpertParallelMoE"]


@pytest.mark.parametrize("name, message", [
    ("not_divisible", ("ExpertParallelMoE: n_experts={e} cannot be split evenly over an "
                       "expert-parallel group of {w} ranks")),
    ("mismatched_layers", ("the ranks of the expert-parallel group disagree on n_experts "
                           "(rank 0: {e2}, rank 1: {w}")),
    ("mesh_without_ep", "the mesh has dimensions ('dp',) and none is named 'ep'")])
def test_misbuilt_layers_fail_on_every_rank(world, name, message):
    w = world.size
    expected = message.format(e=w + 1, w=w, e2=2 * w)
    for rank, got in enumerate(world.ranks(f"error:{name}")):
        assert got.startswith("ValueError: ") and expected in got, (rank, got)


def test_a_dying_rank_fails_its_peers_within_the_timeout(world):
    for rank in range(world.size - 1):
        got = world.get(rank, "dying_peer")
        assert got["error"], f"rank {rank} ran on without its peer"
        assert got["seconds"] < ep_cases.GROUP_TIMEOUT_S + 10, got

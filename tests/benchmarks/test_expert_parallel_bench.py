"""benchmarks/expert_parallel.py's bookkeeping, without a process group: the bytes formula (a
worked example, and against moekit's own exchange plan), the summaries and the table."""

import doctest
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import expert_parallel as bench

from moekit.parallel import plan_exchange


def test_the_docstring_examples():
    assert doctest.testmod(bench, raise_on_error=False).failed == 0


def test_bytes_of_a_worked_example():
    # 2 ranks, 4 experts (rank 0 owns 0-1, rank 1 owns 2-3), D = 3, float64 (8 bytes):
    # rank 0 routes 2 + 1 assignments to rank 1's experts, rank 1 routes 0 + 4 to rank 0's.
    counts_WE = torch.tensor([[1, 0, 2, 1], [0, 4, 5, 0]])
    row = 3 * 8
    rank0 = bench.exchange_bytes(counts_WE, 0, 3, 8)
    rank1 = bench.exchange_bytes(counts_WE, 1, 3, 8)
    assert rank0["dispatch"] == 3 * row and rank0["combine"] == 4 * row
    assert rank1["dispatch"] == 4 * row and rank1["combine"] == 3 * row
    assert rank0["counts"] == rank1["counts"] == 1 * (1 + 4) * 8  # one peer, (rows, 4 counts)
    assert rank0["forward"] == 40 + 7 * row and rank0["backward"] == 7 * row
    assert rank0["step"] == 40 + 14 * row


def test_one_rank_sends_nothing():
    assert bench.exchange_bytes(torch.tensor([[3, 0, 5, 2]]), 0, 256, 4) == {
        "counts": 0, "dispatch": 0, "combine": 0, "forward": 0, "backward": 0, "step": 0}


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_agree_with_the_exchange_plan(world):
    """The formula reads the count table; ExpertParallelMoE sends plan_exchange's splits: the
    rows off rank must agree, and what all ranks send in dispatch all comes back in combine."""
    counts_WE = torch.randint(0, 7, (world, 8), generator=torch.Generator().manual_seed(world))
    rows_W = [int(c) for c in counts_WE.sum(1)]
    dispatched = combined = 0
    for rank in range(world):
        plan = plan_exchange(rows_W, counts_WE, rank, capacity_factor=None)
        got = bench.exchange_bytes(counts_WE, rank, 5, 4)
        sent = sum(s for j, s in enumerate(plan.send_splits) if j != rank)
        received = sum(s for j, s in enumerate(plan.recv_splits) if j != rank)
        assert got["dispatch"] == sent * 5 * 4 and got["combine"] == received * 5 * 4
        dispatched, combined = dispatched + got["dispatch"], combined + got["combine"]
    assert dispatched == combined > 0


def test_summaries_take_the_slowest_rank_and_the_median():
    assert bench.slowest_rank([{"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 2.0}]) == {"a": 3.0,
                                                                             "b": 5.0}
    assert bench.summarize([0.003, 0.001, 0.002]) == pytest.approx(
        {"median_ms": 2.0, "min_ms": 1.0, "max_ms": 3.0})


def test_the_table_has_a_row_per_phase_and_the_ratios():
    def phase(ms: float) -> dict[str, float]:
        return {"median_ms": ms, "min_ms": ms, "max_ms": ms}

    def size(scale: float, b: dict[str, int]) -> dict:
        s = {f"{p}_fwd": phase(scale) for p in bench.PHASES}
        s |= {f"{p}_bwd": phase(2 * scale) for p in bench.PHASES if p != "counts"}
        s |= {"layer_fwd": phase(5 * scale), "layer_bwd": phase(8 * scale),
              "staged_total": phase(14 * scale), "bytes_per_rank": b}
        return s

    zero = bench.exchange_bytes(torch.tensor([[1, 1]]), 0, 4, 4)
    two = bench.exchange_bytes(torch.tensor([[1, 1], [1, 1]]), 0, 256, 4)
    meta = {"d_model": 256, "hidden": 512, "n_experts": 2, "top_k": 1, "tokens": 2,
            "dtype": "float32", "repeats": 1, "torch": "x", "load_before": 0.5,
            "load_after": 0.7}
    table = bench.markdown({1: size(1.0, zero), 2: size(3.0, two)}, meta)
    rows = [line for line in table.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == len(bench.PHASES) + 2
    # experts at W = 2: 3 ms forward, 6 ms backward, 9 / 42 of the step, 3x W = 1; 1 KiB each way
    assert "| 2 | experts | 3.0 (3.0-3.0) | 6.0 (6.0-6.0) | 21% | 3.00 | - |" in rows
    assert "| 2 | counts | 3.0 (3.0-3.0) | - | 7% | 3.00 | 24 B |" in rows
    assert "| 2 | dispatch | 3.0 (3.0-3.0) | 6.0 (6.0-6.0) | 21% | 3.00 | 2.00 KiB |" in rows
    assert "load average 0.50 before, 0.70 after" in table

"""compute_threads: one thread for small steps, the idle cores otherwise, the previous count put
back, and a caller's own choice (an argument, OMP_NUM_THREADS, torch.set_num_threads) kept."""

import pytest
import torch

import moekit.threads as threads
from moekit.threads import SMALL_STEP, caller_chose_threads, choose_threads, compute_threads


@pytest.fixture(autouse=True)
def no_thread_variables(monkeypatch):
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_small_steps_run_on_one_thread_and_the_count_is_restored():
    before = torch.get_num_threads()
    with compute_threads(None, step_multiply_adds=SMALL_STEP / 10) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_large_steps_take_the_idle_cores_at_most_torchs_count(monkeypatch):
    monkeypatch.setattr(threads, "_TORCH_THREADS_AT_IMPORT", 4)
    monkeypatch.setattr(threads, "idle_cores", lambda: 2.7)
    assert choose_threads(SMALL_STEP * 10) == 3
    monkeypatch.setattr(threads, "idle_cores", lambda: 0.2)  # a busy machine: still one
    assert choose_threads(SMALL_STEP * 10) == 1
    monkeypatch.setattr(threads, "idle_cores", lambda: 64.0)
    assert choose_threads(SMALL_STEP * 10) == 4


def test_an_explicit_count_is_used_and_restored():
    before = torch.get_num_threads()
    with compute_threads(2) as n:
        assert n == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_a_thread_variable_in_the_environment_is_the_callers_choice(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert caller_chose_threads()
    before = torch.get_num_threads()
    with compute_threads(None, step_multiply_adds=1.0) as n:
        assert n == before == torch.get_num_threads()


def test_a_count_set_after_import_is_the_callers_choice():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    torch.set_num_threads(other)
    try:
        assert caller_chose_threads()
        with compute_threads(None, step_multiply_adds=SMALL_STEP * 100) as n:
            assert n == other
    finally:
        torch.set_num_threads(before)


def test_the_count_is_restored_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), compute_threads(2 if before == 1 else 1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_count_is_refused_naming_it(bad):
    bad_count = compute_threads(bad)
    with pytest.raises(ValueError, match=r"threads must be a positive integer.*got threads="):
        bad_count.__enter__()


def test_idle_cores_is_a_share_of_this_process_cores():
    assert 0.0 <= threads.idle_cores() <= threads._cores() + 1e-9

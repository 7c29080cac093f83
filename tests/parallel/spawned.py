"""One spawned process group per test module: start the workers, collect what they send back, and
never hang (the parent gives up at a deadline and kills what is left).

A worker is ``target(rank, *args, results_queue)`` and puts ``(rank, name, value, error)`` tuples
on the queue (``error``: a formatted traceback, or None); the tests compare the values here.
"""

import multiprocessing as mp
import queue as queue_module
import time
from collections.abc import Callable

import pytest

Results = dict[tuple[int, str], tuple[object, str | None]]


def spawn_and_collect(target: Callable, world: int, args: tuple, wanted: set[tuple[int, str]],
                      deadline_s: float) -> Results:
    """Start ``world`` spawned workers and collect their messages until every (rank, name) of
    ``wanted`` has come, every worker has exited, or ``deadline_s`` has passed; then join them,
    killing any still alive."""
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, *args, results_queue), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    results: Results = {}
    deadline = time.monotonic() + deadline_s
    while not wanted <= results.keys() and time.monotonic() < deadline:
        try:
            rank, name, value, error = results_queue.get(timeout=2)
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        results[(rank, name)] = (value, error)
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return results


def result(results: Results, rank: int, name: str, where: str = "") -> object:
    """What ``rank`` sent as ``name``; the test fails with the worker's traceback if it failed or
    sent nothing."""
    value, error = results.get((rank, name), (None, f"rank {rank} sent no {name!r}"))
    if error is not None:
        pytest.fail(f"{where}rank {rank}, {name}:\n{error}")
    return value

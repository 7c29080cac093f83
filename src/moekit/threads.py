"""How many threads moekit's own fits compute on: chosen for the work, never over a caller's choice.

Why: torch uses one thread per core by default. For the small tensors of a tabular mixture that is
barely faster on a quiet machine and several times slower on a busy one, where the threads of one
operation wait for a core that another process holds (measured on 2 cores, benchmarks/RESULTS.md:
a 256-row Adam step 1.27 ms on one thread against 1.06 ms on two when quiet, 1.31 ms against 4.03 ms
with one other busy process; 16,384 rows 47 against 30 ms quiet, 50 against 92 ms busy).

So :func:`compute_threads` uses one thread for steps under :data:`SMALL_STEP` multiply-adds, and
otherwise the cores that are idle now (read from ``/proc/stat`` over a few milliseconds; the
1-minute load average elsewhere), at most torch's own count. It sets the count for the duration of
a ``with`` block and puts the previous one back. A caller who chose a count is left alone: an
explicit ``threads`` argument, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment, or a
``torch.set_num_threads`` call after moekit was imported.

Example:
    >>> from moekit.threads import compute_threads
    >>> with compute_threads(1) as n:
    ...     n
    1
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_STEP = 8e6  # multiply-adds per step below which one thread is as fast as two, or faster
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_TORCH_THREADS_AT_IMPORT = torch.get_num_threads()
_SAMPLE_SECONDS = 0.02


def caller_chose_threads() -> bool:
    """Whether the process's thread count is someone's choice: a thread variable in the
    environment, or a count other than the one torch had when moekit was imported."""
    return (any(os.environ.get(name) for name in THREAD_VARIABLES)
            or torch.get_num_threads() != _TORCH_THREADS_AT_IMPORT)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait


def idle_cores() -> float:
    """How many of this process's cores are idle now (fractional)."""
    cores = _cores()
    before = _cpu_times()
    if before is not None:
        time.sleep(_SAMPLE_SECONDS)
        after = _cpu_times()
        if after is not None and after[0] > before[0]:
            return cores * (after[1] - before[1]) / (after[0] - before[0])
    try:
        return max(0.0, cores - os.getloadavg()[0])
    except (AttributeError, OSError):
        return float(cores)


def choose_threads(step_multiply_adds: float) -> int:
    """The thread count for steps of ``step_multiply_adds``: one for small steps, else the idle
    cores (rounded, at least one), at most torch's count at import."""
    if step_multiply_adds < SMALL_STEP:
        return 1
    return max(1, min(_TORCH_THREADS_AT_IMPORT, math.floor(idle_cores() + 0.5)))


@contextmanager
def compute_threads(threads: int | None = None, step_multiply_adds: float = 0.0
                    ) -> Iterator[int]:
    """Compute on ``threads`` threads inside the block (None: :func:`choose_threads`, unless the
    caller chose a count, which is kept); the previous count is restored on exit.

    Yields the count in use.
    """
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (chosen for the work); "
                         f"got threads={threads!r}. E.g. threads=1.")
    previous = torch.get_num_threads()
    if threads is None:
        threads = previous if caller_chose_threads() else choose_threads(step_multiply_adds)
    if threads == previous:
        yield threads
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)

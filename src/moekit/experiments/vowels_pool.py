"""Run the jobs of `moekit vowels` (:mod:`moekit.experiments.vowels_jobs`) side by side: in this
process when one is enough, else in a :class:`concurrent.futures.ProcessPoolExecutor` of spawned
workers, each on one thread, the highest-priority job first, releasing the jobs that wait on a
result as it comes back.

Workers are spawned, not forked: a fork of a process that has run torch can hang in its thread
pool. Each keeps freed memory in its heap (:func:`moekit.runtime.keep_freed_memory`): an epoch
frees a few dozen tensors of up to 16 MB, which glibc would hand back to the system and page-fault
in again the next epoch (the backprop nets' explorations ran 1.4x as fast). Progress comes back
through a queue: each job's runs finished, and the expected work done over the whole run.

Start-up: a worker imports torch and the training modules (about 1 s; plotting, SciPy and the
reports only in the jobs that draw or analyse). :class:`Workers` starts them before the jobs'
inputs exist, so they import while this process builds the task; and once a worker has nothing
left to do, ``on_idle`` (the caller's imports for what follows the jobs) runs beside the last jobs.

Ctrl-C (the terminal sends it to every process of the run): a running job stops at once and the
pool shuts down; a worker still starting, or between two jobs, leaves quietly (:func:`_ctrl_c_held`,
:func:`_start_worker`), so the command ends within seconds with its one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moekit.data.vowels import VowelTask
from moekit.experiments.vowels import VowelsConfig
from moekit.experiments.vowels_jobs import Job, choose_processes, jobs_after, output_jobs, run_job
from moekit.runtime import keep_freed_memory

POLL_SECONDS = 0.1  # how often the parent relays the workers' progress

_WORKER: dict[str, Any] = {}  # in a worker: "progress", its queue to the parent


class _Bars:
    """The progress bars: one per job running, counting its runs finished (no time estimate:
    an exploration's runs finish in bursts), and one for the whole run, counting the expected
    work of the jobs done (:attr:`Job.cost`), whose time estimate is the honest one."""

    def __init__(self, enabled: bool, jobs: list[Job]) -> None:
        self.enabled = enabled
        self.n_jobs, self.n_done = len(jobs), 0
        self.total = tqdm(total=sum(j.cost for j in jobs), desc="moekit vowels",
                          disable=not enabled, leave=False,
                          bar_format="{desc}: {percentage:3.0f}% of the expected work |{bar}| "
                                     "[{elapsed}<{remaining}{postfix}]")
        self.total.set_postfix_str(f"0/{self.n_jobs} jobs")
        self.bars: dict[str, tqdm] = {}

    def start(self, job: Job) -> None:
        self.bars[job.key] = tqdm(  # the solver comparison reports no runs
            total=job.runs, desc=f"  {job.label}",
            disable=not self.enabled or job.kind == "solvers", leave=False,
            bar_format="{desc}: {n}/{total} runs finished |{bar}| [{elapsed}{postfix}]")

    def update(self, key: str, finished: int, epoch: int) -> None:
        bar = self.bars.get(key)
        if bar is not None:
            bar.update(finished - bar.n)
            bar.set_postfix_str(f"epoch {epoch}", refresh=False)

    def done(self, job: Job, released: list[Job]) -> None:
        self.bars.pop(job.key).close()
        self.n_jobs += len(released)
        self.n_done += 1
        self.total.total += sum(j.cost for j in released)
        self.total.set_postfix_str(f"{self.n_done}/{self.n_jobs} jobs", refresh=False)
        self.total.update(job.cost)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.total.close()


class _Plan:
    """The jobs waiting and the results so far; what each result releases."""

    def __init__(self, jobs: list[Job], config: VowelsConfig, out: Path | None) -> None:
        self.waiting, self.config, self.out = list(jobs), config, out
        self.released = {j.key for j in jobs}
        self.results: dict[str, Any] = {}

    def take(self) -> Job:
        job = max(self.waiting, key=lambda j: j.priority)
        self.waiting.remove(job)
        return job

    def finish(self, job: Job, result: Any) -> list[Job]:
        """Keep ``result``; the jobs it releases (now waiting)."""
        self.results[job.key] = result
        lr = getattr(result, "lr", None)
        new = jobs_after(job, self.config, lr) if lr is not None else []
        new += output_jobs(self.results, self.config, self.out,
                           self.released | {j.key for j in new})
        self.released |= {j.key for j in new}
        self.waiting += new
        return new


class Workers:
    """``processes`` worker processes, started now (each import takes about 1 s) for
    :func:`run_jobs`; shut down on leaving the ``with`` block, the jobs still queued cancelled."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes = processes
        with _ctrl_c_held():  # the queues start multiprocessing's resource tracker, a process too
            self.progress = context.Queue()
            self.pool = ProcessPoolExecutor(processes, mp_context=context,
                                            initializer=_start_worker, initargs=(self.progress,))
        # a block of its own: starting the tracker unblocks Ctrl-C in this thread (its own start)
        with _ctrl_c_held():  # a spawned pool starts a worker per call submitted, each with
            for _ in range(processes):  # Ctrl-C held until it is ready (_start_worker)
                self.pool.submit(_ready)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:  # after Ctrl-C the running jobs have stopped too
        try:  # (_run_in_worker); after an error, they end before it is raised
            self.pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self.progress.close()


def run_jobs(jobs: list[Job], task: VowelTask, config: VowelsConfig, *,
             processes: int | None = None, out: Path | None = None,
             workers: Workers | None = None,
             on_idle: Callable[[], object] | None = None) -> dict[str, Any]:
    """Run ``jobs`` and the jobs their results release (:func:`jobs_after`; with a folder
    ``out``, :func:`output_jobs` too) in ``processes`` worker processes (None:
    :func:`choose_processes`; 1: in this process), or in ``workers`` started beforehand; each
    job's result by its key. A job's error is raised here, once the jobs running beside it have
    stopped. ``on_idle`` runs once, in a thread of this process, when a worker first has no job
    left to take (its errors are ignored: the caller meets them again when it does the work).

    Example:
        >>> from moekit.data.vowels import vowel_task
        >>> from moekit.experiments.vowels import quick_config
        >>> from moekit.experiments.vowels_jobs import first_jobs
        >>> config = quick_config(runs=1, hidden=(), compare_solvers=False, readings=False,
        ...                       compare_losses=False, progress=False)
        >>> sorted(run_jobs(first_jobs(config), vowel_task(), config, processes=1))
        ['own 4 Experts', 'own 8 Experts', 'own control']
    """
    if workers is not None:
        processes = workers.processes
    elif processes is None:
        processes = choose_processes(config, len(jobs))
    plan, bars = _Plan(jobs, config, out), _Bars(config.progress, jobs)
    quiet = dataclasses.replace(config, progress=False)  # the bars here show progress
    try:
        if processes <= 1:
            _run_here(plan, bars, task, quiet)
        elif workers is not None:
            _run_in_workers(plan, bars, task, quiet, workers, on_idle)
        else:
            with Workers(processes) as started:
                _run_in_workers(plan, bars, task, quiet, started, on_idle)
    finally:
        bars.close()
    return plan.results


def _run_here(plan: _Plan, bars: _Bars, task: VowelTask, config: VowelsConfig) -> None:
    while plan.waiting:
        job = plan.take()
        bars.start(job)
        result = run_job(job, task, config, lambda f, e, key=job.key: bars.update(key, f, e))
        bars.done(job, plan.finish(job, result))


def _run_in_workers(plan: _Plan, bars: _Bars, task: VowelTask, config: VowelsConfig,
                    workers: Workers, on_idle: Callable[[], object] | None) -> None:
    running: dict[Future, Job] = {}
    idle: threading.Thread | None = None
    try:
        while plan.waiting or running:
            while plan.waiting and len(running) < workers.processes:
                job = plan.take()
                bars.start(job)
                with _ctrl_c_held():  # a worker starting here does not see Ctrl-C until ready
                    running[workers.pool.submit(_run_in_worker, job, task, config)] = job
            if on_idle is not None and idle is None and len(running) < workers.processes:
                idle = threading.Thread(target=_quietly, args=(on_idle,), daemon=True)
                idle.start()
            finished, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            _relay(workers.progress, bars)
            for future in finished:
                job = running.pop(future)
                bars.done(job, plan.finish(job, future.result()))
    finally:
        if idle is not None:  # not left running: an import cut short at exit is not safe
            idle.join()


def _quietly(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):  # the caller meets the error again (run_jobs)
        call()


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C for the block, then act on it. A worker spawned inside starts with SIGINT
    blocked (a thread's signal mask passes to the processes it starts), so a Ctrl-C during its
    start-up reaches this process alone; once started, a worker takes Ctrl-C only while it runs a
    job (:func:`_start_worker`). None prints a traceback from its start-up or between two jobs.
    Here the Python handler is swapped too: other threads (torch's) may take the signal."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not \
            threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt


def _relay(progress: Any, bars: _Bars) -> None:
    """Show the progress the workers reported since the last call."""
    while True:
        try:
            key, finished, epoch = progress.get_nowait()
        except queue.Empty:
            return
        bars.update(key, finished, epoch)


def _start_worker(progress: Any) -> None:
    _WORKER["progress"] = progress
    keep_freed_memory()  # run_job computes on one thread
    if hasattr(signal, "pthread_sigmask"):  # started with SIGINT held (_ctrl_c_held)
        if signal.SIGINT in signal.sigpending():  # Ctrl-C during the start-up: the parent
            os._exit(130)                          # stops; leave without a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # between jobs: the parent stops the pool
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _ready() -> None:
    """A worker's first call (:class:`Workers`): it has started."""


def _run_in_worker(job: Job, task: VowelTask, config: VowelsConfig) -> Any:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the job at once
    try:
        return run_job(job, task, config, lambda f, e: _WORKER["progress"].put((job.key, f, e)))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


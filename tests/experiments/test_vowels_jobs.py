"""The trainings of `moekit vowels` as jobs: the plan, what waits on what, and the same numbers
whether one process or two run them."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moekit.data.vowels import vowel_task
from moekit.experiments import vowels_jobs
from moekit.experiments.vowels import VowelsConfig, quick_config
from moekit.experiments.vowels_jobs import (
    choose_processes,
    first_jobs,
    jobs_after,
)
from moekit.experiments.vowels_pool import Workers, run_jobs


def test_the_default_plan_and_what_its_first_results_release():
    config = VowelsConfig()
    jobs = first_jobs(config)
    keys = [j.key for j in jobs]
    assert keys == ["own 4 Experts", "own 8 Experts", "own BP 6 Hid", "own BP 12 Hid",
                    "own control", "loss 4 Experts (eq1)", "loss 4 Experts (eq2)",
                    "common 4 Experts", "common 8 Experts", "common BP 6 Hid", "common BP 12 Hid",
                    "common 1 Expert (no gate)"]
    assert [j.runs for j in jobs] == [325] * 7 + [25] * 5
    # Figure 3 tracks run 0 of the largest mixture
    assert [j.key for j in jobs if j.track_epochs] == ["own 8 Experts"]
    # reading (c) and the solvers wait on the smallest mixture's step, which starts first
    smallest = jobs[0]
    assert max(jobs, key=lambda j: j.priority) is smallest
    assert smallest.priority > smallest.cost == jobs[5].cost  # 325 runs of 4 experts, as Eq. 1's
    released = jobs_after(smallest, config, 11.3137)
    assert [(j.key, j.steps) for j in released] == [("sigmoid", (1.0, 11.3137)),
                                                    ("solvers", (11.3137,))]
    assert released[0].system.expert_head == "sigmoid" and released[1].runs == 5
    assert all(jobs_after(j, config, 1.0) == [] for j in jobs[1:])


def test_options_remove_their_jobs():
    config = VowelsConfig(readings=False, compare_losses=False, compare_solvers=False)
    jobs = first_jobs(config)
    assert [j.key for j in jobs] == ["own 4 Experts", "own 8 Experts", "own BP 6 Hid",
                                     "own BP 12 Hid", "own control"]
    assert jobs_after(jobs[0], config, 8.0) == []
    nets_only = first_jobs(VowelsConfig(experts=(), compare_losses=False))
    assert [j.key for j in nets_only] == ["own BP 6 Hid", "own BP 12 Hid", "common BP 6 Hid",
                                          "common BP 12 Hid"]


def test_a_small_run_stays_in_one_process(monkeypatch):
    assert choose_processes(quick_config(), 14) == 1
    monkeypatch.setattr(vowels_jobs, "caller_chose_threads", lambda: False)
    monkeypatch.setattr(vowels_jobs.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert choose_processes(VowelsConfig(), 14) == 2
    assert choose_processes(VowelsConfig(), 1) == 1


def _small():
    return quick_config(runs=2, hidden=(6,), experts=(2,), max_epochs=60, compare_losses=False,
                        compare_solvers=False, progress=False)


def _numbers(results):
    """Every number of every result, for an exact comparison."""
    out = {}
    for key, value in results.items():
        for i, r in enumerate(value if isinstance(value, list) else [value]):
            if hasattr(r, "epochs_R"):
                out[f"{key}/{i}"] = (r.lr, r.epochs_R.tolist(), r.curves_RT.tobytes(),
                                     [{k: v.numpy().tobytes() for k, v in m.state_dict().items()}
                                      for m in r.models])
            else:  # a solver row: everything but its wall times
                out[f"{key}/{i}"] = {k: v for k, v in vars(r).items() if "seconds" not in k}
    return out


def test_one_process_or_two_give_the_same_numbers(tmp_path):
    """The jobs of a small run, once in this process and once with a worker process: every
    result the same to the last bit (one thread per job wherever it runs). Given a folder, the
    figures and the analyses of the saved mixtures are jobs too."""
    task, config = vowel_task(), _small()
    jobs = first_jobs(config)
    alone = run_jobs(jobs, task, config, processes=1)
    assert set(alone) == {j.key for j in jobs} | {"sigmoid"}
    beside = run_jobs(jobs, task, config, processes=2, out=tmp_path)
    assert set(beside) == set(alone) | {"figures", "analysis"}
    assert all(path.is_file() for path in beside["figures"].values())
    saved, analyses, files = beside.pop("analysis")
    beside.pop("figures")
    assert [m["name"] for m in saved["models"]] == ["2_experts"] and set(analyses) == {"2_experts"}
    assert all(path.is_file() for path in files.values())
    assert _numbers(beside) == _numbers(alone)
    assert torch.get_num_threads() >= 1  # the caller's count is put back


def test_a_worker_imports_what_training_needs_and_no_more():
    """A worker process imports moekit.experiments.vowels_pool before its first job: plotting,
    SciPy, pandas, scikit-learn, the analysis and the reports (1.4 s, more than torch itself) wait
    for the jobs that draw or analyse."""
    heavy = ("matplotlib", "scipy", "pandas", "sklearn", "moekit.analysis", "moekit.reports",
             "moekit.plotting.style", "moekit.experiments.vowels_sweep")
    code = ("import sys, moekit.experiments.vowels_pool\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "[]"


def test_workers_started_beforehand_run_the_jobs_and_the_idle_call_runs_once():
    task, config = vowel_task(), _small()
    jobs = first_jobs(config)[:1]  # one job (it releases 'sigmoid') for two workers
    calls = []
    with Workers(2) as workers:
        beside = run_jobs(jobs, task, config, workers=workers, on_idle=lambda: calls.append(1))
    assert set(beside) == {jobs[0].key, "sigmoid"}
    assert _numbers(beside) == _numbers(run_jobs(jobs, task, config, processes=1))
    assert calls == [1]  # a worker had no job to take from the start: once, not per job


def test_an_error_in_a_job_is_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no luck")

    monkeypatch.setattr(vowels_jobs, "run_system", broken)
    config = _small()
    with pytest.raises(RuntimeError, match="no luck"):
        run_jobs(first_jobs(config), vowel_task(), config, processes=1)


def test_a_job_that_fails_in_a_worker_is_raised_here():
    config = _small()
    bogus = [vowels_jobs.Job(f"bogus {i}", "bogus", None, runs=1, cost=1.0) for i in range(2)]
    with pytest.raises(ValueError, match=r"job.kind must be one of .*; got 'bogus'"):
        run_jobs(bogus, vowel_task(), config, processes=2)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signals")
@pytest.mark.parametrize("after_s", [0.3, 2.0, 8.0],
                         ids=["command-starting", "workers-starting", "jobs-running"])
def test_ctrl_c_stops_the_workers_at_once_without_a_traceback(tmp_path, after_s):
    """Ctrl-C goes to the terminal's whole process group: while the command itself starts (torch
    loads after the command can report an interrupt: it aborted in C++ before), while the worker
    processes start (they hold it) and while they run jobs, the run ends within seconds with the
    one-line message, no worker's traceback, and no process left behind."""
    out = tmp_path / "vowels"
    command = [sys.executable, "-m", "moekit", "vowels", "--no-progress", "--out", str(out)]
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a child would inherit that
        pytest.skip("SIGINT is ignored here (a background job)")
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)  # its own group, as a terminal's job
    time.sleep(after_s)
    sent = time.monotonic()
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert run.returncode == 130 and "Traceback" not in err.decode(), err.decode()
    assert err.decode().strip().endswith("moekit vowels: error: interrupted; nothing was written")
    assert not out.exists()
    assert _group_gone(run.pid, within_s=5.0)  # workers and multiprocessing's resource tracker


def _group_gone(group: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False

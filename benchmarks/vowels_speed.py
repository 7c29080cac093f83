"""Speed of `moekit vowels`: the full default run, batched runs against a loop of single runs, and
one epoch of the stacked engine's fast path against its reference.

    .venv/bin/python benchmarks/vowels_speed.py [--repeats 3] [--epochs 200] [--skip-full]

Protocol (../shared/BENCHMARKS.md): fixed thread count, a warm-up, interleaved repeats, median and
spread, the 1-minute load average before and after. Same work on both sides of every comparison:
- batched against loops: 25 runs of the 4-expert mixture, the same initial weights and step, a
  fixed number of full-batch epochs (the criterion is set out of reach so that no run stops early);
- one epoch: the losses, stop metrics and gradients of R runs, by autograd through
  ``StackedMixtureEngine.errors`` (the reference) and by ``errors_and_grads`` (the fast path, the
  same numbers bit for bit), one thread;
- the full default run (``--full-repeats`` times, interleaved): its jobs in one process, then in
  one process per core (:mod:`moekit.experiments.vowels_pool`); the same results bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from moekit import TrainConfig, fit
from moekit.data.vowels import vowel_task
from moekit.experiments.vowels import System, VowelsConfig
from moekit.experiments.vowels_run import run_vowels
from moekit.fitting.objective import prepare_targets
from moekit.fitting.replicate_engines import StackedMixtureEngine
from moekit.fitting.replicates import ReplicateConfig, train_replicates
from moekit.threads import compute_threads

RUNS = 25
EPOCH_CASES = (("mixture", 4, 25), ("mixture", 8, 25), ("backprop", 12, 25),
               ("mixture", 4, 325), ("mixture", 8, 325), ("backprop", 12, 325))


def _models(dtype, system=None, runs=RUNS):
    system = system or System("mixture", 4, "eq3")
    return [system.build(torch.Generator().manual_seed(r), dtype) for r in range(runs)]


def batched(engine: str, task, epochs: int, dtype) -> None:
    config = ReplicateConfig(max_epochs=epochs, stop_metric="mse", stop_threshold=1e-9,
                             progress=False)
    train_replicates(_models(dtype), task.x_train.to(dtype), task.y_train, [1.0] * RUNS, config,
                     engine=engine)


def loop_of_replicates(task, epochs: int, dtype) -> None:
    config = ReplicateConfig(max_epochs=epochs, stop_metric="mse", stop_threshold=1e-9,
                             progress=False)
    for model in _models(dtype):
        train_replicates([model], task.x_train.to(dtype), task.y_train, [1.0], config)


def loop_of_fit(task, epochs: int, dtype) -> None:
    config = TrainConfig(loss="eq3", lr=1.0, max_epochs=epochs, progress=False)
    for model in _models(dtype):
        fit(model, task.x_train.to(dtype), task.y_train, config)


def _median(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def epoch_timings(task, repeats: int) -> list[dict[str, object]]:
    """Milliseconds per epoch (losses, metrics, gradients of every run) of the reference and the
    fast path, one thread, interleaved."""
    rows = []
    x = task.x_train.float()
    with compute_threads(1):
        for kind, size, n_runs in EPOCH_CASES:
            system = System(kind, size, "eq3")
            targets = prepare_targets("bench", "y", task.y_train, out_features=4,
                                      loss="mixture_nll", dtype=torch.float32)
            engine = StackedMixtureEngine(_models(torch.float32, system, n_runs), x, targets,
                                          "mixture_nll", 1.0, "mse")
            rows_R = torch.arange(n_runs)

            def reference(engine=engine, rows_R=rows_R):
                work = {k: v.detach().requires_grad_(True) for k, v in engine.params.items()}
                loss_R, _ = engine.errors(work, rows_R)
                torch.autograd.grad(loss_R.sum(), list(work.values()))

            def fast(engine=engine, rows_R=rows_R):
                engine.errors_and_grads(engine.params, rows_R)

            times: dict[str, list[float]] = {"reference": [], "fast": []}
            n = max(5, 2000 // n_runs)
            for f in (reference, fast):
                f()
            for _ in range(repeats):
                for name, f in (("reference", reference), ("fast", fast)):
                    start = time.perf_counter()
                    for _ in range(n):
                        f()
                    times[name].append((time.perf_counter() - start) / n * 1e3)
            ref, fst = _median(times["reference"]), _median(times["fast"])
            rows.append({"system": system.name, "runs": n_runs,
                         "chunk_runs": engine.chunk_runs(n_runs), "reference_ms": ref[0],
                         "fast_ms": fst[0], "speedup": ref[0] / fst[0]})
            print(f"  {system.name:<10} R={n_runs:<4} chunks of {engine.chunk_runs(n_runs):<4} "
                  f"reference {ref[0]:7.2f} ms ({ref[1]:.2f}-{ref[2]:.2f})  fast {fst[0]:7.2f} ms "
                  f"({fst[1]:.2f}-{fst[2]:.2f})  {ref[0] / fst[0]:4.2f}x")
    return rows


def full_runs(repeats: int) -> list[dict[str, object]]:
    """The full default run, its jobs in one process and in one per core, interleaved."""
    record = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for _ in range(repeats):
        for processes in (1, cores):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            outcome = run_vowels(VowelsConfig(out="runs/bench-vowels", progress=False),
                                 processes=processes)
            seconds = time.perf_counter() - start
            record.append({"processes": processes, "seconds_total": seconds,
                           "seconds_jobs": outcome.seconds, "load_before": load,
                           "load_after": os.getloadavg()[0]})
            print(f"  {processes} process(es): {seconds:.1f} s ({outcome.seconds:.1f} s of jobs); "
                  f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true",
                        help="skip the full `moekit vowels` runs")
    parser.add_argument("--full-repeats", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/vowels_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32
    task = vowel_task()
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load_before:.2f}")

    variants = {
        "batched, stacked engine": lambda: batched("stacked", task, args.epochs, dtype),
        "batched, vmap engine": lambda: batched("vmap", task, args.epochs, dtype),
        "loop of single runs (train_replicates, R=1)":
            lambda: loop_of_replicates(task, args.epochs, dtype),
        "loop of single runs (fit)": lambda: loop_of_fit(task, args.epochs, dtype),
    }
    batched("stacked", task, 5, dtype)  # warm-up
    batched("vmap", task, 5, dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved: A B C D A B C D ...
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["batched, stacked engine"])
    print(f"\n{RUNS} runs x {args.epochs} epochs of the 4-expert mixture, float32, median of "
          f"{args.repeats} (min-max):")
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "median_s": median, "min_s": min(values),
                     "max_s": max(values), "vs_stacked": median / base})
        print(f"  {name:<46} {median:7.2f} s ({min(values):.2f}-{max(values):.2f})  "
              f"{median / base:5.1f}x the stacked engine's time")

    print("\nOne epoch (losses, stop metrics and gradients of every run), one thread, median of "
          f"{args.repeats} interleaved (min-max): autograd through errors (reference) against "
          "errors_and_grads (fast path, the same numbers bit for bit)")
    epochs = epoch_timings(task, args.repeats)

    full = None
    if not args.skip_full:
        print(f"\nfull default `moekit vowels` (4 systems x 25 runs, exploration of "
              f"{len(VowelsConfig().lr_grid)} steps, readings, Eq. 1/2 comparison, solvers, "
              "figures, report), in-process:")
        full = full_runs(args.full_repeats)

    load_after = os.getloadavg()[0]
    print(f"\nload average before {load_before:.2f}, after {load_after:.2f}")
    record = {"torch": torch.__version__, "threads": args.threads, "epochs": args.epochs,
              "runs": RUNS, "repeats": args.repeats, "variants": rows, "epoch": epochs,
              "full_default_run": full, "load_before": load_before, "load_after": load_after,
              "python": sys.version.split()[0]}
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

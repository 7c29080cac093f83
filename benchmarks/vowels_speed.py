"""Speed of `moekit vowels`: the full default run, and batched runs against a loop of single runs.

    .venv/bin/python benchmarks/vowels_speed.py [--repeats 3] [--epochs 200] [--skip-full]

Protocol (../shared/BENCHMARKS.md): fixed thread count, a warm-up, interleaved repeats, median and
spread, the 1-minute load average before and after. All variants do the same work: 25 runs of the
4-expert mixture, the same initial weights and step, a fixed number of full-batch epochs (the
criterion is set out of reach so that no run stops early).
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
from moekit.fitting.replicates import ReplicateConfig, train_replicates

RUNS = 25


def _models(dtype):
    system = System("mixture", 4, "eq3")
    return [system.build(torch.Generator().manual_seed(r), dtype) for r in range(RUNS)]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true",
                        help="skip the full `moekit vowels` run")
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

    full = None
    if not args.skip_full:
        start = time.perf_counter()
        outcome = run_vowels(VowelsConfig(out="runs/bench-vowels", progress=False))
        full = {"seconds_total": time.perf_counter() - start, "seconds_training": outcome.seconds}
        print(f"\nfull default `moekit vowels` (4 systems x 25 runs, exploration of "
              f"{len(VowelsConfig().lr_grid)} steps, Eq. 1/2 comparison, figures, report): "
              f"{full['seconds_total']:.1f} s ({outcome.seconds:.1f} s training)")

    load_after = os.getloadavg()[0]
    print(f"\nload average before {load_before:.2f}, after {load_after:.2f}")
    record = {"torch": torch.__version__, "threads": args.threads, "epochs": args.epochs,
              "runs": RUNS, "repeats": args.repeats, "variants": rows, "full_default_run": full,
              "load_before": load_before, "load_after": load_after,
              "python": sys.version.split()[0]}
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

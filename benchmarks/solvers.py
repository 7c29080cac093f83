"""Solvers compared: passes over the data and wall time to reach the same training criterion.

    .venv/bin/python benchmarks/solvers.py [--quick] [--runs 5] [--threads 2]

The paper's gradient descent, Adam, L-BFGS, EM and EM with the localized Gaussian gate, on the 1991
vowel task and on a piecewise-linear regression, from the same initial weights
(:mod:`moekit.experiments.solvers` says exactly what is counted). Prints a markdown table and writes
benchmarks/solvers.json. Protocol (../shared/BENCHMARKS.md): fixed thread count, one warm-up call of
every solver, the 1-minute load average before and after (a loaded machine voids the timings; the
pass counts do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from moekit.experiments.solver_config import SolversConfig, quick_config
from moekit.experiments.solvers import compare_solvers, comparison_record, format_table, pass_ratio
from moekit.io import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per solver, small caps")
    parser.add_argument("--runs", type=int, default=None, help="initial weights per solver")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/solvers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {} if args.runs is None else {"runs": args.runs}
    config = quick_config(**overrides) if args.quick else SolversConfig(**overrides)
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load_before:.2f}")

    start = time.perf_counter()
    rows = compare_solvers(config)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    print()
    print(format_table(rows))
    ratio = pass_ratio(rows, "vowels")
    if ratio is not None:
        verdict = "met" if ratio >= 10 else "NOT met"
        print(f"\nTarget (EM >= 10x fewer passes than the paper's gradient descent on the vowels): "
              f"{verdict} ({ratio:.1f}x).")
    print(f"\n{seconds:.1f} s in all; load average before {load_before:.2f}, "
          f"after {load_after:.2f}")

    record = {"torch": torch.__version__, "threads": args.threads, "python": sys.version.split()[0],
              "machine": platform.platform(), "seconds": seconds, "load_before": load_before,
              "load_after": load_after, **comparison_record(config, rows)}
    write_text_atomic(args.json, json.dumps(record, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""The subcommands of the paper and its demos: `moekit vowels`, `moekit vowels-sweep`,
`moekit demo`, `moekit compare-solvers`. Each builds its --out folder beside it and puts it in place
whole at the end, replacing the previous run there (:func:`moekit.io.run_folder.run_folder`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.cli.args import float_list, int_list, list_of
from moekit.io.run_folder import run_folder


def add_vowels(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "vowels", allow_abbrev=False,
        help="reproduce Jacobs et al. (1991) Table 1 and Figures 2-3 on Peterson & Barney",
        description="Mixtures of 4 and 8 linear experts against backprop nets with 6 and 12 hidden "
                    "units on the Peterson & Barney vowels [i] [I] [a] [\u039b], 25 runs each, "
                    "the paper's protocol; writes the table, results.json, figures and "
                    "report.html.")
    p.add_argument("--runs", type=int, help="runs per system (default 25; 3 with --quick)")
    p.add_argument("--experts", type=int_list, help="mixture sizes (default 4,8)")
    p.add_argument("--hidden", type=int_list, help="backprop hidden sizes (default 6,12)")
    p.add_argument("--seed", type=int, help="seed of the initial weights (default 0)")
    p.add_argument("--lr", type=float,
                   help="one fixed step for every system (skips the exploration)")
    p.add_argument("--lr-grid", type=float_list,
                   help="steps to explore (default x sqrt 2 from 0.5 to 32: 0.5,0.7071,1,...,32)")
    p.add_argument("--expert-head", choices=("softmax", "identity", "sigmoid"),
                   help="the experts' outputs: a class distribution (default) or linear/logistic")
    p.add_argument("--criterion", type=float,
                   help="stop at this average squared error (default 0.08)")
    p.add_argument("--average", choices=("unit", "case"),
                   help="average the squared error per output unit (default) or per case")
    p.add_argument("--max-epochs", type=int, help="epoch cap per run (default 5000)")
    p.add_argument("--loss", choices=("eq1", "eq2", "eq3"),
                   help="mixture error function (default eq3)")
    p.add_argument("--gate-init", choices=("zero", "uniform", "fan-in"),
                   help="the gate's start: zero (default: equal proportions, the paper's unbiased "
                        "start), uniform (U(-0.1, 0.1)) or fan-in (nn.Linear's range)")
    p.add_argument("--backprop-error", choices=("half", "full"),
                   help="backprop nets' error: half (default: 1/2 ||d - o||^2, Eq. 3 for one "
                        "expert) or full (||d - o||^2)")
    p.add_argument("--t-test", choices=("pooled", "welch"),
                   help="variance of the t-tests: pooled (default, the paper's: 48 df) or welch")
    p.add_argument("--common-step", type=float,
                   help="reading (b): every system at this one step (default 1)")
    p.add_argument("--no-readings", action="store_true",
                   help="skip readings (b) and (c) beside Table 1")
    p.add_argument("--no-loss-comparison", action="store_true",
                   help="skip the Eq. 1 / Eq. 2 / Eq. 3 comparison")
    p.add_argument("--no-solver-comparison", action="store_true",
                   help="skip the comparison with Adam, L-BFGS and EM")
    p.add_argument("--include-speaker-76", action="store_true",
                   help="add speaker 76 to the test set")
    p.add_argument("--dtype", choices=("float32", "float64"), help="precision (default float32)")
    p.add_argument("--out", help="output folder (default runs/vowels)")
    p.add_argument("--quick", action="store_true", help="a debug-sized run in a few seconds")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run_vowels)


_VOWELS_OPTIONS = {"runs": "runs", "experts": "experts", "hidden": "hidden", "seed": "seed",
                   "lr": "lr", "lr_grid": "lr_grid", "criterion": "criterion",
                   "average": "average", "max_epochs": "max_epochs", "loss": "loss",
                   "dtype": "dtype", "out": "out", "expert_head": "expert_head",
                   "gate_init": "gate_init", "backprop_error": "backprop_error",
                   "t_test": "t_test", "common_step": "common_step"}


def _run_vowels(args: argparse.Namespace) -> int:
    from moekit.experiments.vowels import VowelsConfig, quick_config
    from moekit.experiments.vowels_run import run_vowels

    given = {field: getattr(args, arg) for arg, field in _VOWELS_OPTIONS.items()
             if getattr(args, arg) is not None}
    given.update(readings=not args.no_readings, compare_losses=not args.no_loss_comparison,
                 compare_solvers=not args.no_solver_comparison,
                 include_speaker_76=args.include_speaker_76, progress=not args.no_progress)
    config = quick_config(**given) if args.quick else VowelsConfig(**given)
    outcome = run_vowels(config)
    print(outcome.table_text)
    print("\n" + outcome.readings_text)
    if outcome.loss_rows:
        print("\nError functions (each at its own best step):")
        for r in outcome.loss_rows:
            print(f"  {r.system:<18} step {r.lr:<5g} {r.reached}/{r.runs} reached  "
                  f"{r.epochs:7.0f} epochs  train {r.train:5.1f}%  test {r.test:5.1f}%  "
                  f"experts per case {r.experts_per_case:.2f}")
    if outcome.solver_rows:
        from moekit.experiments.solvers import format_table

        print("\nSolvers to the same criterion, from the same initial weights:")
        print(format_table(outcome.solver_rows))
    print("\nThe paper's claims on this run:")
    for c in outcome.claims:
        print(f"  [{c.verdict}] {c.claim}\n      {c.evidence}")
    print(f"\nRan in {outcome.seconds:.1f} s. Wrote:")
    for path in outcome.files.values():
        print(f"  {path}")
    return 0


def add_vowels_sweep(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "vowels-sweep", allow_abbrev=False,
        help="how often the experts divide the vowels as the paper's Figure 2, over what the "
             "paper leaves open",
        description="Mixtures of linear experts on the vowel task over every combination of the "
                    "experts' initial weight scale (0.3, 1, 3), the step (1, 4, 11.3), the "
                    "experts' head (softmax, sigmoid) and the gate's input scale (1, 10); per "
                    "setting: runs reaching the criterion, active experts and how the experts "
                    "divide the vowels at the stopping point. Writes sweep.json, sweep.md and, if "
                    "a run divides them as Figure 2, the Figure 2 and 3 analogues of that run.",
        epilog="example: moekit vowels-sweep --runs 5 --out runs/vowels_sweep")
    p.add_argument("--runs", type=int, help="runs per setting (default 10; 2 with --quick)")
    p.add_argument("--experts", type=int, help="experts per mixture (default 4)")
    p.add_argument("--seed", type=int, help="seed of the initial weights (default 0)")
    p.add_argument("--out", default="runs/vowels_sweep",
                   help="output folder (default runs/vowels_sweep)")
    p.add_argument("--quick", action="store_true", help="a debug-sized sweep in a few seconds")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run_vowels_sweep)


def _run_vowels_sweep(args: argparse.Namespace) -> int:
    from moekit.experiments.vowels_sweep import SweepConfig, quick_sweep, write_sweep

    given = {name: getattr(args, name) for name in ("runs", "experts", "seed")
             if getattr(args, name) is not None}
    given["progress"] = not args.no_progress
    config = quick_sweep(**given) if args.quick else SweepConfig(**given)
    with run_folder(args.out, "vowels-sweep", overwrite=True, older=("sweep.json",)) as build:
        text, files = write_sweep(config, build)
    print(text)
    print("\nWrote:")
    for path in files:
        print(f"  {Path(args.out) / path.relative_to(build)}")
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", allow_abbrev=False,
        help="fit a small mixture of linear experts and print what each expert took",
        description="Fit a mixture of linear experts to a 1-D function with three straight pieces "
                    "(breaks at 1/3 and 2/3) and print which piece each expert took.",
    )
    p.add_argument("--experts", type=int, default=4, help="number of experts (default 4)")
    p.add_argument("--epochs", type=int, default=1000, help="training epochs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from moekit.experiments.piecewise import BREAKS, PIECES, DemoConfig, run_demo

    with run_folder(args.out, "demo", overwrite=True, older=("results.json",)) as build:
        config = DemoConfig(n_experts=args.experts, epochs=args.epochs, seed=args.seed,
                            out=args.out, progress=not args.no_progress)
        result = run_demo(config, build)
    truth = "; ".join(f"y = {a:+.2f} x {b:+.2f}" for a, b in PIECES)
    print(f"True function: {truth}  (breaks at x = {', '.join(f'{b:.3f}' for b in BREAKS)})")
    print(f"Fitted {config.n_experts} linear experts in {result.epochs} epochs "
          f"({result.stop_reason}); training squared error per case {result.train_sse:.4f}\n")
    print(f"{'expert':>6}  {'share':>6}  {'x range it took':>17}  {'its line':>22}")
    for s in result.experts:
        where = f"[{s.x_min:.3f}, {s.x_max:.3f}]" if s.x_min is not None else "-"
        line = f"y = {s.slope:+.2f} x {s.intercept:+.2f}"
        note = "" if s.active else "  (inactive: the gate gives it almost no rows)"
        print(f"{s.expert:>6}  {s.share:>6.1%}  {where:>17}  {line:>22}{note}")
    print(f"\nWrote {args.out}/results.json and the model to {args.out}/model")
    return 0


def add_compare_solvers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare-solvers", allow_abbrev=False,
        help="gradient descent, Adam, L-BFGS, EM and EM with the Gaussian gate, to one criterion",
        description="Passes over the data and wall time each solver needs to reach the same "
                    "training criterion, from the same initial weights: the vowel task (the "
                    "paper's criterion) and a 1-D regression with three straight pieces.",
        epilog="example: moekit compare-solvers --runs 5 --out runs/solvers")
    p.add_argument("--tasks", type=list_of(str, "task names", "vowels,piecewise"),
                   help="vowels and/or piecewise (default both)")
    p.add_argument("--runs", type=int,
                   help="initial weights per solver (default 5; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="runs/solvers", help="folder for solvers.json and solvers.md")
    p.add_argument("--quick", action="store_true", help="a debug-sized comparison in seconds")
    p.set_defaults(func=_run_compare_solvers)


def _run_compare_solvers(args: argparse.Namespace) -> int:
    from moekit.experiments.solver_config import SolversConfig, quick_config
    from moekit.experiments.solvers import write_comparison

    given = {"seed": args.seed}
    if args.tasks:
        given["tasks"] = args.tasks
    if args.runs:
        given["runs"] = args.runs
    config = quick_config(**given) if args.quick else SolversConfig(**given)
    with run_folder(args.out, "compare-solvers", overwrite=True, older=("solvers.json",)) as build:
        table, files = write_comparison(config, build)
    print(table)
    print("\nWrote " + " and ".join(str(Path(args.out) / f.relative_to(build)) for f in files))
    return 0

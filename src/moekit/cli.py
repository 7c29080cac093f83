"""The `moekit` command: a thin layer over the Python API.

Exit codes: 0 success, 2 usage error, 1 data error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from moekit._version import __version__

EPILOG = """examples:
  moekit vowels                    reproduce Jacobs et al. (1991) Table 1 and Figures 2-3
  moekit vowels --quick            the same, debug-sized (a few seconds)
  moekit demo                      fit a 4-expert mixture to a 3-piece line, show what each expert took
  moekit demo --experts 6 --seed 3 --out runs/demo6
  moekit fit data.csv --target label --experts auto --out runs/mine
  moekit predict runs/mine new.csv --proba --out predictions.csv
  moekit report runs/mine
  moekit analyze runs/vowels       routing statistics, interventions and figures for each saved model
  moekit compare-solvers           passes to the paper's criterion: gradient descent, Adam, L-BFGS, EM
"""


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", allow_abbrev=False, help="fit a small mixture of linear experts and print what each expert took",
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

    config = DemoConfig(n_experts=args.experts, epochs=args.epochs, seed=args.seed, out=args.out,
                        progress=not args.no_progress)
    result = run_demo(config)
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
    print(f"\nWrote {result.out}/results.json and the model to {result.out}/model")
    return 0


def _list_of(cast: type, what: str, example: str):
    """An argparse type for comma-separated values, e.g. ``--experts 4,8``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, e.g. {example}; got {text!r}") from None

    return parse


_int_list = _list_of(int, "integers", "4,8")
_float_list = _list_of(float, "numbers", "1,2,4")


def _add_vowels(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "vowels", allow_abbrev=False,
        help="reproduce Jacobs et al. (1991) Table 1 and Figures 2-3 on Peterson & Barney",
        description="Mixtures of 4 and 8 linear experts against backprop nets with 6 and 12 hidden "
                    "units on the Peterson & Barney vowels [i] [I] [a] [\u039b], 25 runs each, "
                    "the paper's protocol; writes the table, results.json, figures and report.html.")
    p.add_argument("--runs", type=int, help="runs per system (default 25; 3 with --quick)")
    p.add_argument("--experts", type=_int_list, help="mixture sizes (default 4,8)")
    p.add_argument("--hidden", type=_int_list, help="backprop hidden sizes (default 6,12)")
    p.add_argument("--seed", type=int, help="seed of the initial weights (default 0)")
    p.add_argument("--lr", type=float, help="one fixed step for every system (skips the exploration)")
    p.add_argument("--lr-grid", type=_float_list, help="steps to explore (default 0.5,1,2,4)")
    p.add_argument("--expert-head", choices=("softmax", "identity", "sigmoid"),
                   help="the experts' outputs: a class distribution (default) or linear/logistic")
    p.add_argument("--criterion", type=float, help="stop at this average squared error (default 0.08)")
    p.add_argument("--average", choices=("unit", "case"),
                   help="average the squared error per output unit (default) or per case")
    p.add_argument("--max-epochs", type=int, help="epoch cap per run (default 5000)")
    p.add_argument("--loss", choices=("eq1", "eq2", "eq3"), help="mixture error function (default eq3)")
    p.add_argument("--no-loss-comparison", action="store_true",
                   help="skip the Eq. 1 / Eq. 2 / Eq. 3 comparison")
    p.add_argument("--no-solver-comparison", action="store_true",
                   help="skip the comparison with Adam, L-BFGS and EM")
    p.add_argument("--include-speaker-76", action="store_true", help="add speaker 76 to the test set")
    p.add_argument("--dtype", choices=("float32", "float64"), help="precision (default float32)")
    p.add_argument("--out", help="output folder (default runs/vowels)")
    p.add_argument("--quick", action="store_true", help="a debug-sized run in a few seconds")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run_vowels)


_VOWELS_OPTIONS = {"runs": "runs", "experts": "experts", "hidden": "hidden", "seed": "seed",
                   "lr": "lr", "lr_grid": "lr_grid", "criterion": "criterion",
                   "average": "average", "max_epochs": "max_epochs", "loss": "loss",
                   "dtype": "dtype", "out": "out", "expert_head": "expert_head"}


def _run_vowels(args: argparse.Namespace) -> int:
    from moekit.experiments.vowels import VowelsConfig, quick_config
    from moekit.experiments.vowels_run import run_vowels

    given = {field: getattr(args, arg) for arg, field in _VOWELS_OPTIONS.items()
             if getattr(args, arg) is not None}
    given.update(compare_losses=not args.no_loss_comparison,
                 compare_solvers=not args.no_solver_comparison,
                 include_speaker_76=args.include_speaker_76, progress=not args.no_progress)
    config = quick_config(**given) if args.quick else VowelsConfig(**given)
    outcome = run_vowels(config)
    print(outcome.table_text)
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


def _auto_or(convert: Callable[[str], float], expected: str, minimum: float | None = None
             ) -> Callable[[str], float | str]:
    """An argparse type taking 'auto' or a number that ``convert`` reads (at least ``minimum``)."""
    def parse(text: str) -> float | str:
        if text == "auto":
            return text
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or (minimum is not None and not value >= minimum):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value
    return parse


_experts = _auto_or(int, "a number of experts or 'auto'")
_alpha = _auto_or(float, "'auto' or a number >= 0", minimum=0.0)


def _add_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit", allow_abbrev=False, help="fit a mixture of experts to a CSV file",
        description="Fit a mixture of experts to a CSV file (a header row, one column the target); "
                    "save the model, summary.json and report.html in --out.",
        epilog="example: moekit fit data.csv --target label --experts auto --out runs/mine")
    p.add_argument("data", metavar="DATA.csv", help="the table, with a header row")
    p.add_argument("--target", required=True, help="the column to predict")
    p.add_argument("--task", choices=("classify", "regress"),
                   help="default: classify text and integer targets with at most 20 values")
    p.add_argument("--experts", type=_experts, default=4, help="number of experts, or 'auto' (BIC)")
    p.add_argument("--expert", choices=("auto", "linear", "mlp"), default="auto",
                   help="expert kind (default auto: mlp, or linear with --solver em)")
    p.add_argument("--hidden", type=int, default=64, help="hidden units of an mlp expert (default 64)")
    p.add_argument("--loss", choices=("nll", "competitive", "cooperative"), default="nll")
    p.add_argument("--solver", choices=("gd", "adam", "lbfgs", "em"), default="adam",
                   help="gd (the paper's), adam (default), lbfgs, or em (linear experts)")
    p.add_argument("--gate", choices=("softmax", "gaussian"), default="softmax",
                   help="softmax (the paper's) or gaussian (localized; needs --solver em)")
    p.add_argument("--lr", type=float, default=0.01, help="step size (default 0.01)")
    p.add_argument("--alpha", type=_alpha, default="auto",
                   help="L2 penalty on the weights, or 'auto' (default): c / training rows, "
                        "c = 2, or 0.5 where it scores better on held-out rows by over one SE")
    p.add_argument("--max-epochs", type=int, default=500, help="epoch cap (default 500)")
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="rows held out to score the model (default 0.2; 0 for none)")
    p.add_argument("--one-hot", action="store_true", help="encode text feature columns as 0/1 columns")
    p.add_argument("--missing", choices=("error", "drop", "impute"), default="error",
                   help="missing values: stop with an error (default), drop the rows, or impute")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="runs/fit", help="run folder (default runs/fit)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_fit)


def _run_fit(args: argparse.Namespace) -> int:
    from moekit.experiments.fit_run import FitRunConfig, run_fit

    config = FitRunConfig(
        data=args.data, target=args.target, out=args.out, task=args.task, n_experts=args.experts,
        expert=args.expert, hidden=args.hidden, loss=args.loss, solver=args.solver,
        gate=args.gate, lr=args.lr, alpha=args.alpha,
        max_epochs=args.max_epochs, validation_fraction=args.validation_fraction,
        one_hot=args.one_hot, missing=args.missing, seed=args.seed, overwrite=args.overwrite,
        progress=not args.no_progress)
    s = run_fit(config).summary
    plural = "s" if s["n_experts"] != 1 else ""
    print(f"Fitted {s['n_experts']} expert{plural} ({s['task']}) to {s['rows']} rows x "
          f"{len(s['inputs'])} inputs in {s['epochs']} epochs ({s['stop_reason']}), {s['seconds']} s.")
    val = "-" if s["validation_score"] is None else f"{s['validation_score']:.4f}"
    print(f"{s['score_name']}: training {s['train_score']:.4f}, validation {val} "
          f"({s['validation_rows']} rows)")
    if curve := s["alpha_curve"]:
        losses = ", ".join(f"c={c:g}: {v:.4f}" for c, v in
                           zip(curve["alpha_candidates"], curve["val_loss"], strict=True))
        print(f"alpha {s['alpha']:.3g}: the strongest prior c / rows within one SE of the "
              f"lowest held-out loss ({losses})")
    print(f"\n{'expert':>6}  {'mean proportion':>15}  {'leads':>7}")
    for r in s["expert_loads"]:
        print(f"{r['expert']:>6}  {r['mean_proportion']:>15.3f}  {r['argmax_share']:>7.1%}")
    print(f"\nWrote {args.out}/model, {args.out}/summary.json and {args.out}/report.html")
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", allow_abbrev=False, help="predict a CSV file with a fitted run",
        description="Predict every row of a CSV file (the columns the model was fitted on) with a "
                    "`moekit fit` run; without --out the predictions go to stdout as CSV.",
        epilog="example: moekit predict runs/mine new.csv --proba --out predictions.csv")
    p.add_argument("run", metavar="RUN", help="the --out folder of `moekit fit`")
    p.add_argument("data", metavar="DATA.csv", help="the rows to predict")
    p.add_argument("--proba", action="store_true", help="add each class's probability")
    p.add_argument("--out", help="write the predictions to this CSV file")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from moekit.experiments.fit_run import predict_run

    outcome = predict_run(args.run, args.data, proba=args.proba, out=args.out)
    if outcome.path is None:
        sys.stdout.write(outcome.predictions.to_csv(index=False))
    else:
        print(f"Wrote {len(outcome.predictions)} predictions to {outcome.path}", file=sys.stderr)
    if outcome.score is not None:
        print(f"{outcome.score_name} against the target column: {outcome.score:.4f}", file=sys.stderr)
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", allow_abbrev=False, help="rewrite the HTML report of a fitted run",
        description="Rewrite RUN/report.html from the saved model and its data.",
        epilog="example: moekit report runs/mine")
    p.add_argument("run", metavar="RUN", help="the --out folder of `moekit fit`")
    p.add_argument("--data", help="the CSV to report on (default: the one it was fitted on)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from moekit.experiments.fit_run import report_run

    print(f"Wrote {report_run(args.run, args.data)}")
    return 0


def _add_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze", allow_abbrev=False, help="what each expert does: routing statistics, interventions",
        description="Analyse the routing of every model in a `moekit vowels` or `moekit fit` run "
                    "folder: loads, entropy, dead experts, expert by class, KL(h || p), agreement "
                    "between runs, and the effect of removing or forcing each expert. Writes "
                    "RUN/analysis/<model>/analysis.json and analysis.html.",
        epilog="examples:\n  moekit analyze runs/vowels\n  moekit analyze runs/mine --data new.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="the --out folder of `moekit vowels` or `moekit fit`")
    p.add_argument("--data", help="for a `moekit fit` run: the CSV to analyse on (default: the "
                                  "one it was fitted on)")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from moekit.experiments.analyze import summary_sentences
    from moekit.experiments.analyze_run import analyze_run

    for model in analyze_run(args.run, args.data):
        print(f"{model.name}:")
        for sentence in summary_sentences(model.stats):
            print(f"  {sentence}")
        print(f"  Wrote {model.directory}/analysis.json and {model.directory}/analysis.html\n")
    return 0


def _add_compare_solvers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare-solvers", allow_abbrev=False,
        help="gradient descent, Adam, L-BFGS, EM and EM with the Gaussian gate, to one criterion",
        description="Passes over the data and wall time each solver needs to reach the same "
                    "training criterion, from the same initial weights: the vowel task (the "
                    "paper's criterion) and a 1-D regression with three straight pieces.",
        epilog="example: moekit compare-solvers --runs 5 --out runs/solvers")
    p.add_argument("--tasks", type=_list_of(str, "task names", "vowels,piecewise"),
                   help="vowels and/or piecewise (default both)")
    p.add_argument("--runs", type=int, help="initial weights per solver (default 5; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="runs/solvers", help="folder for solvers.json and solvers.md")
    p.add_argument("--quick", action="store_true", help="a debug-sized comparison in seconds")
    p.set_defaults(func=_run_compare_solvers)


def _run_compare_solvers(args: argparse.Namespace) -> int:
    from moekit.experiments.solvers import SolversConfig, quick_config, write_comparison

    given = {"seed": args.seed}
    if args.tasks:
        given["tasks"] = args.tasks
    if args.runs:
        given["runs"] = args.runs
    config = quick_config(**given) if args.quick else SolversConfig(**given)
    table, files = write_comparison(config, args.out)
    print(table)
    print("\nWrote " + " and ".join(str(f) for f in files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Mixtures of experts: fit, reproduce Jacobs et al. (1991), "
                                   "and see what each expert learned.",
        epilog=EPILOG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_vowels(subparsers)
    _add_demo(subparsers)
    _add_fit(subparsers)
    _add_predict(subparsers)
    _add_report(subparsers)
    _add_analyze(subparsers)
    _add_compare_solvers(subparsers)
    return parser


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("experts", "hidden", "epochs", "runs", "max_epochs", "lr", "criterion", "lr_grid"):
        value = getattr(args, name, None)
        if value == "auto":
            continue
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and (not values or any(v <= 0 for v in values)):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be > 0; got {value}. Example: moekit {args.command} "
                         f"{flag} {'4' if name != 'lr_grid' else '1,2,4'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nmoekit: error: give a command, e.g. `moekit demo`", file=sys.stderr)
        return 2
    _check_positive(parser, args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"moekit: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

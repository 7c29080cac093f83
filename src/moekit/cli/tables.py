"""The subcommands on a user's own table: `moekit fit`, `predict`, `report` and `analyze` (which
also reads a `moekit vowels` run)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from moekit.cli import args as types

# `moekit fit` options whose defaults are FitRunConfig's (the estimators'): flag dest -> field.
MODEL_OPTIONS = {"experts": "n_experts", "expert": "expert", "hidden": "hidden", "loss": "loss",
                 "solver": "solver", "gate": "gate", "lr": "lr", "alpha": "alpha",
                 "max_epochs": "max_epochs", "validation_fraction": "validation_fraction",
                 "seed": "seed", "out": "out"}


def fit_defaults() -> dict[str, object]:
    """FitRunConfig's defaults, which are the estimators': read when needed (it imports
    scikit-learn), so that `moekit --help` stays fast."""
    from moekit.runs.fit import FitRunConfig

    return {f.name: f.default for f in dataclasses.fields(FitRunConfig)
            if f.default is not dataclasses.MISSING}


class ConfigDefaults(argparse.HelpFormatter):
    """Help that shows each model option's default, taken from FitRunConfig when help is printed
    (the options themselves default to None: FitRunConfig fills what is not given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.dest in MODEL_OPTIONS:
            text += f" (default {fit_defaults()[MODEL_OPTIONS[action.dest]]})"
        return text


def add_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit", allow_abbrev=False, help="fit a mixture of experts to a CSV file",
        description="Fit a mixture of experts to a CSV file (a header row, one column the target); "
                    "save the model, summary.json and report.html in --out. The model's options "
                    "default to those of moekit's scikit-learn estimators. The run is built "
                    "beside --out and put in place whole at the end: an interrupted run never "
                    "looks complete, and --resume continues it.",
        epilog="example: moekit fit data.csv --target label --experts auto --out runs/mine",
        formatter_class=ConfigDefaults)
    p.add_argument("data", metavar="DATA.csv", help="the table, with a header row")
    p.add_argument("--target", required=True, help="the column to predict")
    p.add_argument("--task", choices=("classify", "regress"),
                   help="default: classify text and integer targets with at most 20 values")
    p.add_argument("--experts", type=types.experts,
                   help="number of experts, or 'auto': the fewest whose held-out loss is within "
                        "one standard error of the lowest (BIC with --solver em)")
    p.add_argument("--expert", choices=("auto", "linear", "mlp"),
                   help="expert kind (auto: mlp, or linear with --solver em)")
    p.add_argument("--hidden", type=int, help="hidden units of an mlp expert")
    p.add_argument("--loss", choices=("nll", "competitive", "cooperative"), help="error function")
    p.add_argument("--solver", choices=("gd", "adam", "lbfgs", "em"),
                   help="gd (the paper's), adam, lbfgs, or em (linear experts)")
    p.add_argument("--gate", choices=("softmax", "gaussian"),
                   help="softmax (the paper's) or gaussian (localized; needs --solver em)")
    p.add_argument("--lr", type=float, help="step size")
    p.add_argument("--alpha", type=types.alpha,
                   help="L2 penalty on the weights, or 'auto': c / training rows, c = 2, or 0.5 "
                        "where it scores better on held-out rows by over one SE")
    p.add_argument("--max-epochs", type=int, help="epoch cap")
    p.add_argument("--validation-fraction", type=float,
                   help="rows held out to score the model (0 for none)")
    p.add_argument("--one-hot", action="store_true",
                   help="encode text feature columns as 0/1 columns")
    p.add_argument("--missing", choices=("error", "drop", "impute"), default="error",
                   help="missing values: stop with an error (default), drop the rows, or impute")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--out", help="run folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (only a moekit run), or start again "
                        "instead of resuming an interrupted one")
    p.add_argument("--resume", action="store_true",
                   help="continue the fit a kill or Ctrl-C interrupted, from its last checkpoint "
                        "(kept in .OUT.partial beside --out), with the same options and data")
    p.add_argument("--threads", type=types.positive_int,
                   help="threads to compute on (default: one for small steps, else the idle "
                        "cores; OMP_NUM_THREADS is respected)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run_fit)


def _run_fit(args: argparse.Namespace) -> int:
    from moekit.runs.fit import FitRunConfig, run_fit

    given = {field: getattr(args, dest) for dest, field in MODEL_OPTIONS.items()
             if getattr(args, dest) is not None}
    config = FitRunConfig(data=args.data, target=args.target, task=args.task,
                          one_hot=args.one_hot, missing=args.missing, overwrite=args.overwrite,
                          resume=args.resume, progress=not args.no_progress,
                          threads=args.threads, **given)
    s = run_fit(config).summary
    if s.get("interrupted"):
        print("Interrupted (Ctrl-C): the best model fitted so far is saved, marked as "
              "interrupted.")
    plural = "s" if s["n_experts"] != 1 else ""
    print(f"Fitted {s['n_experts']} expert{plural} ({s['task']}) to {s['rows']} rows x "
          f"{len(s['inputs'])} inputs in {s['epochs']} epochs ({s['stop_reason']}), "
          f"{s['seconds']} s.")
    val = "-" if s["validation_score"] is None else f"{s['validation_score']:.4f}"
    print(f"{s['score_name']}: training {s['train_score']:.4f}, validation {val} "
          f"({s['validation_rows']} rows)")
    if metrics := s.get("validation_metrics"):
        print("validation, in the target's units: " + ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if v is not None))
    for choice in s.get("choices", []):
        print(f"  {choice['setting']} = {choice['value']}: {choice['why']}")
    print(f"\n{'expert':>6}  {'mean proportion':>15}  {'leads':>7}")
    for r in s["expert_loads"]:
        print(f"{r['expert']:>6}  {r['mean_proportion']:>15.3f}  {r['argmax_share']:>7.1%}")
    print(f"\nWrote {config.out}/model, {config.out}/summary.json and {config.out}/report.html")
    return 0


def add_predict(subparsers: argparse._SubParsersAction) -> None:
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
    from moekit.runs.predict import predict_run

    outcome = predict_run(args.run, args.data, proba=args.proba, out=args.out)
    if outcome.path is None:
        sys.stdout.write(outcome.predictions.to_csv(index=False))
    else:
        print(f"Wrote {len(outcome.predictions)} predictions to {outcome.path}", file=sys.stderr)
    if outcome.score is not None:
        print(f"{outcome.score_name} against the target column: {outcome.score:.4f}",
              file=sys.stderr)
    return 0


def add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", allow_abbrev=False, help="rewrite the HTML report of a fitted run",
        description="Rewrite RUN/report.html from the saved model and its data.",
        epilog="example: moekit report runs/mine")
    p.add_argument("run", metavar="RUN", help="the --out folder of `moekit fit`")
    p.add_argument("--data", help="the CSV to report on (default: the one it was fitted on)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from moekit.runs.fit import report_run

    print(f"Wrote {report_run(args.run, args.data)}")
    return 0


def add_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze", allow_abbrev=False,
        help="what each expert does: routing statistics, interventions",
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
    from moekit.reports.analysis import summary_sentences
    from moekit.runs.analyze import analyze_run

    for model in analyze_run(args.run, args.data):
        print(f"{model.name}:")
        for sentence in summary_sentences(model.stats):
            print(f"  {sentence}")
        print(f"  Wrote {model.directory}/analysis.json and {model.directory}/analysis.html\n")
    return 0

"""The `moekit` command: a thin layer over the Python API.

Exit codes: 0 success, 2 usage error, 1 data error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from moekit._version import __version__

EPILOG = """examples:
  moekit demo                      fit a 4-expert mixture to a 3-piece line, show what each expert took
  moekit demo --experts 6 --seed 3 --out runs/demo6
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Mixtures of experts: fit, reproduce Jacobs et al. (1991), "
                                   "and see what each expert learned.",
        epilog=EPILOG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    return parser


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("experts", "epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1; got {value}. Example: moekit demo --{name} 4")


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

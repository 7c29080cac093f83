"""The `moekit` command: a thin layer over the Python API (:mod:`moekit.runs`,
:mod:`moekit.experiments`).

Exit codes: 0 success, 2 usage error, 1 data error. Errors name moekit's own flags: a
:class:`~moekit.exceptions.DataError` raised by the library names Python parameters, which
:func:`flag` spells as the flags that set them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from moekit._version import __version__
from moekit.cli.paper import add_compare_solvers, add_demo, add_vowels, add_vowels_sweep
from moekit.cli.tables import add_analyze, add_fit, add_predict, add_report
from moekit.exceptions import NAME_ONLY, DataError, Setting

EPILOG = """examples:
  moekit vowels                    reproduce Jacobs et al. (1991) Table 1 and Figures 2-3
  moekit vowels --quick            the same, debug-sized (a few seconds)
  moekit vowels-sweep              how often the experts split the vowels as Figure 2, by init \
scale, step, expert head, gate input scale
  moekit demo                      fit a 4-expert mixture to a 3-piece line, show what each \
expert took
  moekit demo --experts 6 --seed 3 --out runs/demo6
  moekit fit data.csv --target label --experts auto --out runs/mine
  moekit predict runs/mine new.csv --proba --out predictions.csv
  moekit report runs/mine
  moekit analyze runs/vowels       routing statistics, interventions and figures for each saved \
model
  moekit compare-solvers           passes to the paper's criterion: gradient descent, Adam, \
L-BFGS, EM
"""
__all__ = ["build_parser", "flag", "main"]

# Python parameters whose flag is not their name with dashes.
FLAGS = {"n_experts": "--experts", "data": "--data"}


def flag(setting: Setting) -> str:
    """A parameter setting as the command line writes it: ``missing='drop'`` -> ``--missing drop``,
    ``one_hot=True`` -> ``--one-hot``.

    Example:
        >>> flag(Setting("one_hot", True)), flag(Setting("missing", "drop"))
        ('--one-hot', '--missing drop')
    """
    name = FLAGS.get(setting.name, "--" + setting.name.replace("_", "-"))
    if setting.value is NAME_ONLY or setting.value is True:
        return name
    return f"{name} {setting.value}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Mixtures of experts: fit, reproduce Jacobs et al. (1991), "
                                   "and see what each expert learned.",
        epilog=EPILOG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_vowels, add_vowels_sweep, add_demo, add_fit, add_predict, add_report,
                add_analyze, add_compare_solvers):
        add(subparsers)
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
    except DataError as err:
        print(f"moekit: error: {err.render(flag)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"moekit: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

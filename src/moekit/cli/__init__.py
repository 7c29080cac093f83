"""The `moekit` command: a thin layer over the Python API (:mod:`moekit.runs`,
:mod:`moekit.experiments`), and its one error boundary.

Exit codes: 0 success, 2 usage error, 1 any other error (data, run folder, file, OS), 130
interrupted. Every failure is one line on stderr, ``moekit COMMAND: error: ...``, without a
traceback unless ``--debug`` is given. Errors name moekit's own flags: a
:class:`~moekit.exceptions.DataError` raised by the library names Python parameters, which
:func:`flag` spells as the flags that set them; values print as plain Python values, never as
numpy reprs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence

from moekit._version import __version__
from moekit.cli.lm import add_lm
from moekit.cli.paper import add_compare_solvers, add_demo, add_vowels, add_vowels_sweep
from moekit.cli.tables import add_analyze, add_fit, add_predict, add_report
from moekit.exceptions import NAME_ONLY, DataError, MoekitError, Setting
from moekit.io.paths import check_writable

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
  moekit lm train                  a byte-level MoE language model beside its dense twin of \
equal active compute (CPU, ~7 min; --quick: seconds)
"""
__all__ = ["build_parser", "flag", "main"]

# Python parameters whose flag is not their name with dashes (the estimators' among them).
FLAGS = {"n_experts": "--experts", "data": "--data", "expert_hidden": "--hidden",
         "random_state": "--seed"}
# Estimator parameters that a `moekit fit` flag sets: named as flags in the estimators' messages.
FIT_PARAMETERS = ("n_experts", "expert_hidden", "expert", "gate", "loss", "solver", "lr", "alpha",
                  "max_epochs", "random_state", "validation_fraction")
# Commands that write a run folder (their --out), and those that rewrite files inside one.
FOLDER_OUT = {"fit", "vowels", "vowels-sweep", "demo", "compare-solvers", "lm train",
              "lm train-ep"}
IN_PLACE = {"report", "analyze"}
OS_HINTS = {errno.ENOSPC: "the disk is full: free some space and rerun",
            errno.EDQUOT: "the disk quota is used up: free some space and rerun",
            errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
            errno.EROFS: "the file system is read-only", errno.EISDIR: "give a file, not a folder",
            errno.ENOTDIR: "a part of the path is a file, not a folder"}
NUMPY_SCALAR = re.compile(r"\bnp\.(?:float|int|uint|complex|bool|str|bytes|longdouble)\w*\((.*?)\)")
NUMPY_BOOL = re.compile(r"\bnp\.(True|False)_")


def flag(setting: Setting) -> str:
    """A parameter setting as the command line writes it: ``missing='drop'`` -> ``--missing drop``,
    ``one_hot=True`` -> ``--one-hot``, ``one_hot=False`` -> ``no --one-hot``.

    Example:
        >>> flag(Setting("one_hot", True)), flag(Setting("missing", "drop"))
        ('--one-hot', '--missing drop')
    """
    name = FLAGS.get(setting.name, "--" + setting.name.replace("_", "-"))
    if setting.value is NAME_ONLY or setting.value is True:
        return name
    return f"no {name}" if setting.value is False else f"{name} {plain(str(setting.value))}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Mixtures of experts: fit, reproduce Jacobs et al. (1991), "
                                   "and see what each expert learned.",
        epilog=EPILOG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback (before or after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_vowels, add_vowels_sweep, add_demo, add_fit, add_predict, add_report,
                add_analyze, add_compare_solvers, add_lm):
        add(subparsers)
    for sub in subparsers.choices.values():  # `moekit fit ... --debug` works too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on an error, show the traceback")
        sub.set_defaults(command_parser=sub)  # usage errors say `moekit COMMAND: error: ...`
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


def plain(text: str) -> str:
    """``text`` on one line, numpy scalars written as plain Python values.

    Example:
        >>> plain("got np.float64(3.0) and np.True_, np.str_('a')")
        "got 3.0 and True, 'a'"
    """
    return " ".join(NUMPY_BOOL.sub(r"\1", NUMPY_SCALAR.sub(r"\1", text)).split())


def as_flags(text: str) -> str:
    """An estimator's message with the parameters `moekit fit` sets written as its flags.

    Example:
        >>> as_flags("n_experts=8 needs 8 rows; the 'expert_hidden' parameter must be > 0")
        '--experts 8 needs 8 rows; the --hidden option must be > 0'
    """
    for name in FIT_PARAMETERS:
        text = re.sub(rf"\b{name}=('[^']*'|[^\s,;)]+)",
                      lambda m, name=name: flag(Setting(name, m.group(1).strip("'"))), text)
        text = text.replace(f"'{name}' parameter", f"{flag(Setting(name))} option")
    return text


def _os_error(err: OSError) -> str:
    if err.errno is None or not err.strerror:  # raised with a message of moekit's own
        return str(err)
    paths = " and ".join(repr(str(f)) for f in (err.filename, err.filename2) if f is not None)
    hint = OS_HINTS.get(err.errno)
    return err.strerror + (f": {paths}" if paths else "") + (f"; {hint}" if hint else "")


def describe(err: BaseException, command: str) -> tuple[str, int]:
    """The one-line message and the exit code of an error that reached the command line."""
    if _interrupted_import(err):  # Ctrl-C while a C extension (parselmouth) was initialising
        err = KeyboardInterrupt()
    if isinstance(err, KeyboardInterrupt):
        notes = getattr(err, "__notes__", None)
        kept = ("each file rewritten so far was written whole; the others are as they were"
                if command in IN_PLACE else "nothing was written")
        return "interrupted; " + (notes[-1] if notes else kept), 130
    if isinstance(err, DataError):
        return err.render(flag), 1
    if isinstance(err, json.JSONDecodeError):
        return (f"a file is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}); "
                "it is damaged: rewrite it with the moekit command that made it"), 1
    if isinstance(err, UnicodeDecodeError):
        return (f"a file is not UTF-8 text (byte {err.start}: {err.reason}); give a UTF-8 text "
                "file"), 1
    if isinstance(err, OSError):
        return _os_error(err), 1
    if isinstance(err, MemoryError):
        return "out of memory; use fewer rows or a smaller model (fewer experts or units)", 1
    if isinstance(err, RecursionError):
        return "an input is nested too deeply to read; it is not a file moekit wrote", 1
    if isinstance(err, (MoekitError, ValueError)):
        return as_flags(str(err)) if command == "fit" else str(err), 1
    return (f"internal error ({type(err).__name__}: {err}); rerun with --debug and report it "
            "with the traceback"), 1


def _interrupted_import(err: BaseException) -> bool:
    """Whether ``err`` is the ImportError a pybind11 module raises when Ctrl-C lands during its
    initialisation ("KeyboardInterrupt: "), which is an interrupt, not an internal error."""
    return isinstance(err, ImportError) and (
        str(err).startswith("KeyboardInterrupt")
        or isinstance(err.__cause__ or err.__context__, KeyboardInterrupt))


def check_output(args: argparse.Namespace) -> None:
    """Refuse an --out that cannot be written before any work: a file where a folder goes (or the
    reverse), a parent that is a file, a folder where nothing can be made."""
    out = getattr(args, "out", None)
    if out is not None:
        check_writable(out, folder=args.command in FOLDER_OUT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: "
                                                      f"{' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nmoekit: error: give a command, e.g. `moekit demo`", file=sys.stderr)
        return 2
    _check_positive(args.command_parser, args)
    try:
        check_output(args)
        return args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        message, code = describe(err, args.command)
        if args.debug:
            traceback.print_exception(err)
        print(f"moekit {args.command}: error: {plain(message)}", file=sys.stderr)
        if isinstance(err, BrokenPipeError):  # stdout is gone: let the exit not write to it
            _silence_stdout()
        return code


def _silence_stdout() -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())

"""`moekit lm`: a small byte-level MoE language model. `moekit lm train` trains it beside its dense
twin of equal active compute (:func:`moekit.runs.lm_train.train_lm`); more subcommands read its
run folder."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from moekit.cli import args as types
from moekit.cli.lm_analyze import add_lm_analyze
from moekit.cli.lm_ep import add_lm_train_ep

# `moekit lm train` options: flag dest -> LMTrainConfig field (given only when set; the config
# fills the rest). --experts and --hidden are spelled as `moekit fit` spells them.
TRAIN_OPTIONS = {name: name for name in (
    "data", "max_bytes", "validation_fraction", "d_model", "n_layers", "n_heads", "top_k",
    "router", "n_shared", "max_seq_len", "seq_len", "batch_size", "steps", "lr", "warmup_steps",
    "weight_decay", "eval_every", "eval_bytes", "checkpoint_every", "snapshot_every", "seed",
    "threads", "out")}
TRAIN_OPTIONS.update(experts="n_experts", hidden="expert_hidden")


def train_defaults() -> dict[str, object]:
    """LMTrainConfig's defaults, read when help is printed (the module imports torch)."""
    from moekit.runs.lm_train import LMTrainConfig

    return {f.name: f.default for f in dataclasses.fields(LMTrainConfig)}


class TrainDefaults(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default, taken from LMTrainConfig."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        field = TRAIN_OPTIONS.get(action.dest)
        if field is not None and field not in ("data", "top_k", "snapshot_every"):
            default = train_defaults()[field]
            text += f" (default {'chosen for the work' if default is None else default})"
        return text


def max_bytes(text: str) -> int | None:
    """An argparse type: a byte count >= 1, or 'all' (no cap)."""
    return None if text == "all" else types.positive_int(text)


def add_lm(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm", allow_abbrev=False, help="a small MoE language model on bytes, beside a dense twin",
        description="A small byte-level transformer language model whose feed-forward blocks are "
                    "routed mixtures of experts, trained beside a dense twin of equal active "
                    "compute on the same bytes.",
        epilog="example: moekit lm train --quick --out runs/lm-quick")
    commands = p.add_subparsers(dest="lm_command", metavar="SUBCOMMAND")
    add_lm_train(commands)
    add_lm_analyze(commands)
    add_lm_train_ep(commands)
    p.set_defaults(func=lambda args: _no_subcommand(p))


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    print("moekit lm: error: give a subcommand, e.g. `moekit lm train --quick`", file=sys.stderr)
    return 2


def add_lm_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train", allow_abbrev=False, formatter_class=TrainDefaults,
        help="train the MoE model and its dense twin side by side on CPU",
        description="Train a byte-level MoE language model and a dense model of the same active\n"
                    "FLOPs per token on the same batches; evaluate both in bits per byte on the\n"
                    "validation split (per token category at the end); save both models,\n"
                    "snapshots of the MoE over training, history.json, summary.json and log.md\n"
                    "in --out. The run is built beside --out and put in place whole; it\n"
                    "checkpoints itself, Ctrl-C saves a checkpoint, and --resume continues it to\n"
                    "the weights an uninterrupted run would reach. The default run takes about 7\n"
                    "minutes on a quiet 2-core machine.",
        epilog="examples:\n  moekit lm train --quick --out runs/lm-quick\n"
               "  moekit lm train --out runs/lm\n"
               "  moekit lm train --data my_code/ --steps 3000 --out runs/mine\n"
               "  moekit lm train --out runs/lm --resume      after a kill or Ctrl-C")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="'stdlib' (the Python standard library's .py files, the default) or "
                        "text files and folders of your own")
    p.add_argument("--max-bytes", metavar="N|all", type=max_bytes,
                   help="cap on the corpus, in bytes of whole files, or 'all'")
    p.add_argument("--validation-fraction", metavar="F", type=float, help="share of files held out")
    p.add_argument("--d-model", metavar="N", type=types.positive_int, help="model width")
    p.add_argument("--n-layers", metavar="N", type=types.positive_int, help="transformer blocks")
    p.add_argument("--n-heads", metavar="N", type=types.positive_int, help="attention heads")
    p.add_argument("--experts", metavar="N", type=int, help="experts per MoE block")
    p.add_argument("--top-k", metavar="N", type=types.positive_int,
                   help="experts per token (default: the router's, 2; 1 for switch)")
    p.add_argument("--router", choices=("topk", "switch", "expert_choice", "sigmoid"),
                   help="routing rule")
    p.add_argument("--hidden", "--expert-hidden", metavar="N", type=int, dest="hidden",
                   help="each expert's hidden size (the dense twin's: (top-k + shared) times it)")
    p.add_argument("--n-shared", metavar="N", type=int,
                   help="shared experts every token goes through")
    p.add_argument("--max-seq-len", metavar="N", type=types.positive_int,
                   help="the models' longest input")
    p.add_argument("--seq-len", metavar="N", type=types.positive_int,
                   help="bytes per training window")
    p.add_argument("--batch-size", metavar="N", type=types.positive_int, help="windows per step")
    p.add_argument("--steps", metavar="N", type=int,
                   help="training steps (may be raised with --resume)")
    p.add_argument("--lr", metavar="STEP", type=float,
                   help="peak AdamW learning rate (warm-up, cosine to lr/10)")
    p.add_argument("--warmup-steps", metavar="N", type=int, help="steps of linear warm-up")
    p.add_argument("--weight-decay", metavar="W", type=float, help="AdamW weight decay on matrices")
    p.add_argument("--eval-every", metavar="N", type=int, help="steps between evaluations")
    p.add_argument("--eval-bytes", metavar="N", type=int,
                   help="validation bytes each evaluation reads (the final one reads all)")
    p.add_argument("--checkpoint-every", metavar="N", type=int, help="steps between checkpoints")
    p.add_argument("--snapshot-every", metavar="N", type=int,
                   help="steps between snapshots of the MoE kept in RUN/snapshots, for the "
                        "routing saturation `moekit lm analyze` measures; 0: none (default: "
                        "about steps / 8; 10 with --quick)")
    p.add_argument("--seed", metavar="N", type=int,
                   help="seed of the initial weights and of the batches")
    p.add_argument("--threads", metavar="N", type=types.positive_int, help="threads to compute on")
    p.add_argument("--quick", action="store_true", help="a debug-sized run in a few seconds")
    p.add_argument("--out", metavar="RUN", help="run folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (only a moekit run), or start again "
                        "instead of resuming an interrupted one")
    p.add_argument("--resume", action="store_true",
                   help="continue the run a kill or Ctrl-C interrupted, from its last checkpoint "
                        "(kept in .OUT.partial beside --out), with the same options")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the traceback")
    p.set_defaults(func=_run_train, command="lm train", command_parser=p)


def _run_train(args: argparse.Namespace) -> int:
    from moekit.data import CATEGORIES
    from moekit.runs.lm_train import LMTrainConfig, train_lm

    given = {field: getattr(args, dest) for dest, field in TRAIN_OPTIONS.items()
             if getattr(args, dest) is not None}
    if given.get("data") == ["stdlib"]:
        given["data"] = "stdlib"
    elif "data" in given:
        given["data"] = tuple(given["data"])
    given.update(overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress)
    config = LMTrainConfig.quick(**given) if args.quick else LMTrainConfig(**given)
    outcome = train_lm(config)
    s = outcome.summary
    costs = {m: s["models"][m]["costs"] for m in ("moe", "dense")}
    print(f"Trained {s['steps']} steps on {s['bytes_seen']:,} bytes in {s['seconds']} s "
          f"({s['threads']} thread{'s' if s['threads'] != 1 else ''}"
          f"{', resumed at step ' + str(s['resumed_from']) if s['resumed_from'] else ''}).")
    print("Forward FLOPs per token: " + ", ".join(
        f"{m} {costs[m]['flops_per_token']:,.0f} ({costs[m]['active_params']:,} active of "
        f"{costs[m]['total_params']:,} parameters)" for m in costs) + "\n")
    print(outcome.files["log"].read_text())
    final = s["final"]
    print(f"{'category':<12} {'bytes':>8}  {'MoE bpb':>8}  {'dense bpb':>9}")
    for name in CATEGORIES:
        cells = [final[m]["categories"][name] for m in ("moe", "dense")]
        if cells[0]["bytes"]:
            print(f"{name:<12} {cells[0]['bytes']:>8,}  {cells[0]['bpb']:>8.4f}  "
                  f"{cells[1]['bpb']:>9.4f}")
    print(f"{'all':<12} {final['moe']['bytes']:>8,}  {final['moe']['bpb']:>8.4f}  "
          f"{final['dense']['bpb']:>9.4f}")
    steps = s["snapshots"] if len(s["snapshots"]) < 5 else [*s["snapshots"][:2], "...",
                                                             s["snapshots"][-1]]
    snapshots = (f", {len(s['snapshots'])} snapshots of the MoE in {config.out}/snapshots "
                 f"(steps {', '.join(map(str, steps))})" if s["snapshots"] else "")
    print(f"\nWrote {config.out}/moe, {config.out}/dense{snapshots}, {config.out}/history.json, "
          f"{config.out}/summary.json and {config.out}/log.md")
    return 0

"""`moekit lm train-ep`: the byte-level MoE language model trained with its experts sharded over
the processes torchrun starts (:mod:`moekit.parallel.train`), or alone, in one process: the
reference losses. Registered in the `moekit lm` group by :func:`add_lm_train_ep`."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

# EPTrainConfig's fields as flags (--batch-size for batch_size); given only when set, the config
# holds the defaults. Listed here, not read from the config: that would import torch for every
# `moekit` command (a test checks the two agree).
OPTIONS: dict[str, tuple[type, str]] = {
    "out": (str, "run folder"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "windows per step, the global batch (split evenly over the processes)"),
    "seq_len": (int, "bytes per window"),
    "d_model": (int, "model width"),
    "n_layers": (int, "transformer blocks"),
    "n_heads": (int, "attention heads"),
    "n_experts": (int, "experts per MoE block (divisible by the process count)"),
    "top_k": (int, "experts per byte (default: the router's)"),
    "router": (str, "topk, switch, expert_choice or sigmoid"),
    "expert_hidden": (int, "hidden units per expert"),
    "lr": (float, "AdamW step"),
    "weight_decay": (float, "AdamW weight decay"),
    "max_bytes": (int, "bytes of the standard library read"),
    "seed": (int, "seed of the weights and the batches"),
    "dtype": (str, "float32 or float64 (to compare runs to the last digits)"),
    "resume": (str, "a checkpoint to continue, saved at any process count"),
    "timeout_s": (float, "seconds after which a rank whose peer died fails"),
}


def add_lm_train_ep(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train-ep", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        help="the MoE language model with its experts over torchrun's processes",
        description="Train the byte-level MoE language model with its experts sharded over the "
                    "N processes torchrun starts (gloo, CPU), each taking its slice of every "
                    "global batch; run alone, one process trains the same model on the same "
                    "batches: the reference losses. Writes OUT/history.json (the losses per "
                    "step) and OUT/checkpoint (reloads at any process count: --resume).",
        epilog="examples:\n  torchrun --nproc-per-node 2 --master-addr 127.0.0.1 -m moekit lm "
               "train-ep --steps 20 --out runs/lm-ep\n"
               "  moekit lm train-ep --steps 20 --out runs/lm-one     the reference losses",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (kind, text) in OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=text,
                       metavar=name.upper())
    p.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    p.set_defaults(func=_run_train_ep, command="lm train-ep", command_parser=p)


def _run_train_ep(args: argparse.Namespace) -> int:
    from moekit.parallel.train import CHECKPOINT_DIR, HISTORY_FILE, EPTrainConfig, run_launched

    config = EPTrainConfig(**{k: v for k, v in vars(args).items() if k in OPTIONS},
                           overwrite=getattr(args, "overwrite", False))
    logging.getLogger("moekit.parallel.train").setLevel(logging.INFO)  # a line per step
    history = run_launched(config)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's other ranks stay quiet
        last = history["steps"][-1]
        print(f"{history['mode']} at world size {history['world_size']}: step {last['step']} "
              f"loss {last['loss']:.6f}; wrote {Path(config.out) / HISTORY_FILE} and "
              f"{Path(config.out) / CHECKPOINT_DIR}")
    return 0 if all(math.isfinite(s["loss"]) for s in history["steps"]) else 1

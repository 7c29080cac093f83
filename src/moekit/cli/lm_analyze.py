"""`moekit lm analyze`: what the experts of a `moekit lm train` run do, layer by layer
(:func:`moekit.runs.lm_analyze.analyze_lm`), or the same analysis of an untrained transformers
Mixtral read through hooks (:func:`moekit.runs.lm_analyze.mixtral_demo`). Registered in the
`moekit lm` group by :func:`add_lm_analyze`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from moekit.cli import args as types

# flag dest -> the name of its default in moekit.runs.lm_analyze (read when help is printed)
DEFAULTS = {"max_tokens": "DEFAULT_MAX_TOKENS", "ablation_tokens": "DEFAULT_ABLATION_TOKENS"}


class AnalyzeDefaults(argparse.RawDescriptionHelpFormatter):
    """Help that shows the defaults of moekit.runs.lm_analyze (imported only for help: torch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.dest in DEFAULTS:
            from moekit.runs import lm_analyze

            text += f" (default {getattr(lm_analyze, DEFAULTS[action.dest])})"
        return text


def count(text: str) -> int:
    """An argparse type taking an integer >= 0."""
    return 0 if text.strip() == "0" else types.positive_int(text)


def add_lm_analyze(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "analyze", allow_abbrev=False, formatter_class=AnalyzeDefaults,
        help="what the experts of a trained run do, layer by layer (report.html)",
        description="Record the routing of every MoE layer of a `moekit lm train` run on its "
                    "held-out bytes and write RUN/analysis/: lm_analysis.json, report.html and "
                    "figures/ (the validation text coloured by expert, experts against token "
                    "categories and NMI over depth, transitions between layers, repeat rates "
                    "against chance, the ablation importance of every expert, training curves "
                    "of the MoE and its dense twin, the routing saturation over the snapshots "
                    "the run kept). The corpus is rebuilt from the run's record "
                    "and refused if it changed.",
        epilog="examples:\n  moekit lm analyze runs/lm\n"
               "  moekit lm analyze runs/lm --max-tokens 16384 --out runs/lm-analysis\n"
               "  moekit lm analyze runs/lm --compare runs/lm-seed1   routing against a 2nd seed\n"
               "  moekit lm analyze runs/lm --no-saturation          no routing saturation\n"
               "  moekit lm analyze --mixtral-demo runs/mixtral      an untrained transformers "
               "Mixtral, through hooks")
    p.add_argument("run", nargs="?", metavar="RUN", help="a `moekit lm train` run folder")
    p.add_argument("--max-tokens", type=types.positive_int,
                   help="validation positions analysed, in whole windows spread over the split")
    p.add_argument("--ablation-tokens", type=count,
                   help="positions each ablation pass runs over (layers x experts + 1 passes); "
                        "0 skips the ablation table")
    p.add_argument("--layers", type=types.int_list, metavar="L1,L2",
                   help="layers drawn in the coloured text (default: first, middle, last)")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="where the run's text is now, if it moved ('stdlib' or its files or "
                        "folders); it must hold the same bytes")
    p.add_argument("--compare", nargs="+", metavar="RUN2",
                   help="other runs (or saved model folders) of the same architecture, e.g. "
                        "another seed or a checkpoint: how far their routing agrees")
    p.add_argument("--no-saturation", action="store_true",
                   help="skip the routing saturation (each snapshot of the run's MoE routed "
                        "over the same positions, against the final routing)")
    p.add_argument("--out", dest="analysis_out", metavar="DIR",
                   help="analysis folder (default RUN/analysis; replaced whole)")
    p.add_argument("--mixtral-demo", metavar="OUT",
                   help="instead of a run: analyse an untrained transformers Mixtral built from "
                        "a config, read through hooks, on the standard library's bytes, into OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run_analyze, command="lm analyze", command_parser=p)


def _run_analyze(args: argparse.Namespace) -> int:
    parser = args.command_parser
    if (args.run is None) == (args.mixtral_demo is None):
        parser.error("give a run folder or --mixtral-demo OUT (one of them), e.g. "
                     "`moekit lm analyze runs/lm`")
    from moekit.runs import lm_analyze

    options: dict[str, Any] = {"progress": not args.no_progress}
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.mixtral_demo is not None:
        run_only = [f for f, v in (("--ablation-tokens", args.ablation_tokens),
                                   ("--layers", args.layers), ("--data", args.data),
                                   ("--compare", args.compare), ("--out", args.analysis_out),
                                   ("--no-saturation", args.no_saturation or None))
                    if v is not None]
        if run_only:
            parser.error(f"{run_only[0]} applies to a run folder, not to --mixtral-demo")
        out = lm_analyze.mixtral_demo(args.mixtral_demo, **options)
    else:
        data = args.data
        if data is not None:
            data = "stdlib" if data == ["stdlib"] else list(data)
        if args.ablation_tokens is not None:
            options["ablation_tokens"] = args.ablation_tokens
        out = lm_analyze.analyze_lm(args.run, data=data, layers_to_render=args.layers,
                                    compare=args.compare or (), saturation=not args.no_saturation,
                                    out=args.analysis_out, **options)
    print_summary(out)
    return 0


def print_summary(out: Any) -> None:
    """Print the headline numbers of the analysis folder ``out`` (read from its JSON)."""
    from moekit.reports.lm import FIGURES_DIR, JSON_FILE, REPORT_FILE

    analysis = json.loads((out / JSON_FILE).read_text(encoding="utf-8"))
    s = analysis["summary"]
    if s["final_bpb"]:
        print("Final validation bits per byte: " + ", ".join(
            f"{m} {v:.4f}" for m, v in s["final_bpb"].items()))
    print(f"Positions analysed: {s['n_tokens']:,}")
    print("NMI(first-choice expert, category) per layer: "
          + ", ".join(f"{v:.3f}" for v in s["nmi_L"]))
    print("Same first choice as the previous token, observed / chance per layer: " + ", ".join(
        f"{o:.2f} / {c:.2f}" for o, c in zip(s["same_first_L"], s["same_first_chance_L"],
                                             strict=True)))
    print("Strongest expert-category pairs (lift): " + "; ".join(
        f"layer {p['layer']} expert {p['expert']} {p['category']} {p['lift']:.2f}"
        for p in s["strongest_pairs"][:4]))
    if s.get("saturation"):
        sat = s["saturation"]
        n = len(sat["steps"]) - 1  # the snapshots; the last row is the final model itself
        shown = sorted({round(i * (n - 1) / 5) for i in range(6)}) if n > 6 else range(n)
        chance_L = [sum(c) / n for c in zip(*sat["chance_overlap_SL"][:n], strict=True)]
        print("Routing saturation, top-k overlap with the final routing per layer (chance about "
              + ", ".join(f"{c:.2f}" for c in chance_L) + "): " + "; ".join(
                  f"step {sat['steps'][i]}: " + ", ".join(f"{v:.2f}" for v in sat["overlap_SL"][i])
                  for i in shown))
    for other in analysis.get("overlap") or []:
        m = other["matched"]
        print(f"Against {other['name']}: top-k overlap per layer after matching experts "
              + ", ".join(f"{v:.2f}" for v in m["matched_overlap_L"]) + " (as numbered "
              + ", ".join(f"{v:.2f}" for v in m["unmatched_overlap_L"]) + "; chance "
              + ", ".join(f"{v:.2f}" for v in m["chance_overlap_L"]) + ")")
    if s["importance"]:
        print("Most needed experts (Δ bits per byte when removed): " + "; ".join(
            f"layer {r['layer']} expert {r['expert']} {r['delta_bpb']:+.4f} (most on "
            f"{r['worst_category']})" for r in s["importance"][:3]))
    n_figures = len(list((out / FIGURES_DIR).glob("*.png")))
    print(f"\nWrote {out / REPORT_FILE}, {out / JSON_FILE} and {n_figures} figures in "
          f"{out / FIGURES_DIR}")

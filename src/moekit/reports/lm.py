"""The report of `moekit lm analyze`: a self-contained HTML page (figures embedded as PNG data)
drawn from ``lm_analysis.json`` alone (:func:`lm_report`), with the headline numbers
(:func:`lm_summary`) and a short text per section saying what they mean.

Shape legend: L MoE layers, E experts, C token categories, N bytes drawn.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_rgb

from moekit.plotting.lm import (
    plot_ablation_deltas,
    plot_category_shares,
    plot_layer_load,
    plot_lm_training,
    plot_repeat_rates,
    plot_saturation,
    plot_selectivity,
    plot_transitions,
)
from moekit.plotting.lm_text import byte_glyph, plot_byte_experts
from moekit.plotting.style import expert_colors, save_figure
from moekit.reports.html import Section, banner, figure, table, text, write_report

JSON_FILE, REPORT_FILE, FIGURES_DIR = "lm_analysis.json", "report.html", "figures"
MODEL_NAMES = {"moe": "MoE", "dense": "dense twin"}


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def lm_summary(analysis: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a (JSON-ready) analysis: NMI per layer, the strongest
    expert-category pairs over all layers, repeat rates against chance, dead experts, the final
    bits per byte of both models, the most important experts, the overlap with other models, the
    routing saturation over training (per snapshot step, the top-k overlap per layer)."""
    routing = analysis["routing"]
    cats, rep = routing["categories"], routing["repeats"]
    pairs = [{"layer": layer, **p} for layer, rows in enumerate(cats["top_pairs"]) for p in rows]
    training, ablation = analysis.get("training"), analysis.get("ablation")
    saturation = analysis.get("saturation")
    return {
        "n_tokens": routing["n_tokens"], "nmi_L": cats["nmi_L"],
        "input_nmi_L": analysis.get("input_nmi_L"),
        "strongest_pairs": sorted(pairs, key=lambda p: -(p["lift"] or 0))[:8],
        **{k: rep[k] for k in ("same_first_L", "same_first_chance_L", "sets_intersect_L",
                               "sets_intersect_chance_L")},
        "dead_experts": routing["dead_experts"],
        "load_entropy_ratio_L": routing["load_entropy_ratio_L"],
        "final_bpb": None if not training else {m: r["bpb"] for m, r in
                                                training["final"].items()},
        "importance": None if not ablation else ablation["ranked"][:5],
        "overlap": [{"name": o["name"], "overlap_L": o["saturation"]["overlap_L"],
                     "matched_overlap_L": o["matched"]["matched_overlap_L"],
                     "chance_overlap_L": o["saturation"]["chance_overlap_L"]}
                    for o in analysis.get("overlap") or []],
        "saturation": None if not saturation else {
            k: saturation[k] for k in ("steps", "overlap_SL", "chance_overlap_SL")}}


def lm_figures(analysis: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Draw every figure the analysis has data for into ``folder``; returns name -> path."""
    routing, model = analysis["routing"], analysis["model"]
    cats = routing["categories"]
    keep = [c for c, n in enumerate(cats["tokens_C"]) if n]  # categories with tokens
    names = [f"{cats['names'][c]} ({cats['tokens_C'][c]:,})" for c in keep]  # with their counts
    figures = {}

    def save(name: str, fig: Any) -> None:
        figures[name] = save_figure(fig, folder / f"{name}.png")

    training = analysis.get("training")
    if training and training.get("evals"):
        save("training", plot_lm_training(
            training["evals"], train_steps=training.get("steps", ()),
            final={m: r["bpb"] for m, r in training.get("final", {}).items()}))
    sample = analysis.get("sample")
    if sample:
        save("experts_on_text", plot_byte_experts(
            sample["bytes"], np.array(sample["experts_LN"]), sample["layers"],
            model["n_experts"], title=f"Held-out text ({sample['label']})"))
    save("load", plot_layer_load(np.array(routing["load_LE"]), routing["dead_experts"]))
    save("selectivity", plot_selectivity(cats["nmi_L"], input_nmi_L=analysis.get("input_nmi_L")))
    share_LEC = np.array(cats["share_LEC"], dtype=float)[:, :, keep]
    save("category_shares", plot_category_shares(share_LEC, names, nmi_L=cats["nmi_L"],
                                                 top_k=model["top_k"]))
    if routing["n_layers"] > 1:
        save("transitions", plot_transitions(np.array(routing["transition_probs_LEE"])))
    save("repeats", plot_repeat_rates(routing["repeats"], top_k=model["top_k"]))
    saturation = analysis.get("saturation")
    if saturation:
        save("saturation", plot_saturation(
            saturation["steps"], np.array(saturation["overlap_SL"]),
            np.array(saturation["chance_overlap_SL"]),
            top1_agreement_SL=np.array(saturation["top1_agreement_SL"]),
            top_k=saturation["top_k"]))
    ablation = analysis.get("ablation")
    if ablation:
        used = [c for c, n in enumerate(ablation["tokens_C"]) if n]
        delta = np.array(ablation["delta_bpb_LEC"], dtype=float)[:, :, used]
        save("ablation", plot_ablation_deltas(
            delta, np.array(ablation["delta_bpb_LE"]),
            [f"{ablation['category_names'][c]} ({ablation['tokens_C'][c]:,})" for c in used],
            ablation["layers"]))
    return figures


def byte_experts_html(sample: dict[str, Any], n_experts: int) -> str:
    """The sample's bytes as text, once per layer, each run of bytes on the colour of its
    first-choice expert, with a legend."""
    colors = [", ".join(str(round(255 * v)) for v in to_rgb(c)) for c in expert_colors(n_experts)]

    def span(expert: int, chars: str) -> str:
        return (f'<span style="background: rgba({colors[expert]}, 0.45)" title="expert '
                f'{expert}">{html.escape(chars)}</span>')

    legend = " ".join(span(e, f" expert {e} ") for e in range(n_experts))
    blocks = [f"<p>{legend}</p>"]
    for layer, experts_N in zip(sample["layers"], sample["experts_LN"], strict=True):
        parts, run, current = [], "", None
        for byte, expert in zip(sample["bytes"], experts_N, strict=True):
            glyph = byte_glyph(int(byte)) + ("\n" if byte == 10 else "")
            if expert != current and run:
                parts.append(span(current, run))
                run = ""
            run, current = run + glyph, expert
        parts.append(span(current, run) if run else "")
        blocks.append(f"<p><b>layer {layer}</b></p><pre style=\"line-height: 1.4; "
                      f"white-space: pre-wrap\">{''.join(parts)}</pre>")
    return "".join(blocks)


def _pairs_table(cats: dict[str, Any], per_layer: int = 3) -> str:
    rows = [(layer, p["expert"], p["category"], f"{p['lift']:.2f}", f"{p['share_of_category']:.1%}",
             f"{p['share_of_expert']:.1%}", p["count"])
            for layer, pairs in enumerate(cats["top_pairs"]) for p in pairs[:per_layer]]
    return table(["layer", "expert", "category", "lift", "share of the category's tokens",
                  "share of the expert's tokens", "assignments"], rows)


def _risk_table(risk: dict[str, Any]) -> str:
    rows = []
    for name, entry in risk["per_category"].items():
        r = entry["top"][0]
        rows.append((name, entry["n_tokens"], f"layer {r['layer']}, expert {r['expert']}",
                     f"{r['risk_difference']:+.3f} ± {r['se']:.3f}", f"{r['rate_a']:.1%}",
                     f"{r['rate_b']:.1%}"))
    return table(["category", "tokens", "most tied expert", "risk difference ± se",
                  "rate in the category", "rate in the rest"], rows)


def _fig(figures: dict[str, Path], name: str, caption: str) -> str:
    return figure(figures[name], caption) if name in figures else ""


def _sections(a: dict[str, Any], figures: dict[str, Path]) -> list[Section]:
    routing, s, model = a["routing"], a.get("summary") or lm_summary(a), a["model"]
    cats, rep = routing["categories"], routing["repeats"]
    n_layers = routing["n_layers"]
    sections = [Section("", "".join(banner(n) for n in a.get("notes", [])))]
    head = [("positions analysed", f"{s['n_tokens']:,} (category: {a['tokens']['category_of']})"),
            ("MoE layers, experts, top-k",
             f"{model['n_layers']}, {model['n_experts']}, {model['top_k']}")]
    if s["final_bpb"]:
        head += [(f"final validation bits per byte, {MODEL_NAMES.get(m, m)}", _f(v, 4))
                 for m, v in s["final_bpb"].items()]
    head += [("NMI per layer (predicted byte)", ", ".join(_f(v) for v in s["nmi_L"]))]
    if s["input_nmi_L"] is not None:
        head.append(("NMI per layer (byte read)", ", ".join(_f(v) for v in s["input_nmi_L"])))
    head += [("same first choice as the previous token, observed / chance",
              ", ".join(f"{_f(o, 2)} / {_f(c, 2)}" for o, c in
                        zip(s["same_first_L"], s["same_first_chance_L"], strict=True))),
             ("dead experts per layer", "; ".join(
                 f"layer {i}: {d or 'none'}" for i, d in enumerate(s["dead_experts"])))]
    sections.append(Section("Summary", text(a.get("description", "")) + table(["", ""], head)))
    if "training" in figures:
        final = a["training"]["final"]
        body = text("Validation bits per byte of the MoE and of its dense twin (same active "
                    "feed-forward FLOPs per token) at each evaluation; lower is better, 8 is "
                    "guessing uniformly over 256 bytes. Right: the gap, below 0 where the MoE is "
                    "ahead.") + _fig(figures, "training", "Training curves")
        if {"moe", "dense"} <= final.keys():
            rows = [(name, final["moe"]["categories"][name]["bytes"],
                     _f(final["moe"]["categories"][name]["bpb"], 4),
                     _f(final["dense"]["categories"][name]["bpb"], 4))
                    for name in final["moe"].get("categories", {})
                    if final["moe"]["categories"][name]["bytes"]]
            body += text("At the end, on the whole validation split, per category of the "
                         "predicted byte:") + table(["category", "bytes", "MoE bpb",
                                                     "dense bpb"], rows)
        sections.append(Section("Training: MoE against dense", body))
    if a.get("sample"):
        sections.append(Section("Experts on held-out text", text(
            f"{a['sample']['label']}: each byte on the colour of the expert its layer chose "
            "first for it (Mixtral of Experts, Figure 8). Runs of one colour along names, "
            "indentation or strings show routing that follows the text's structure; a "
            "patchwork, routing that does not.") + byte_experts_html(a["sample"],
                                                                     model["n_experts"])
            + _fig(figures, "experts_on_text", "The same text as a figure")))
    load_rows = [(i, _f(routing["load_entropy_ratio_L"][i]),
                  _f(routing["top1_load_entropy_ratio_L"][i]),
                  routing["dead_experts"][i] or "none", routing["never_first_experts"][i] or "none")
                 for i in range(n_layers)]
    sections.append(Section("Load and dead experts", text(
        "The load is each expert's share of the assignments (K per token). Entropy / log E is 1 "
        "for a perfectly balanced layer and 0 when one expert takes everything; a dead expert is "
        "chosen by no token, a never-first one is only ever a second choice.")
        + table(["layer", "load entropy / log E", "first-choice entropy / log E",
                 "dead experts", "never first"], load_rows)
        + _fig(figures, "load", "Load per layer")))
    nmi_rows = [(i, _f(v), _f(s["input_nmi_L"][i]) if s["input_nmi_L"] else "n/a")
                for i, v in enumerate(s["nmi_L"])]
    sections.append(Section("Selectivity over depth", text(
        "Normalised mutual information between a token's first-choice expert and its category: "
        "0 when the routing is independent of the category, 1 when the category alone decides "
        "the expert (and the reverse). A curve that falls with depth means the later layers "
        "route by something other than the token's kind; a rise, that they specialise more.")
        + table(["layer", "NMI (predicted byte)", "NMI (byte read)"], nmi_rows)
        + _fig(figures, "selectivity", "Selectivity curve")))
    sections.append(Section("Experts and token categories", text(
        "Each panel: the share of a category's tokens (their count in the label) that each "
        "expert processes. Lift = "
        "P(expert | category) / P(expert): 1 when the category uses the expert as often as all "
        "tokens do, 2 when twice as often. The risk difference is the expert's activation rate "
        "on the category minus on every other token, with its standard error (SteerMoE).")
        + _fig(figures, "category_shares", "Experts by token category")
        + text("Strongest pairs by lift, per layer:") + _pairs_table(cats)
        + text("The expert most tied to each category:") + _risk_table(a["risk"])))
    if "transitions" in figures:
        paths = [(" → ".join(map(str, p["path"])), p["count"], f"{p['share']:.2%}")
                 for p in routing["top_paths"][:8]]
        sections.append(Section("From layer to layer", text(
            "P(first choice j at the next layer | first choice i at this one). With independent "
            "layers every row would equal the next layer's load; bright single cells mean a "
            f"token's expert predicts the next. {routing['n_distinct_paths']:,} distinct paths "
            "of first choices through the layers; the most frequent:")
            + table(["path (first choice per layer)", "tokens", "share"], paths)
            + _fig(figures, "transitions", "Transitions between consecutive layers")))
    rep_rows = [(i, _f(rep["same_first_L"][i]), _f(rep["same_first_chance_L"][i]),
                 _f(rep["sets_intersect_L"][i]), _f(rep["sets_intersect_chance_L"][i]))
                for i in range(n_layers)]
    sections.append(Section("Consecutive tokens: repeat rate against chance", text(
        "How often a token goes to the expert of the token before it, against the rate for "
        "independent tokens with the same loads (chance). Mixtral reports its first-or-second "
        "choice repeats well above chance at deep layers: routing with memory of the previous "
        f"token. Measured over {rep['n_pairs']:,} pairs within a window; chance of 'sets "
        f"intersect': {rep['intersect_chance_method']}.")
        + table(["layer", "same first choice", "chance", "sets intersect", "chance"], rep_rows)
        + _fig(figures, "repeats", "Repeat rates against chance")))
    ablation = a.get("ablation")
    if ablation:
        rows = [(r["layer"], r["expert"], f"{r['delta_bpb']:+.4f}", f"{r['share']:.1%}",
                 r["worst_category"], f"{r['worst_delta_bpb']:+.4f}") for r in ablation["ranked"]]
        sections.append(Section("Importance: each expert removed", text(
            f"Each expert removed alone from its layer's choice (every token takes its K best "
            f"among the others), over {ablation['n_tokens']:,} positions; the change of bits per "
            f"byte against the baseline {ablation['baseline_bpb']:.4f}. Positive: the model "
            "needs the expert for that category. Each category's token count is in its label; "
            "the change on a category with few tokens is noise.")
            + _fig(figures, "ablation", "Ablation importance per layer")
            + table(["layer", "expert", "Δ bpb (all)", "tokens using it", "most hurt category",
                     "its Δ bpb"], rows)))
    if a.get("saturation"):
        sections.append(_saturation_section(a["saturation"], figures))
    for o in a.get("overlap") or []:
        rows = [(i, _f(o["saturation"]["overlap_L"][i]), _f(o["matched"]["matched_overlap_L"][i]),
                 _f(o["saturation"]["chance_overlap_L"][i])) for i in range(n_layers)]
        sections.append(Section(f"Against {o['name']}", text(
            "Mean |A ∩ B| / K of the two models' expert sets on the same tokens: with experts as "
            "numbered (saturation: for checkpoints of one run, near 1 once routing has settled) "
            "and after matching experts one to one per layer (for seeds, whose numbering is "
            "arbitrary), against the overlap of independent tokens.")
            + table(["layer", "overlap as numbered", "overlap matched", "chance"], rows)))
    return sections


def _saturation_section(sat: dict[str, Any], figures: dict[str, Path]) -> Section:
    rows = [(step, name if name != sat["reference"] else f"{name} (itself)",
             ", ".join(_f(v) for v in overlap_L), ", ".join(_f(v) for v in top1_L),
             ", ".join(_f(v) for v in chance_L))
            for step, name, overlap_L, top1_L, chance_L in zip(
                sat["steps"], sat["snapshots"], sat["overlap_SL"], sat["top1_agreement_SL"],
                sat["chance_overlap_SL"], strict=True)]
    return Section("Routing saturation over training", text(
        f"The snapshots the run kept, each routing the same {sat['n_tokens']:,} positions as "
        f"{sat['reference']}: the mean over tokens of |A ∩ B| / K, A a snapshot's "
        f"top-{sat['top_k']} set and B the final one, experts as numbered (one model over time, "
        "no matching), per "
        "layer; and the share of tokens whose first choice is already the final one. Chance is "
        "the overlap of independent tokens with the same loads. A layer whose curve reaches 1 "
        "early fixed its routing early in training while its experts went on learning; one near "
        "chance until late kept reassigning tokens.")
        + _fig(figures, "saturation", "Routing saturation over training")
        + table(["step", "snapshot", "overlap with the final routing, per layer",
                 "same first choice, per layer", "chance, per layer"], rows))


def lm_report(analysis: dict[str, Any], out: Path | str) -> Path:
    """Draw the figures of a JSON-ready analysis into ``out/figures`` and write
    ``out/report.html``; returns its path."""
    out = Path(out)
    figures = lm_figures(analysis, out / FIGURES_DIR)
    return write_report(out / REPORT_FILE, analysis.get("title", "moekit lm analysis"),
                        _sections(analysis, figures))

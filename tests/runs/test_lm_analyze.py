"""`moekit lm analyze`: a tiny MoE language model saved into a fake `moekit lm train` run folder
(its corpus from a few text files), analysed into lm_analysis.json, report.html and figures whose
numbers match a direct computation; a changed corpus refused; the untrained transformers Mixtral
read through hooks; the command line."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.analysis.layer_interventions import validation_stream
from moekit.analysis.layer_recorder import record_layers
from moekit.analysis.layer_risk import risk_difference
from moekit.cli import main
from moekit.cli.lm_analyze import print_summary
from moekit.data import CATEGORIES, text_corpus
from moekit.exceptions import DataError
from moekit.io.models import save_model
from moekit.io.run_folder import write_manifest
from moekit.nn.lm import LMConfig, MoETransformerLM
from moekit.reports.lm import FIGURES_DIR, JSON_FILE, REPORT_FILE
from moekit.runs.lm_analyze import analyze_lm, mixtral_demo

SEQ_LEN, MAX_TOKENS, ABLATION_TOKENS = 32, 768, 192
FIGURES = {"training", "experts_on_text", "load", "selectivity", "category_shares",
           "transitions", "repeats", "ablation"}
SECTIONS = ("Summary", "Training: MoE against dense", "Experts on held-out text",
            "Load and dead experts", "Selectivity over depth", "Experts and token categories",
            "From layer to layer", "Consecutive tokens: repeat rate against chance",
            "Importance: each expert removed")


def write_code(folder: Path, n_files: int = 16) -> Path:
    """Small Python files of fixed text (the same bytes and labels on every Python)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "".join(f"def f{i}_{j}(x, y={j}):\n    return x * {j} + y  # term {j}\n"
                       for j in range(12))
        (folder / f"m{i:02d}.py").write_text(f'"""Module {i}."""\n\n\nclass C{i}:\n    pass\n\n'
                                             + body)
    return folder


def make_run(root: Path) -> tuple[Path, MoETransformerLM, object]:
    """A complete run folder as `moekit lm train` leaves it, as far as the analysis reads it."""
    data = write_code(root / "code")
    corpus = text_corpus(data, validation_fraction=0.3)
    config = LMConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4, expert_hidden=16,
                      max_seq_len=SEQ_LEN)
    model = MoETransformerLM(config, generator=torch.Generator().manual_seed(0)).eval()
    run = root / "run"
    options = {"data": [str(data)], "seq_len": SEQ_LEN, "max_bytes": None,
               "validation_fraction": 0.3}
    final = {"bpb": 7.9, "bytes": 100, "categories": {
        name: {"bpb": 7.9 if name != "other" else None, "bytes": 0 if name == "other" else 10}
        for name in CATEGORIES}}
    save_model(model, run / "moe", metadata={"lm_train": {"options": options,
                                                          "corpus": corpus.record,
                                                          "final": final}})
    history = {"steps": [{"step": s, "lr": 0.001, "moe_loss": 5.5 - s / 10, "moe_aux_loss": 0.02,
                          "dense_loss": 5.4 - s / 10} for s in range(1, 11)],
               "evals": [{"step": s, "bytes": 64, "moe_val_bpb": 8.0 - s / 10,
                          "dense_val_bpb": 7.9 - s / 10} for s in (0, 5, 10)],
               "final": {"moe": final, "dense": {**final, "bpb": 7.8}}}
    (run / "history.json").write_text(json.dumps(history))
    write_manifest(run, "lm train")
    return run, model, corpus


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """One analysis shared by the tests that read it."""
    run, model, corpus = make_run(tmp_path_factory.mktemp("lm"))
    out = analyze_lm(run, max_tokens=MAX_TOKENS, ablation_tokens=ABLATION_TOKENS)
    return run, model, corpus, out, json.loads((out / JSON_FILE).read_text())


def test_the_analysis_writes_the_json_the_report_and_every_figure(analysed):
    run, _, _, out, analysis = analysed
    assert out == run / "analysis"
    assert {p.stem for p in (out / FIGURES_DIR).glob("*.png")} == FIGURES
    page = (out / REPORT_FILE).read_text()
    assert all(f"<h2>{title}</h2>" in page for title in SECTIONS)
    assert page.count("data:image/png;base64,") == len(FIGURES)  # one file, figures inside
    assert "<span style=\"background: rgba(" in page  # the coloured text as HTML too
    assert analysis["routing"]["n_tokens"] == MAX_TOKENS
    assert analysis["summary"]["final_bpb"] == {"moe": 7.9, "dense": 7.8}
    assert analysis["model"]["class"] == "MoETransformerLM"


def spread_stream(corpus, max_tokens):
    """Whole windows spread evenly over the validation split, in batches of 32, cut at
    max_tokens; and the byte offset of every position."""
    x_WT, y_WT, c_WT = next(corpus.windows("validation", SEQ_LEN, batch_size=10**9))
    taken = min(len(x_WT), math.ceil(max_tokens / SEQ_LEN))
    rows = torch.arange(taken) * len(x_WT) // taken
    batches = [(x_WT[r], y_WT[r], c_WT[r]) for r in rows.split(32)]
    offsets = (rows[:, None] * SEQ_LEN + torch.arange(SEQ_LEN)).reshape(-1)[:max_tokens]
    return validation_stream(batches, max_tokens), offsets.numpy()


def test_the_numbers_equal_a_direct_computation(analysed):
    _, model, corpus, _, analysis = analysed
    stream, offsets = spread_stream(corpus, MAX_TOKENS)
    rec = record_layers(model, stream)
    result = rec.stats(list(CATEGORIES))
    np.testing.assert_allclose(analysis["routing"]["categories"]["nmi_L"],
                               result.categories.nmi_L, atol=1e-12)
    np.testing.assert_allclose(analysis["routing"]["load_LE"], result.load_LE, atol=1e-12)
    np.testing.assert_allclose(analysis["routing"]["repeats"]["same_first_L"],
                               result.repeats.same_first_L, atol=1e-12)
    # the position at byte offset i reads byte i and predicts byte i + 1
    cat_N = corpus.splits["validation"].category_N
    np.testing.assert_array_equal(rec.categories_T, cat_N[offsets + 1])
    by_input = dataclasses.replace(rec, categories_T=cat_N[offsets].astype(np.int32))
    np.testing.assert_allclose(analysis["input_nmi_L"],
                               by_input.stats(list(CATEGORIES)).categories.nmi_L, atol=1e-12)
    name_id = CATEGORIES.index("name")
    rd = risk_difference(rec.indices_TLK, rec.categories_T == name_id, n_experts=4)
    assert analysis["risk"]["per_category"]["name"]["top"] == json.loads(json.dumps(rd.ranked(3)))


def test_the_coloured_text_is_code_of_one_file_with_its_own_routing(analysed):
    _, model, corpus, _, analysis = analysed
    sample = analysis["sample"]
    text = bytes(sample["bytes"])
    assert text in bytes(corpus.splits["validation"].data_N)
    assert text.startswith((b"def ", b"class ", b"    def ")) and text.endswith(b"\n")
    assert sample["layers"] == [0, 1] and sample["label"].startswith("m")
    # the windows that cover it, run alone: ByteCorpus.windows' grid, so the same context
    start = bytes(corpus.splits["validation"].data_N).find(text)
    first = start // SEQ_LEN
    x_WT, y_WT, _ = next(corpus.windows("validation", SEQ_LEN, batch_size=10**9))
    last = (start + len(text) - 1) // SEQ_LEN
    rec = record_layers(model, [(x_WT[first:last + 1], y_WT[first:last + 1])])
    at = slice(start - first * SEQ_LEN, start - first * SEQ_LEN + len(text))
    assert sample["experts_LN"] == rec.indices_TLK[at][:, [0, 1], 0].T.tolist()


def test_the_ablation_baseline_is_the_models_bits_per_byte(analysed):
    _, model, corpus, _, analysis = analysed
    ablation = analysis["ablation"]
    stream, _ = spread_stream(corpus, MAX_TOKENS)  # 24 windows of 32; every 4th is ablated
    x, y = (torch.cat([b[i] for b in stream])[::4] for i in (0, 1))
    assert x.numel() == ABLATION_TOKENS
    stream = [(x, y, None)]
    with torch.no_grad():
        nats = sum(float(model.loss(x, y).cross_entropy) * y.numel() for x, y, _ in stream)
    assert ablation["n_tokens"] == ABLATION_TOKENS
    assert ablation["baseline_bpb"] == pytest.approx(nats / ABLATION_TOKENS / math.log(2),
                                                     rel=1e-5)
    assert np.asarray(ablation["delta_bpb_LE"]).shape == (2, 4)
    assert ablation["ranked"][0]["delta_bpb"] == max(max(r) for r in ablation["delta_bpb_LE"])


def test_comparing_a_run_with_itself_overlaps_fully(analysed, tmp_path, capsys):
    run = analysed[0]
    out = analyze_lm(run, max_tokens=256, ablation_tokens=0, compare=[run], out=tmp_path / "a",
                     layers_to_render=[1])
    analysis = json.loads((out / JSON_FILE).read_text())
    overlap = analysis["overlap"][0]
    assert overlap["saturation"]["overlap_L"] == [1.0, 1.0]
    assert overlap["matched"]["matched_overlap_L"] == [1.0, 1.0]
    assert analysis["ablation"] is None and analysis["sample"]["layers"] == [1]
    assert f"Against {run}" in (out / REPORT_FILE).read_text()
    print_summary(out)
    assert (f"Against {run}: top-k overlap per layer after matching experts 1.00, 1.00 (as "
            "numbered 1.00, 1.00; chance") in capsys.readouterr().out


def test_a_changed_corpus_is_refused_and_moved_text_is_found_with_data(tmp_path):
    run, _, _ = make_run(tmp_path)
    victim = tmp_path / "code" / "m03.py"
    text = victim.read_text()
    victim.write_text(text + "# edited\n")
    with pytest.raises(DataError, match=r"the corpus rebuilt for the analysis is not the run's: "
                                        r".*bytes differ.* Pass data the exact text"):
        analyze_lm(run, max_tokens=64)
    assert not (run / "analysis").exists()
    victim.write_text(text)
    (tmp_path / "code").rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"the run's text file .*m\d\d.py' \(from its corpus "
                                        r"record\) is gone; pass data the files or folders"):
        analyze_lm(run, max_tokens=64)
    out = analyze_lm(run, data=tmp_path / "moved", max_tokens=64, ablation_tokens=0)
    assert (out / REPORT_FILE).is_file()


def test_what_is_not_a_run_or_an_analysis_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="no run folder at"):
        analyze_lm(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "history.json").write_text("{}")
    with pytest.raises(DataError, match="not a complete moekit run"):
        analyze_lm(tmp_path / "half")
    run, _, _ = make_run(tmp_path / "r")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds files that are not a moekit lm analysis"):
        analyze_lm(run, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"layers_to_render must be layer indices in \[0, "
                                         r"n_layers=2\); got layers_to_render=\[5\]"):
        analyze_lm(run, max_tokens=64, ablation_tokens=0, layers_to_render=[5])
    wider = LMConfig(d_model=16, n_layers=2, n_heads=2, n_experts=6, expert_hidden=16,
                     max_seq_len=SEQ_LEN)
    save_model(MoETransformerLM(wider), tmp_path / "wider")
    with pytest.raises(DataError, match=r"compare='.*wider' has \(layers, top_k, experts\) = "
                                        r"\(2, 2, 6\), the run \(2, 2, 4\)"):
        analyze_lm(run, compare=[tmp_path / "wider"])


def test_the_mixtral_demo_reads_an_untrained_mixtral_through_hooks(tmp_path):
    pytest.importorskip("transformers", reason="the demo needs transformers")
    state = torch.random.get_rng_state()
    out = mixtral_demo(tmp_path / "mixtral", max_tokens=256, max_bytes=40_000, seq_len=64,
                       mixtral_config={"hidden_size": 32, "intermediate_size": 32,
                                       "num_hidden_layers": 2, "num_local_experts": 4})
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    analysis = json.loads((out / JSON_FILE).read_text())
    assert analysis["model"]["class"] == "MixtralForCausalLM"
    assert analysis["model"]["layer_names"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert (analysis["model"]["n_experts"], analysis["model"]["top_k"]) == (4, 2)
    assert analysis["ablation"] is None and analysis["training"] is None
    page = (out / REPORT_FILE).read_text()
    assert "This Mixtral is untrained" in page and "<h2>Selectivity over depth</h2>" in page
    assert {p.stem for p in (out / FIGURES_DIR).glob("*.png")} == \
        FIGURES - {"training", "ablation"}


def test_the_command_line_analyzes_a_run_and_rejects_mixed_options(analysed, tmp_path, capsys):
    run = analysed[0]
    assert main(["lm", "analyze", str(run), "--max-tokens", "128", "--ablation-tokens", "0",
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "NMI(first-choice expert, category) per layer:" in printed
    assert f"Wrote {tmp_path / 'cli' / REPORT_FILE}" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["lm", "analyze"])
    assert exit_info.value.code == 2
    assert "give a run folder or --mixtral-demo OUT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lm", "analyze", "--mixtral-demo", str(tmp_path / "m"), "--compare", str(run)])
    assert "--compare applies to a run folder" in capsys.readouterr().err
    assert main(["lm", "analyze", str(tmp_path / "nowhere")]) == 1
    assert "moekit lm analyze: error: no run folder at" in capsys.readouterr().err

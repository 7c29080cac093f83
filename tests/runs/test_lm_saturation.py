"""Routing saturation over training: a quick `moekit lm train` run's snapshots against its final
routing in `moekit lm analyze` (the JSON, the figure, the report section, the printed line),
equal to a direct computation; the final model against itself; the inputs refused."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from moekit.analysis.layer_overlap import routing_saturation
from moekit.analysis.layer_recorder import record_layers
from moekit.cli import main
from moekit.io.models import load_model
from moekit.nn.lm import LMConfig, MoETransformerLM
from moekit.reports.lm import FIGURES_DIR, JSON_FILE, REPORT_FILE
from moekit.runs.lm_analyze import run_corpus, run_record
from moekit.runs.lm_routing import corpus_stream
from moekit.runs.lm_saturation import REFERENCE, saturation_over_training
from moekit.runs.lm_train import LMTrainConfig, train_lm

MAX_TOKENS = 1024


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A quick run (snapshots at steps 0, 10, 20 of 30), analysed once from the command line;
    with what it printed."""
    run = tmp_path_factory.mktemp("lm") / "run"
    train_lm(LMTrainConfig.quick(out=str(run), progress=False, threads=1))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["lm", "analyze", str(run), "--max-tokens", str(MAX_TOKENS),
                     "--ablation-tokens", "0", "--no-progress"]) == 0
    out = run / "analysis"
    return run, out, json.loads((out / JSON_FILE).read_text()), printed.getvalue()


def test_each_snapshot_is_compared_with_the_final_routing_per_layer(analysed):
    analysis = analysed[2]
    sat = analysis["saturation"]
    assert sat["steps"] == [0, 10, 20, 30] and sat["n_tokens"] == MAX_TOKENS
    assert sat["snapshots"] == ["step_000000", "step_000010", "step_000020", REFERENCE]
    overlap_SL, top1_SL = np.array(sat["overlap_SL"]), np.array(sat["top1_agreement_SL"])
    chance_SL = np.array(sat["chance_overlap_SL"])
    assert overlap_SL.shape == top1_SL.shape == chance_SL.shape == (4, 2)
    # the final model against itself: every token keeps its K experts and its first choice
    assert overlap_SL[-1].tolist() == top1_SL[-1].tolist() == [1.0, 1.0]
    # shares of tokens, and training moved the routing: no snapshot holds all of it
    for values in (overlap_SL, top1_SL, chance_SL):
        assert ((values >= 0) & (values <= 1)).all()
    assert (overlap_SL[:-1] < 1).all()
    # chance of the final model with itself: sum_e q_e^2 / K, at least K / E = 1/2 (equal loads)
    assert (chance_SL[-1] >= 0.5 - 1e-12).all()
    assert analysis["summary"]["saturation"]["steps"] == sat["steps"]


def test_the_curve_equals_a_direct_computation(analysed):
    run, _, analysis, _ = analysed
    final = load_model(run / "moe")
    options, record = run_record(final, run / "moe")
    stream = corpus_stream(run_corpus(options, record), options["seq_len"], MAX_TOKENS).batches
    final_TLK = record_layers(final, stream).indices_TLK
    snapshot = record_layers(load_model(run / "snapshots" / "step_000010"), stream).indices_TLK
    direct = routing_saturation(snapshot, final_TLK, n_experts=4)
    sat = analysis["saturation"]
    np.testing.assert_allclose(sat["overlap_SL"][1], direct.overlap_L, atol=1e-12)
    np.testing.assert_allclose(sat["top1_agreement_SL"][1], direct.top1_agreement_L, atol=1e-12)
    np.testing.assert_allclose(sat["chance_overlap_SL"][1], direct.chance_overlap_L, atol=1e-12)


def test_the_report_holds_the_figure_and_the_section(analysed):
    out = analysed[1]
    assert (out / FIGURES_DIR / "saturation.png").is_file()
    page = (out / REPORT_FILE).read_text()
    assert "<h2>Routing saturation over training</h2>" in page
    section = page[page.index("<h2>Routing saturation over training</h2>"):]
    assert "data:image/png;base64," in section.split("<h2>")[1]
    assert "step_000010" in section and f"{REFERENCE} (itself)" in section


def test_the_command_line_prints_the_curve_and_can_skip_it(analysed, tmp_path, capsys):
    run, _, analysis, printed = analysed
    line = next(s for s in printed.splitlines() if s.startswith("Routing saturation"))
    first = ", ".join(f"{v:.2f}" for v in analysis["saturation"]["overlap_SL"][0])
    assert line.startswith("Routing saturation, top-k overlap with the final routing per layer")
    assert f"step 0: {first}; step 10: " in line and "step 30" not in line
    assert main(["lm", "analyze", str(run), "--max-tokens", "128", "--ablation-tokens", "0",
                 "--no-progress", "--out", str(tmp_path / "without"), "--no-saturation"]) == 0
    assert "Routing saturation" not in capsys.readouterr().out
    assert json.loads((tmp_path / "without" / JSON_FILE).read_text())["saturation"] is None
    assert not (tmp_path / "without" / FIGURES_DIR / "saturation.png").exists()


def tiny_lm(seed: int) -> MoETransformerLM:
    config = LMConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4, expert_hidden=16,
                      max_seq_len=16)
    return MoETransformerLM(config, generator=torch.Generator().manual_seed(seed))


def test_a_model_against_itself_saturates_fully_and_another_does_not():
    final = tiny_lm(0)
    stream = [torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))]
    final_TLK = record_layers(final, stream, categories=False).indices_TLK
    sat = saturation_over_training(final_TLK, [(0, tiny_lm(5)), (3, final)], stream,
                                   n_experts=4, final_step=7)
    assert sat["steps"] == [0, 3, 7] and sat["snapshots"] == ["step 0", "step 3", REFERENCE]
    assert sat["overlap_SL"][1] == sat["overlap_SL"][2] == [1.0, 1.0]
    assert all(v < 1 for v in sat["overlap_SL"][0])  # other weights, other routing


@pytest.mark.parametrize("snapshots, final_step, message", [
    ([(0, None)], None, (r"final_step must be the step count of the analysed model \(an "
                         r"integer >= 1\) when snapshots are given; got final_step=None")),
    ([(5, None)], 5, (r"snapshots must be \(step, model\) pairs with distinct steps in "
                      r"\[0, final_step=5\); got steps \[5\]")),
    ([(1, None), (1, None)], 5, r"distinct steps .* got steps \[1, 1\]"),
])
def test_bad_snapshots_are_refused(snapshots, final_step, message):
    with pytest.raises(ValueError, match=message):
        saturation_over_training(np.zeros((4, 2, 2), np.int16), snapshots, [],
                                 n_experts=4, final_step=final_step)

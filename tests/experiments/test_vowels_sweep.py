"""The sweep over what the paper leaves open: its config, the gate's input scale, the batching, the
command and the Figure 2 run's figures."""

import json
import re

import pytest
import torch

from moekit import ExpertConfig, MixtureOfExperts
from moekit.cli import main
from moekit.data.vowels import vowel_task
from moekit.experiments import vowels_sweep
from moekit.experiments.vowels_sweep import (
    GateScaledMixture,
    Setting,
    SweepConfig,
    build_model,
    plain_mixture,
    quick_sweep,
    run_sweep,
    split_figures,
    write_sweep,
)
from moekit.fitting.replicate_engines import supports_stacked
from moekit.fitting.replicates import ReplicateConfig, train_replicates


@pytest.fixture(scope="module")
def task():
    return vowel_task()


@pytest.mark.parametrize("overrides, message", [
    ({"runs": 0}, "runs must be an integer >= 1; got runs=0."),
    ({"steps": ()}, "steps must hold one value or more, none repeated; got steps=()."),
    ({"init_scales": (1.0, 1.0)},
     "init_scales must hold one value or more, none repeated; got init_scales=(1.0, 1.0)."),
    ({"heads": ("tanh",)},
     "heads must be one of 'softmax', 'sigmoid', 'identity'; got heads='tanh'."),
    ({"gate_input_scales": (1.0, 0.0)},
     "gate_input_scales must be a finite number > 0; got gate_input_scales=0.0."),
    ({"criterion": -0.1}, "criterion must be a finite number > 0; got criterion=-0.1."),
    ({"max_epochs": 0}, "max_epochs must be an integer >= 1; got max_epochs=0."),
])
def test_config_errors_name_the_parameter_and_value(overrides, message):
    with pytest.raises(ValueError, match=re.escape(f"SweepConfig: {message}")):
        SweepConfig(**overrides)


def test_the_default_sweep_is_every_combination_in_batch_order():
    settings = SweepConfig().settings()
    assert len(settings) == 3 * 3 * 2 * 2
    assert settings[0] == Setting(0.3, 1.0, "softmax", 1.0)
    assert settings[-1] == Setting(3.0, 11.3137, "sigmoid", 10.0)
    assert [(s.head, s.gate_input_scale) for s in settings[::9]] == [
        ("softmax", 1.0), ("softmax", 10.0), ("sigmoid", 1.0), ("sigmoid", 10.0)]


def test_the_gate_input_scale_multiplies_only_the_gates_input(gen):
    plain = MixtureOfExperts(2, 4, 3, expert=ExpertConfig(head="softmax"), generator=gen).double()
    scaled = GateScaledMixture.wrap(plain, 10.0)
    x = torch.rand(7, 2, dtype=torch.float64, generator=gen)
    out = scaled(x)
    w, b = plain.gate.w_DE, plain.gate.b_E
    assert torch.allclose(out.routing.logits_NE, (10 * x) @ w + b)
    assert torch.allclose(out.expert_logits, plain.experts(x))  # the experts see x itself
    assert not torch.allclose(out.routing.probs_NE, plain(x).routing.probs_NE)
    same = plain_mixture(scaled)  # the plain mixture with the gate's weights times 10
    assert type(same) is MixtureOfExperts
    assert torch.allclose(same(x).output, out.output)
    assert torch.allclose(same(x).routing.probs_NE, out.routing.probs_NE)


def test_a_scaled_gate_trains_through_the_reference_engine(gen):
    """From the zero gate, one step moves the scaled gate's weights by 10 times the plain gate's
    (the gradient of W (10 x)), its bias and the experts alike."""
    plain = MixtureOfExperts(2, 4, 3, expert=ExpertConfig(head="softmax"), generator=gen).double()
    with torch.no_grad():
        plain.gate.w_DE.zero_()
        plain.gate.b_E.zero_()
    scaled = GateScaledMixture.wrap(plain, 10.0)
    assert supports_stacked([plain]) and not supports_stacked([scaled])
    x = torch.rand(40, 2, dtype=torch.float64, generator=gen)
    y = torch.arange(40) % 4
    config = ReplicateConfig(loss="eq3", max_epochs=1, stop_metric="mse", progress=False)
    for model in (plain, scaled):
        train_replicates([model], x, y, [0.5], config)
    assert plain.gate.w_DE.abs().max() > 0
    assert torch.allclose(scaled.gate.w_DE, 10 * plain.gate.w_DE)
    assert torch.allclose(scaled.gate.b_E, plain.gate.b_E)
    assert torch.allclose(scaled.experts.w_EDO, plain.experts.w_EDO)


def test_settings_are_batched_and_run_r_starts_from_one_draw(monkeypatch, task):
    config = quick_sweep(init_scales=(0.5, 2.0), steps=(1.0, 4.0), max_epochs=3, progress=False)
    calls = []

    def recording(models, *args, **kwargs):
        calls.append(([type(m) for m in models], list(args[2]),
                      [m.experts.w_EDO.detach().clone() for m in models],
                      [m.gate.w_DE.detach().clone() for m in models]))
        return train_replicates(models, *args, **kwargs)

    monkeypatch.setattr(vowels_sweep, "train_replicates", recording)
    result = run_sweep(config, task)
    assert len(calls) == 4 and len(result.rows) == 16  # one batch per head and gate scale
    draws = [build_model(config, Setting(1.0, 1.0, "softmax", 1.0), r).experts.w_EDO
             for r in range(2)]
    for (types, lrs, experts, gates), scale in zip(calls, (1.0, 10.0, 1.0, 10.0), strict=True):
        assert set(types) == {MixtureOfExperts if scale == 1.0 else GateScaledMixture}
        assert lrs == [1.0, 1.0, 4.0, 4.0, 1.0, 1.0, 4.0, 4.0]  # init 0.5 at both steps, then 2
        for i, w in enumerate(experts):
            init, run = (0.5, 2.0)[i // 4], i % 2
            assert torch.allclose(w, init * draws[run])
        assert all(not g.any() for g in gates)  # the protocol's unbiased start


def test_the_command_writes_one_row_per_setting(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["vowels-sweep", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "sweep.json").read_text())
    labels = [s.label for s in quick_sweep().settings()]
    assert [row["label"] for row in record["rows"]] == labels
    assert all((out / name).is_file() for name in record["files"].values())  # inside the run
    assert all(sum(row["partitions"].values()) == 2 for row in record["rows"])
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| setting | reached |") and len(table[2:2 + len(labels)]) == 4
    assert all(line.startswith(f"| {label} |") for line, label in zip(table[2:], labels,
                                                                        strict=False))
    if record["split_run"] is None:
        assert "No run divided the vowels as Figure 2" in printed
    else:
        assert f"Figures 2-3 analogues: {record['split_run']['label']}" in printed
    assert f"{out}/sweep.json" in printed


def test_a_figure_2_run_gets_both_figures_titled_with_its_setting(monkeypatch, tmp_path, task):
    monkeypatch.setattr(vowels_sweep, "partition_kind", lambda *args: "figure 2")
    config = quick_sweep(runs=2, heads=("sigmoid",), progress=False)
    result = run_sweep(config, task)
    split = result.split
    assert (split.setting, split.run) == (Setting(1.0, 8.0, "sigmoid", 1.0), 0)
    fig2, fig3 = split_figures(split, task)
    name = "(4 experts): init x1, step 8, sigmoid experts, gate input x1, run 0"
    assert fig2.get_suptitle().startswith(f"Figure 2 analogue {name}, epoch {split.epochs}")
    assert fig3.get_suptitle().startswith(f"Figure 3 analogue {name}")
    text, files = write_sweep(quick_sweep(runs=1, heads=("softmax",), gate_input_scales=(10.0,),
                                          progress=False), tmp_path, task)
    assert [f.name for f in files] == ["figure2_split_run.png", "figure3_split_run.png",
                                       "sweep.md", "sweep.json"]
    assert all(f.stat().st_size > 0 for f in files)
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["split_run"]["label"] == "init x1, step 8, softmax experts, gate input x10"
    assert ("Figures 2-3 analogues ('figure 2'): init x1, step 8, softmax experts, gate input "
            "x10, run 0") in text

"""`analyze`: statistics, figures, analysis.json and analysis.html; the vowels run's models."""

import json

import numpy as np
import pytest
import torch

from moekit import MixtureOfExperts, SparseMoE
from moekit.analysis.over_training import routing_summary
from moekit.fitting.history import History
from moekit.reports.analysis import (
    AnalysisInput,
    analysis_sections,
    analyze,
    analyze_input,
    estimator_input,
)
from moekit.reports.html import render

F64 = torch.float64


def quadrant_mixture() -> MixtureOfExperts:
    """Four experts, expert e owning the quadrant at angle pi/4 + e pi/2 (a known partition)."""
    moe = MixtureOfExperts(2, 4, 4).double()
    angles = torch.pi / 4 + torch.arange(4, dtype=F64) * torch.pi / 2
    with torch.no_grad():
        moe.gate.w_DE.copy_(20 * torch.stack([angles.cos(), angles.sin()]))
        moe.gate.b_E.zero_()
        moe.experts.w_EDO.zero_()
        moe.experts.b_EO.copy_(10 * torch.eye(4, dtype=F64))  # expert e always says class e
    return moe


def quadrant_data(gen, n=400):
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    y = torch.where(x[:, 0] > 0, torch.where(x[:, 1] > 0, 0, 3), torch.where(x[:, 1] > 0, 1, 2))
    return x, y


def test_analyze_writes_statistics_figures_and_a_report(gen, tmp_path):
    moe = quadrant_mixture()
    x, y = quadrant_data(gen)
    history = History([{"epoch": e, **{f"routing_{k}": v for k, v in
                                       routing_summary(moe, x).items()}} for e in (1, 2, 3)])
    stats = analyze(moe, x, y, out_dir=tmp_path, class_names=["NE", "NW", "SW", "SE"],
                    feature_names=["east", "north"], history=history, reference=moe,
                    reference_name="itself", title="quadrants")
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(stats))
    assert stats["expert_by_label"]["nmi"] > 0.95 and stats["dead_experts"] == []
    assert stats["importance"]["baseline"] == pytest.approx(1.0)
    assert all(r["ablated_change"] < -0.15 for r in stats["importance"]["experts"])
    assert stats["agreement"]["agreement"] == 1.0 and stats["agreement"]["reference"] == "itself"
    assert stats["posterior"]["kl_mean"] >= 0 and stats["data"]["target"] == "classes"
    assert set(stats["figures"]) == {"partition", "load", "expert_by_label", "importance",
                                     "over_training"}
    for name in stats["figures"].values():
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    page = (tmp_path / "analysis.html").read_text()
    assert page.count("data:image/png;base64,") == len(stats["figures"])
    assert "Agreement with itself" in page and "No dead expert" in page
    assert "Experts by class" in page and "NE" in page


def test_regression_targets_get_an_expert_by_target_bin_table(gen, tmp_path):
    moe = MixtureOfExperts(1, 1, 3, generator=gen).double()
    x = torch.rand(300, 1, generator=gen, dtype=F64)
    stats = analyze(moe, x, 3 * x, out_dir=tmp_path, n_target_bins=4, target_name="price")
    table = stats["expert_by_label"]
    assert table["kind"] == "target bin" and len(table["labels"]) == 4
    assert table["labels"][0].startswith("price in [")
    assert stats["importance"]["metric"] == "mse" and len(stats["data"]["target_edges"]) == 5
    assert "partition" in stats["figures"]  # one feature: the proportions along x


def test_a_routed_layer_without_targets(gen, tmp_path):
    moe = SparseMoE(6, 4, 2, hidden=8, capacity_factor=1.0, generator=gen)
    x = torch.randn(120, 6, generator=gen)
    stats = analyze(moe, x, out_dir=tmp_path, store=True)
    assert stats["posterior"] is None and stats["expert_by_label"] is None
    assert stats["coactivation"] is not None and "coactivation" in stats["figures"]
    assert stats["importance"]["metric"] == "output_mse"
    assert (tmp_path / "routing" / "manifest.json").is_file()
    assert moe.training  # analysis leaves the mode as it found it


def test_sections_can_link_figures_instead_of_embedding_them(gen, tmp_path):
    moe = quadrant_mixture()
    x, y = quadrant_data(gen, 100)
    out = tmp_path / "analysis" / "quad"
    stats = analyze(moe, x, y, out_dir=out)
    sections = analysis_sections(stats, out, heading="Quad", embed_figures=False,
                                 link_from=tmp_path)
    page = render("t", sections)
    assert "data:image/png" not in page and 'src="analysis/quad/partition.png"' in page
    assert all(s.title.startswith("Quad: ") for s in sections)


def test_analyze_input_uses_a_subfolder(gen, tmp_path):
    x, y = quadrant_data(gen, 80)
    item = AnalysisInput("quad", quadrant_mixture(), x, y, class_names=("a", "b", "c", "d"))
    stats = analyze_input(item, tmp_path)
    assert (tmp_path / "quad" / "analysis.html").is_file()
    assert stats["title"] == "moekit analysis: quad"


def test_vowels_run_saves_models_that_load_back_for_analysis(tmp_path):
    from moekit.experiments.vowels import VowelsConfig
    from moekit.experiments.vowels_models import load_vowels_run
    from moekit.experiments.vowels_run import run_vowels

    config = VowelsConfig(runs=2, experts=(2,), hidden=(), lr_grid=(4.0,), max_epochs=30,
                          compare_losses=False, compare_solvers=False, progress=False,
                          out=str(tmp_path))
    outcome = run_vowels(config)
    record = json.loads((tmp_path / "results.json").read_text())["analysis"]
    assert record["split"] == "train" and record["models"][0]["name"] == "2_experts"
    items = load_vowels_run(tmp_path)
    assert [i.name for i in items] == ["2_experts"]
    item = items[0]
    assert item.x.shape == (400, 2) and item.y.shape == (400,) and item.reference is not None
    assert item.class_names[0] == "[i]" and len(item.history) > 5
    stats = outcome.analyses["2_experts"]
    assert stats["rows"] == 400 and (tmp_path / "analysis/2_experts/analysis.json").is_file()
    report = (tmp_path / "report.html").read_text()
    assert "What the experts do (2 experts): Routing summary" in report
    assert "(partition.png)" in report and 'src="analysis/' not in report  # embedded, one file
    with pytest.raises(FileNotFoundError, match=r"no results\.json"):
        load_vowels_run(tmp_path / "nowhere")


def test_estimator_input_sees_what_the_model_sees(gen, tmp_path):
    from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor

    x, y = quadrant_data(gen, 120)
    X = 5 + 3 * x.numpy()  # the estimator standardises it back
    labels = ["ne", "nw", "sw", "se"]
    clf = MixtureOfExpertsClassifier(n_experts=2, max_epochs=5, random_state=0)
    clf.fit(X, [labels[i] for i in y])
    item = estimator_input(clf, X, [labels[i] for i in y], name="clf")
    assert item.class_names == tuple(sorted(labels)) and item.likelihood == "categorical"
    assert item.y.tolist() == [sorted(labels).index(labels[i]) for i in y]
    torch.testing.assert_close(item.x.mean(0), torch.zeros(2, dtype=item.x.dtype))
    assert analyze_input(item, tmp_path)["expert_by_label"]["labels"] == sorted(labels)

    reg = MixtureOfExpertsRegressor(n_experts=2, max_epochs=5, random_state=0)
    target = 100 + 10 * X[:, 0]
    reg.fit(X, target)
    item = estimator_input(reg, X, target, name="reg", target_name="price")
    stats = analyze_input(item, tmp_path, n_target_bins=2)
    low, high = stats["expert_by_label"]["labels"]
    median = float(np.median(target))  # bins are named in the target's own units
    assert low == f"price in [{target.min():.3g}, {median:.3g})"
    assert high == f"price in [{median:.3g}, {target.max():.3g}]"

"""`moekit vowels`: the protocol, its outputs end to end, and golden numbers for --quick."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.data.vowels import vowel_task
from moekit.experiments import vowels
from moekit.experiments.vowels import (
    StepTrial,
    System,
    VowelsConfig,
    choose_step,
    quick_config,
    run_system,
)

GOLDEN = Path(__file__).parents[1] / "assets" / "vowels_quick_golden.json"


@pytest.fixture(scope="module")
def task():
    return vowel_task()


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "vowels"
    assert main(["vowels", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    # beside the paper
    assert "4 Experts" in printed and "BP 12 Hid" in printed and "[1124]" in printed
    assert "The paper's claims on this run" in printed
    results = json.loads((out / "results.json").read_text())
    assert [row["system"] for row in results["table"]] == ["4 Experts", "8 Experts", "BP 6 Hid",
                                                           "BP 12 Hid"]
    assert {r["system"] for r in results["runs"]} >= {"4 Experts (eq1)", "4 Experts (eq2)"}
    assert all(len(r["epochs"]) == 3 for r in results["runs"])
    assert results["runs"][0]["exploration"][0]["lr"] == 4.0
    for name in ("figure2_partition", "figure3_lines_over_time", "mixing_proportions_4_experts",
                 "mixing_proportions_8_experts", "training_curves"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    report = (out / "report.html").read_text()
    assert "What this run reproduces" in report and "Step-size exploration" in report
    # the 5 figures above, then the routing analysis of each saved mixture, all embedded
    assert report.count("data:image/png;base64,") > 5 and "What the experts do" in report
    assert "<img src=\"analysis/" not in report
    # `moekit analyze` on the run folder re-analyses each saved mixture
    assert main(["analyze", str(out)]) == 0
    analyzed = capsys.readouterr().out
    assert "4_experts:" in analyzed and "8_experts:" in analyzed
    stats = json.loads((out / "analysis" / "4_experts" / "analysis.json").read_text())
    assert stats["rows"] == 400 and stats["expert_by_label"]["kind"] == "class"
    assert stats["agreement"] is not None  # compared with the run's second saved mixture
    assert "Eq. 1, Eq. 2, Eq. 3" in report
    assert "Solvers: passes over the data to the paper&#x27;s criterion" in report
    assert [r["solver"] for r in results["solvers"]] == ["gd", "adam", "lbfgs", "em", "em_gaussian"]
    assert "EM reaches the criterion in" in printed


def _golden_curve(task):
    # float64: the quick grid's steps oscillate, and float32 rounding of another CPU's BLAS can
    # move an oscillating run's stopping epoch
    config = quick_config(progress=False, dtype="float64")
    result = run_system(System("mixture", 4, "eq3"), task, config)
    return {"epochs": result.epochs_R.tolist(), "curve_run0": result.curves_RT[0, :60].tolist(),
            "train_accuracy": result.train_acc_R.tolist()}


def test_golden_numbers_of_the_quick_configuration(task):
    got = _golden_curve(task)
    if os.environ.get("MOEKIT_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1))
    want = json.loads(GOLDEN.read_text())
    # Per-epoch training error of run 0 (float32): equal up to rounding across BLAS builds.
    np.testing.assert_allclose(got["curve_run0"], want["curve_run0"], rtol=2e-4)
    assert got["epochs"] == want["epochs"]
    # Accuracy where a run stopped at the criterion; a run that hit the cap stopped mid-oscillation
    # at step 4, where float32 rounding of another CPU's BLAS moves it by up to 12 points.
    reached = [i for i, e in enumerate(want["epochs"]) if e < quick_config().max_epochs]
    assert reached, "the golden runs must include one that reached the criterion"
    np.testing.assert_allclose(np.asarray(got["train_accuracy"])[reached],
                               np.asarray(want["train_accuracy"])[reached], atol=0.5)


def test_choice_rule():
    trials = [StepTrial(0.5, 25, 0, 0, 0, 900.0), StepTrial(1.0, 25, 0, 0, 0, 450.0),
              StepTrial(2.0, 24, 1, 0, 0, None)]
    assert choose_step(trials) == 1  # fewest mean epochs among steps where every run reached it
    assert trials[2].status == "1 run(s) diverged"
    incomplete = [StepTrial(0.5, 20, 0, 5, 0, None), StepTrial(1.0, 22, 3, 0, 0, None)]
    assert choose_step(incomplete) == 1  # none complete: the most runs reached


def test_stopping_hopeless_steps_early_changes_nothing(task, monkeypatch):
    config = VowelsConfig(runs=3, lr_grid=(1.0, 4.0), max_epochs=1500, compare_losses=False,
                          progress=False)
    system = System("mixture", 4, "eq3")
    pruned = run_system(system, task, config)
    monkeypatch.setattr(vowels, "_lower_bound_rule",
                        lambda *a: lambda epoch, state: state.active_R & False)
    full = run_system(system, task, config)
    assert pruned.lr == full.lr == 4.0
    assert pruned.epochs_R.tolist() == full.epochs_R.tolist()
    assert next(t.mean_epochs for t in full.trials) > full.epochs_R.mean()  # step 1 was slower
    assert pruned.trials[0].pruned == 3 and full.trials[0].pruned == 0


def test_a_backprop_net_is_the_one_expert_case():
    net = System("backprop", 6, "eq1").build(torch.Generator().manual_seed(0), torch.float64)
    out = net(torch.rand(5, 2, dtype=torch.float64))
    torch.testing.assert_close(out.routing.probs_NE, torch.ones(5, 1, dtype=torch.float64))
    assert System("backprop", 6, "eq1").n_parameters() == 2 * 6 + 6 + 6 * 4 + 4  # 46, as in 1991
    assert System("mixture", 4, "eq3").n_parameters() == (2 * 4 + 4) * 4 + (2 * 4 + 4)  # 60


@pytest.mark.parametrize("kwargs, message", [
    ({"runs": 0}, r"runs must be an integer >= 1; got runs=0"),
    ({"average": "row"}, r"average must be one of 'unit', 'case'; got average='row'"),
    ({"loss": "eq4"}, r"loss must be one of 'eq1', 'eq2', 'eq3'; got loss='eq4'"),
    ({"lr_grid": (1.0, -2.0)}, r"lr must be a finite number > 0; got lr=-2.0"),
    ({"experts": (), "hidden": ()}, r"give at least one system"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VowelsConfig(**kwargs)


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vowels", "--runs", "0"])
    assert exit_info.value.code == 2 and "--runs must be > 0; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["vowels", "--lr-grid", "1,x"])
    assert exit_info.value.code == 2 and "comma-separated numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_full_default_run_gives_the_readings_the_readme_reports(tmp_path):
    """The main job, as `make demo` runs it: every run of Table 1 reaches the criterion; at the
    common smooth step the mixtures test at the paper's 90% and backprop needs over 1.5x their
    epochs, while a single softmax layer is as fast as the mixtures."""
    from moekit.experiments.vowels_run import run_vowels

    outcome = run_vowels(VowelsConfig(out=str(tmp_path), progress=False))
    assert all(r.reached == r.runs == 25 for r in outcome.rows)
    common = next(r for r in outcome.readings if r.key == "common_step")
    mixtures = [e for e in common.entries if e.result.system.name in ("4 Experts", "8 Experts")]
    for e in mixtures:
        train, test = e.result.train_acc_R.mean(), e.result.test_acc_R.mean()
        assert 88 <= train <= 94 and abs(test - 90) <= 4  # the paper: 88 and 90
        assert all(t.complete and t.ratio >= 1.5 and t.p_less < 1e-3 for t in e.tests)
    control = next(e for e in common.entries if e.result.system.size == 1)
    assert control.result.epochs_R.mean() <= 1.1 * min(e.result.epochs_R.mean() for e in mixtures)
    verdicts = {c.claim.split(" (")[0].split(",")[0]: c.verdict for c in outcome.claims}
    assert verdicts["Mixtures reach the criterion in about half the epochs of backprop nets"] \
        == "partly"
    assert (tmp_path / "report.html").stat().st_size > 100_000


def test_runs_that_missed_the_criterion_are_counted_by_why_they_stopped():
    from moekit.experiments.vowels_summary import describe_runs

    config = quick_config(progress=False, runs=2, lr_grid=(4.0,), max_epochs=20)
    result = run_system(System("mixture", 4, "eq3"), vowel_task(), config)
    described = describe_runs(result)
    trial = result.trials[0]
    assert (described["hit_cap"], described["diverged"], described["pruned"]) == \
        (trial.hit_cap, trial.diverged, trial.pruned)
    assert trial.hit_cap + trial.diverged + trial.pruned == 2 - trial.reached


def test_the_default_grid_covers_the_convergent_range_by_sqrt_two():
    grid = VowelsConfig().lr_grid
    assert grid[0] == 0.5 and grid[-1] == 32.0 and len(grid) == 13
    np.testing.assert_allclose(np.diff(np.log(grid)), np.log(2) / 2, atol=1e-4)


def test_the_gate_starts_unbiased_with_equal_proportions():
    x = torch.rand(9, 2, dtype=torch.float64)
    zero = System("mixture", 4, "eq3").build(torch.Generator().manual_seed(3), torch.float64)
    torch.testing.assert_close(zero(x).routing.probs_NE, torch.full((9, 4), 0.25,
                                                                     dtype=torch.float64))
    fan_in = System("mixture", 4, "eq3", gate_init="fan-in").build(
        torch.Generator().manual_seed(3), torch.float64)
    small = System("mixture", 4, "eq3", gate_init="uniform").build(
        torch.Generator().manual_seed(3), torch.float64)
    assert not torch.allclose(fan_in(x).routing.probs_NE, zero(x).routing.probs_NE)
    assert small.gate.w_DE.abs().max() <= 0.1 and small.gate.w_DE.abs().max() > 0
    for other in (fan_in, small):  # the experts do not depend on how the gate starts
        torch.testing.assert_close(other.experts.w_EDO, zero.experts.w_EDO, rtol=0, atol=0)


def test_backprop_is_trained_on_half_the_squared_error_the_one_expert_case_of_eq3():
    from moekit.fitting.objective import mixture_loss

    x = torch.rand(12, 2, dtype=torch.float64)
    d = torch.nn.functional.one_hot(torch.arange(12) % 4, 4).double()
    systems = {error: System("backprop", 6, "eq3" if error == "half" else "eq1")
               for error in ("half", "full")}
    assert [s.loss for s in vowels.systems_of(VowelsConfig())[2:]] == ["eq3", "eq3"]
    assert vowels.systems_of(VowelsConfig(backprop_error="full"))[2].loss == "eq1"
    grads = {}
    for error, system in systems.items():
        net = system.build(torch.Generator().manual_seed(0), torch.float64)
        loss = mixture_loss(system.loss, net(x), d)
        grads[error] = torch.autograd.grad(loss, list(net.parameters()))
        if error == "half":  # Eq. 3 with one expert is 1/2 ||d - o||^2, averaged over cases
            o = net(x).output
            by_hand = torch.autograd.grad(0.5 * (d - o).square().sum(-1).mean(),
                                          list(net.parameters()))
            for got, want in zip(grads[error], by_hand, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    for half, full in zip(grads["half"], grads["full"], strict=True):  # full = twice the half
        torch.testing.assert_close(full, 2 * half, rtol=1e-12, atol=1e-15)


def test_run_steps_runs_every_step_to_its_end_from_the_same_weights(task):
    config = quick_config(progress=False, runs=2)
    explored = run_system(System("mixture", 4, "eq3"), task, config)
    each = vowels.run_steps(System("mixture", 4, "eq3"), task, config, config.lr_grid)
    assert [r.lr for r in each] == list(config.lr_grid)
    assert all(len(r.trials) == 1 and r.trials[0].pruned == 0 and r.edge is None for r in each)
    same = next(r for r in each if r.lr == explored.lr)
    assert same.epochs_R.tolist() == explored.epochs_R.tolist()

"""Table 1's t-tests: the paper's pooled variance (48 df for 25 and 25 runs), worked examples."""

import numpy as np
import pytest
from scipy import stats

from moekit.experiments.vowels import StepTrial, System, VowelsConfig
from moekit.experiments.vowels_summary import compare_epochs, format_table, t_test, table_rows


def test_pooled_t_test_worked_example():
    # means 2 and 5; pooled variance ((1 + 0 + 1) + (1 + 0 + 1)) / (3 + 3 - 2) = 1;
    # t = (2 - 5) / sqrt(1 * (1/3 + 1/3)) = -3.674; 4 degrees of freedom
    t, p, df = t_test(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]), "pooled")
    assert t == pytest.approx(-3 / np.sqrt(2 / 3)) and df == 4
    assert p == pytest.approx(stats.t.cdf(t, 4))  # one-sided: the mixture needs fewer epochs


def test_welch_does_not_pool():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 9.0])
    t, _, df = t_test(a, b, "welch")
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    assert t == pytest.approx((a.mean() - b.mean()) / np.sqrt(va + vb))
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 2))  # Welch-Satterthwaite


def test_twenty_five_runs_each_give_forty_eight_degrees_of_freedom(fake):
    rng = np.random.default_rng(0)
    mixture = fake(System("mixture", 4, "eq3"), 1.0, rng.integers(1100, 1200, 25))
    net = fake(System("backprop", 6, "eq3"), 1.0, rng.integers(2100, 2300, 25))
    test = compare_epochs(mixture, net, "pooled")
    assert test.df == 48 and test.kind == "pooled" and test.complete
    assert test.ratio == pytest.approx(net.epochs_R.mean() / mixture.epochs_R.mean())
    missed = fake(System("backprop", 6, "eq3"), 1.0, [5000] * 25, reached=[False] * 25)
    assert not compare_epochs(mixture, missed, "pooled").complete


def test_a_step_at_the_edge_of_the_grid_is_flagged(fake):
    trials = [StepTrial(lr, 3, 0, 0, 0, m) for lr, m in ((1.0, 500.0), (2.0, 300.0),
                                                         (4.0, 200.0))]
    top = fake(System("mixture", 4, "eq3"), 4.0, [200, 200, 200], trials=trials)
    inside = fake(System("mixture", 4, "eq3"), 2.0, [300, 300, 300], trials=trials)
    bottom = fake(System("mixture", 4, "eq3"), 1.0, [500, 500, 500], trials=trials)
    assert (top.edge, inside.edge, bottom.edge) == ("high", None, "low")
    single = fake(System("mixture", 4, "eq3"), 1.0, [500, 500, 500])  # a fixed step has no edge
    assert single.edge is None
    text = format_table(table_rows([top, inside]), [], VowelsConfig())
    assert "4*" in text and "high end (4 Experts) of the grid explored" in text

"""How a mixture divides the four vowels, on gates set by hand: each category on its worked
example."""

import pytest
import torch

from moekit import MixtureOfExperts
from moekit.experiments.vowels_measures import partition_kind, vowel_groups

# Rows: 10 of each vowel, [i] [I] [a] [Λ] = classes 0 1 2 3; the feature is the class itself, so a
# gate can route by class: x = one-hot of the class (4 features).
Y = torch.arange(4).repeat_interleave(10)
X = torch.nn.functional.one_hot(Y, 4).double()


def _routing(owner_of_rows: list[int], n_experts: int = 4) -> MixtureOfExperts:
    """A mixture whose gate sends class c to expert owner_of_rows[c] (proportion ~1)."""
    moe = MixtureOfExperts(4, 4, n_experts).double()
    with torch.no_grad():
        moe.gate.w_DE.fill_(-20.0)
        moe.gate.b_E.zero_()
        for c, e in enumerate(owner_of_rows):
            moe.gate.w_DE[c, e] = 20.0
    return moe


@pytest.mark.parametrize("owners, kind, groups", [
    ([0, 0, 1, 2], "figure 2", "[i] [I] | [a] | [Λ]"),  # [i]/[I] one expert, [a]/[Λ] two
    ([0, 1, 2, 2], "front split", "[i] | [I] | [a] [Λ]"),
    ([0, 0, 1, 1], "one per pair", "[i] [I] | [a] [Λ]"),
    ([0, 1, 1, 1], "crossing", "[i] | [I] [a] [Λ]"),  # expert 1 takes [I] with [a]/[Λ]
    ([3, 3, 3, 3], "one expert", "[i] [I] [a] [Λ]"),
])
def test_partition_categories(owners, kind, groups):
    moe = _routing(owners)
    assert partition_kind(moe, X, Y) == kind
    assert vowel_groups(moe, X, Y) == groups


def test_a_pair_split_between_two_experts_counts_from_a_tenth_of_its_rows():
    moe = _routing([0, 0, 1, 1])
    with torch.no_grad():  # two [Λ] rows of ten (a fifth of the back pair's 20) to expert 2
        x = X.clone()
        x[[38, 39], 3] = 0.0
        x[[38, 39], 2] = 0.0
        moe.gate.w_DE[:, 2] = -20.0
        moe.gate.b_E[2] = 5.0  # a row with no feature set goes to expert 2
    assert partition_kind(moe, x, Y) == "figure 2"


def test_an_expert_never_primary_does_not_count_as_taking_a_pair():
    moe = _routing([0, 0, 1, 1], n_experts=8)
    assert partition_kind(moe, X, Y) == "one per pair"


def test_figure_2_needs_the_other_experts_inactive():
    moe = _routing([0, 0, 1, 2], n_experts=5)
    with torch.no_grad():  # expert 4 takes no pair but keeps a mean proportion over 1%
        moe.gate.b_E[4] = 37.5  # its logit 17.5 against the owner's 20: about 8%
    assert partition_kind(moe, X, Y) == "figure 2, more active"
    assert partition_kind(_routing([0, 0, 1, 2], n_experts=5), X, Y) == "figure 2"

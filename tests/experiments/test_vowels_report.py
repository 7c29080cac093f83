"""Which run the report's Figure 2 is drawn from: one divided as the paper's, else a typical one."""

from moekit.experiments.vowels import System
from moekit.experiments.vowels_report import figure2_run, figure2_system

MIX4, MIX8 = System("mixture", 4, "eq3"), System("mixture", 8, "eq3")


def test_figure_2_is_drawn_from_a_run_divided_as_the_papers(fake):
    parts = ["crossing", "one expert", "figure 2", "crossing"]
    assert figure2_run(fake(MIX4, 1.0, [10] * 4, partitions=parts)) == 2


def test_without_such_a_run_figure_2_shows_the_most_common_division(fake):
    parts = ["one expert", "crossing", "crossing", "one per pair"]
    assert figure2_run(fake(MIX4, 1.0, [10] * 4, partitions=parts)) == 1


def test_the_smallest_mixture_with_a_split_run_is_drawn(fake):
    four = fake(MIX4, 1.0, [10] * 2, partitions=["crossing", "crossing"])
    eight = fake(MIX8, 1.0, [10] * 2, partitions=["crossing", "figure 2"])
    assert figure2_system([four, eight]) is eight
    eight.partition_R[1] = "crossing"
    assert figure2_system([eight, four]) is four

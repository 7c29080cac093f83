import pytest
import torch

from moekit.datasets import piecewise_linear


def test_pieces_without_noise_follow_the_lines():
    x, y = piecewise_linear(500, breaks=(0.5,), pieces=((1.0, 0.0), (0.0, 2.0)), noise=0.0,
                            generator=torch.Generator().manual_seed(0))
    left = x[:, 0] < 0.5
    torch.testing.assert_close(y[left], x[left])  # y = x on the left
    torch.testing.assert_close(y[~left], torch.full_like(y[~left], 2.0))  # y = 2 on the right


def test_bad_arguments():
    with pytest.raises(ValueError, match="pieces must have len\\(breaks\\) \\+ 1 = 2 entries; got 3"):
        piecewise_linear(10, breaks=(0.5,), pieces=((1, 0), (1, 0), (1, 0)))
    with pytest.raises(ValueError, match="breaks must be increasing and inside"):
        piecewise_linear(10, breaks=(1.5,))
    with pytest.raises(ValueError, match="n must be an integer >= 1; got n=0"):
        piecewise_linear(0)


# --- the Peterson & Barney vowels of Jacobs et al. (1991) -----------------------------------------
import dataclasses  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402

from moekit.datasets import (VOWEL_CODES, VowelLabelError, check_vowel_labels,  # noqa: E402
                             peterson_barney, vowel_task)


@pytest.fixture(scope="module")
def table():
    return peterson_barney()


def test_the_1952_table(table):
    assert len(table) == 1520  # 76 speakers x 10 vowels x 2 tokens
    assert sorted(set(table.speaker.tolist())) == list(range(1, 77))
    four = table.select(np.isin(table.vowel, VOWEL_CODES))
    assert len(four) == 608  # 76 speakers x 4 vowels x 2 tokens
    assert Counter(four.vowel.tolist()) == {"iy": 152, "ih": 152, "aa": 152, "ah": 152}
    # speakers 1-33 men, 34-61 women, 62-76 children
    assert set(table.type[table.speaker <= 33]) == {"m"} and set(table.type[table.speaker >= 62]) == {"c"}
    assert table.to_records()[0] == {"speaker": 1, "type": "m", "sex": "m", "vowel": "iy", "ipa": "i",
                                     "f0": 160.0, "f1": 240.0, "f2": 2280.0, "f3": 2850.0}


def test_the_papers_split(table):
    task = vowel_task(table=table)
    assert task.x_train.shape == (400, 2) and task.x_test.shape == (200, 2)
    assert set(task.speakers_train) == set(range(1, 51)) and set(task.speakers_test) == set(range(51, 76))
    assert Counter(task.y_train.tolist()) == {0: 100, 1: 100, 2: 100, 3: 100}
    # inputs are (F1, F2) / 1000: speaker 1's first [i] is (240, 2280) Hz
    assert task.x_train[0].tolist() == [0.24, 2.28] and task.y_train[0].item() == 0
    with_76 = vowel_task(table=table, include_speaker_76=True)
    assert with_76.x_test.shape == (208, 2)


def test_overlapping_speakers_are_refused(table):
    with pytest.raises(ValueError, match=r"speakers \[50\] are in both"):
        vowel_task(table=table, train_speakers=range(1, 51), test_speakers=range(50, 76))


def test_swapped_aa_ah_labels_fail_loudly(table):
    swapped = table.vowel.copy()
    swapped[table.vowel == "aa"], swapped[table.vowel == "ah"] = "ah", "aa"
    with pytest.raises(VowelLabelError, match="aa/ah labels are swapped"):
        check_vowel_labels(dataclasses.replace(table, vowel=swapped))


def test_altered_table_fails_loudly(table):
    f1 = table.f1.copy()
    f1[(table.speaker == 1) & (table.vowel == "aa")] += 5
    with pytest.raises(VowelLabelError, match="differs from the 1952 data"):
        check_vowel_labels(dataclasses.replace(table, f1=f1))

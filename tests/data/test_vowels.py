"""The Peterson & Barney vowels of Jacobs et al. (1991)."""

import dataclasses
from collections import Counter

import numpy as np
import pytest

from moekit.data.vowels import VOWEL_CODES, check_vowel_labels, peterson_barney, vowel_task
from moekit.exceptions import VowelLabelError


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
    assert (set(table.type[table.speaker <= 33]) == {"m"}
            and set(table.type[table.speaker >= 62]) == {"c"})
    assert table.to_records()[0] == {"speaker": 1, "type": "m", "sex": "m", "vowel": "iy",
                                     "ipa": "i", "f0": 160.0, "f1": 240.0, "f2": 2280.0,
                                     "f3": 2850.0}


def test_the_papers_split(table):
    task = vowel_task(table=table)
    assert task.x_train.shape == (400, 2) and task.x_test.shape == (200, 2)
    assert (set(task.speakers_train) == set(range(1, 51))
            and set(task.speakers_test) == set(range(51, 76)))
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

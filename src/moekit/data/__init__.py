"""Data: the Peterson & Barney (1952) vowels of the 1991 paper (:mod:`~moekit.data.vowels`),
synthetic tasks with a known answer (:mod:`~moekit.data.synthetic`), and a user's CSV table
(:mod:`~moekit.data.tabular`)."""

from moekit.data.synthetic import piecewise_linear
from moekit.data.tabular import Preprocessing, prepare_fit, read_csv
from moekit.data.vowels import (
                                VOWEL_CODES,
                                VOWEL_LABELS,
                                FormantTable,
                                VowelTask,
                                peterson_barney,
                                vowel_task,
)

__all__ = [
    "VOWEL_CODES",
    "VOWEL_LABELS",
    "FormantTable",
    "Preprocessing",
    "VowelTask",
    "peterson_barney",
    "piecewise_linear",
    "prepare_fit",
    "read_csv",
    "vowel_task",
]

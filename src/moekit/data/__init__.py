"""Data: the Peterson & Barney (1952) vowels of the 1991 paper (:mod:`~moekit.data.vowels`),
synthetic tasks with a known answer (:mod:`~moekit.data.synthetic`), a user's CSV table
(:mod:`~moekit.data.tabular`), and Python source as bytes (:mod:`~moekit.data.source_text`)
labelled by token category (:mod:`~moekit.data.token_categories`)."""

from moekit._lazy import lazy_names as _lazy_names
from moekit.data.source_text import ByteCorpus, CorpusSplit, stdlib_corpus, text_corpus
from moekit.data.synthetic import piecewise_linear
from moekit.data.token_categories import CATEGORIES, label_byte_classes, label_python
from moekit.data.vowels import (
                                VOWEL_CODES,
                                VOWEL_LABELS,
                                FormantTable,
                                VowelTask,
                                peterson_barney,
                                vowel_task,
)

# The tables' names import pandas (0.2 s) when first asked for: the worker processes of `moekit
# vowels` import moekit.data.vowels, which runs this file first.
_LAZY = {
    "Preprocessing": "moekit.data.tabular",
    "prepare_fit": "moekit.data.tabular",
    "read_csv": "moekit.data.tabular",
}

__all__ = [
    "CATEGORIES",
    "VOWEL_CODES",
    "VOWEL_LABELS",
    "ByteCorpus",
    "CorpusSplit",
    "FormantTable",
    "Preprocessing",
    "VowelTask",
    "label_byte_classes",
    "label_python",
    "peterson_barney",
    "piecewise_linear",
    "prepare_fit",
    "read_csv",
    "stdlib_corpus",
    "text_corpus",
    "vowel_task",
]


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

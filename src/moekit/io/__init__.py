"""Reading and writing: model folders (:mod:`~moekit.io.models`) and atomic, JSON-ready files
(:mod:`~moekit.io.files`)."""

from moekit._lazy import lazy_names as _lazy_names
from moekit.io.files import atomic_path, jsonable, write_text_atomic

# The model folders' names import torch and the models when first asked for: the `moekit`
# command imports moekit.io.paths to check --out before anything heavy.
_LAZY = dict.fromkeys(
    ("MODEL_CLASSES", "config_from_dict", "load_model", "read_header", "save_model"),
    "moekit.io.models")

__all__ = [
    "MODEL_CLASSES",
    "atomic_path",
    "config_from_dict",
    "jsonable",
    "load_model",
    "read_header",
    "save_model",
    "write_text_atomic",
]


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

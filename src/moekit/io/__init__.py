"""Reading and writing: model folders (:mod:`~moekit.io.models`) and atomic, JSON-ready files
(:mod:`~moekit.io.files`)."""

from moekit.io.files import atomic_path, jsonable, write_text_atomic
from moekit.io.models import MODEL_CLASSES, config_from_dict, load_model, read_header, save_model

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

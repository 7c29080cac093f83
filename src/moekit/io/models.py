"""Saving and loading fitted models: safetensors weights plus a JSON config, written atomically.

A model folder holds two files:

    config.json         {"format": "moekit-model", "format_version": 1, "class": ..., "config": ...,
                         "metadata": ...}
    model.safetensors   the state dict

Each file is written atomically (:func:`moekit.io.files.atomic_path`), both with the mode the
atomic writer gives (0o644: readable like any saved result). ``MODEL_CLASSES`` is the registry of
the classes a folder can name; each has ``config``, ``config_class`` and ``from_config``.

Loading checks before it allocates, in this order: config.json (a bounded read, the envelope, each
config value's type and range: :mod:`moekit.io.header`); the model the config implies, built on
the ``meta`` device (shapes, no memory); the weights file's header alone (floating dtypes, offsets
inside the file: :mod:`moekit.io.weights`); the number of values and every tensor's name and shape
against the config; only then the tensors are read, and NaN or inf in them is refused. Every
problem is a :class:`~moekit.exceptions.DataError` naming the folder, the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit._version import __version__
from moekit.exceptions import DataError
from moekit.io.files import atomic_path, write_text_atomic
from moekit.io.header import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    config_from_dict,
    read_header,
    size_fields,
)
from moekit.io.records import FIX
from moekit.io.weights import check_weights_fit, load_weights, read_weights_header, write_weights
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.hierarchical import HierarchicalMixtureOfExperts
from moekit.nn.lm import MoETransformerLM
from moekit.nn.localized import LocalizedMixtureOfExperts
from moekit.nn.sparse import SparseMoE

# Classes save_model can write; each has ``config``, ``config_class`` and ``from_config``.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (MixtureOfExperts, SparseMoE, HierarchicalMixtureOfExperts,
                                  LocalizedMixtureOfExperts, MoETransformerLM)}


def save_model(model: nn.Module, directory: Path | str, *,
               metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (weights and config) into ``directory``, creating it; returns the folder.

    ``metadata`` is any JSON-serialisable dict stored beside the config (feature names, class
    labels). The weights keep the model's floating dtype (float16, bfloat16, float32 or float64).

    Example:
        >>> from moekit import MixtureOfExperts
        >>> save_model(MixtureOfExperts(2, 1, 3), "runs/model")  # doctest: +SKIP
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"save_model: cannot save a {name}; "
                        f"savable classes: {sorted(MODEL_CLASSES)}.")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"save_model: metadata must be a dict; got {type(metadata).__name__}.")
    directory = Path(directory)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moekit_version": __version__,
        "class": name,
        "config": dataclasses.asdict(model.config),
        "metadata": metadata or {},
    }
    text = json.dumps(header, indent=2, sort_keys=True)  # fails here, before anything is written
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        write_weights(state, tmp)
    write_text_atomic(directory / CONFIG_FILE, text)
    return directory


def _meta_model(cls: type[nn.Module], config: Any, config_path: Path) -> nn.Module:
    """The model ``config`` describes, built on the meta device: its tensors have shapes and no
    memory, so a config asking for terabytes costs nothing to inspect."""
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:  # sizes past int64
        sizes = ", ".join(f"{k}={v:,}" for k, v in size_fields(config).items())
        raise DataError(f"load_model: {str(config_path)!r}: the config ({sizes}) describes no "
                        f"model that can exist ({err}). {FIX}") from None


def load_model(directory: Path | str, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model`; its outputs equal the saved model's.

    The folder's metadata is available as ``model.metadata``. The weights keep their saved dtype.
    Nothing is allocated before config.json and the weights file's header agree (see the module's
    docstring); a folder that does not pass is a :class:`~moekit.exceptions.DataError`.
    """
    directory = Path(directory)
    header = read_header(directory, classes=MODEL_CLASSES)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    cls = MODEL_CLASSES[header["class"]]
    try:
        config = config_from_dict(cls.config_class, header["config"])
    except ValueError as err:
        raise DataError(f"load_model: {str(config_path)!r}: {err} {FIX}") from None
    model = _meta_model(cls, config, config_path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    entries = read_weights_header(weights_path)
    check_weights_fit(weights_path, entries, expected, size_fields(config))
    state = load_weights(weights_path, str(map_location))
    model.load_state_dict(state, strict=True, assign=True)  # the meta tensors become the loaded
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"load_model: {cls.__name__} has tensors the state dict does not set: {left}"
    model.metadata = header["metadata"]
    model.eval()
    return model


__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "MODEL_CLASSES", "WEIGHTS_FILE",
           "config_from_dict", "load_model", "read_header", "save_model"]

"""Saving and loading fitted models: safetensors weights plus a JSON config, written atomically.

A model folder holds two files:

    config.json         {"format": "moekit-model", "format_version": 1, "class": ..., "config": ...,
                         "metadata": ...}
    model.safetensors   the state dict

Each file is written atomically (:func:`moekit.io.files.atomic_path`). ``MODEL_CLASSES`` is the
registry of the classes a folder can name; each has ``config``, ``config_class`` and
``from_config``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moekit._version import __version__
from moekit.io.files import atomic_path, write_text_atomic
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.hierarchical import HierarchicalMixtureOfExperts
from moekit.nn.localized import LocalizedMixtureOfExperts
from moekit.nn.sparse import SparseMoE

FORMAT = "moekit-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Classes save_model can write; each has ``config``, ``config_class`` and ``from_config``.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (MixtureOfExperts, SparseMoE, HierarchicalMixtureOfExperts,
                                  LocalizedMixtureOfExperts)}


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from a dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object; got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; "
                         f"known keys: {sorted(names)}.")
    kwargs = {}
    for name, value in data.items():
        field_type = hints[name]
        nested = dataclasses.is_dataclass(field_type) and isinstance(value, dict)
        kwargs[name] = config_from_dict(field_type, value) if nested else value
    return cls(**kwargs)


def save_model(model: nn.Module, directory: Path | str, *,
               metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (weights and config) into ``directory``, creating it; returns the folder.

    ``metadata`` is any JSON-serialisable dict stored beside the config (feature names, class
    labels).

    Example:
        >>> from moekit import MixtureOfExperts
        >>> save_model(MixtureOfExperts(2, 1, 3), "runs/model")  # doctest: +SKIP
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"save_model: cannot save a {name}; "
                        f"savable classes: {sorted(MODEL_CLASSES)}.")
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
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_text_atomic(directory / CONFIG_FILE, text)
    return directory


def read_header(directory: Path | str) -> dict[str, Any]:
    """Read and check a model folder's config.json; errors say what is wrong with the folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_model: no model folder at {str(directory)!r}.")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ValueError(f"load_model: {str(directory)!r} is not a moekit model folder: it needs "
                         f"{CONFIG_FILE} and {WEIGHTS_FILE}.")
    try:
        header = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_model: {str(config_path)!r} is not valid JSON ({err}); the folder "
                         "is corrupted.") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"load_model: {str(config_path)!r} is not a moekit model config "
                         f"(format="
                         f"{header.get('format') if isinstance(header, dict) else None!r}).")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_model: format_version={header.get('format_version')!r} is not "
                         f"supported by moekit {__version__} (supports {FORMAT_VERSION}).")
    return header


def load_model(directory: Path | str, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model`; its outputs equal the saved model's.

    The folder's metadata is available as ``model.metadata``.
    """
    directory = Path(directory)
    header = read_header(directory)
    cls = MODEL_CLASSES.get(header.get("class"))
    if cls is None:
        raise ValueError(f"load_model: unknown model class {header.get('class')!r}; "
                         f"known: {sorted(MODEL_CLASSES)}.")
    try:
        config = config_from_dict(cls.config_class, header["config"])
    except (TypeError, KeyError) as err:
        raise ValueError(f"load_model: the config in {str(directory)!r} is invalid: {err}") from err
    model = cls.from_config(config)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"load_model: cannot read {WEIGHTS_FILE} in {str(directory)!r}: "
                         f"{err}") from err
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) == 1:
        model = model.to(dtype=dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"load_model: the weights in {str(directory)!r} do not fit the saved "
                         f"config: {err}") from err
    model.metadata = header.get("metadata", {})
    model.eval()
    return model

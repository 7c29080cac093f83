"""A model folder's config.json read back and checked before anything is built from it.

config.json holds ``{"format": "moekit-model", "format_version": 1, "class": ..., "config": ...,
"metadata": ...}``. :func:`read_header` checks the envelope (a bounded read; the format, its
version, a known class, a config and metadata that are JSON objects); :func:`config_from_dict`
rebuilds the config dataclass field by field, checking each value against the field's type (a bool
is not an integer, 4.0 is not an integer, a float must be finite) before the dataclass's own range
checks run.
A key the saved config lacks takes the value the dataclass names in ``LEGACY_DEFAULTS`` (what a
folder saved before that field existed meant), else its default, so old folders load unchanged.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from moekit._version import __version__
from moekit.exceptions import DataError
from moekit.io.records import SavedRecord, describe, is_finite_number, read_json_file

FORMAT = "moekit-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_INT64 = 2**63  # no tensor dimension, and no count of them, reaches this
_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _fits(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return is_finite_number(value)
    if kind is str:
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    return True  # a type this reader does not know: the dataclass's own checks judge it


def _check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it has the type ``hint`` allows (an int stands for a float), else a ValueError
    naming the field."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) \
        else (hint,)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT64:
        raise ValueError(f"{name} must be an integer below 2**63 (a tensor size); got "
                         f"{describe(value)}.")
    if not any(_fits(value, kind) for kind in options):
        need = " or ".join(_KINDS.get(kind, "null" if kind is type(None) else str(kind))
                           for kind in options)
        raise ValueError(f"{name} must be {need}; got {describe(value)}.")
    if float in options and not isinstance(value, (bool, type(None))) and int not in options:
        return float(value)
    return value


def config_from_dict(cls: type, data: dict[str, Any], *, field: str = "config") -> Any:
    """Rebuild a (possibly nested) config dataclass from a dict, checking each value's type first.

    Unknown keys are refused; missing keys with a default take it. Errors are ValueErrors that name
    the field (``config.expert.hidden``).

    Example:
        >>> from moekit.nn.experts import ExpertConfig
        >>> config_from_dict(ExpertConfig, {"kind": "mlp", "hidden": 8})
        ExpertConfig(kind='mlp', hidden=8, activation='tanh', head='identity')
        >>> config_from_dict(ExpertConfig, {"hidden": True})
        Traceback (most recent call last):
        ...
        ValueError: config.hidden must be an integer; got true (a boolean).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{field} ({cls.__name__}) must be a JSON object; got {describe(data)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{field}: {cls.__name__}: unknown config keys {unknown}; known keys: "
                         f"{sorted(fields)}.")
    legacy = getattr(cls, "LEGACY_DEFAULTS", {})
    kwargs = {}
    for name, spec in fields.items():
        where = f"{field}.{name}"
        if name not in data:
            required = (spec.default is dataclasses.MISSING
                        and spec.default_factory is dataclasses.MISSING)
            if required:
                raise ValueError(f"{where} is missing ({cls.__name__} needs it).")
            if name in legacy:  # a field added later: what folders saved before it meant
                kwargs[name] = legacy[name]
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = config_from_dict(hint, data[name], field=where)
        else:
            kwargs[name] = _check_value(where, data[name], hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # the dataclass's own checks: ranges, choices
        raise ValueError(f"{field}: {err}") from None


def size_fields(config: Any, prefix: str = "") -> dict[str, int]:
    """Every integer field of a config, nested ones dotted: what sets the model's size.

    Example:
        >>> from moekit.nn.dense import MoEConfig
        >>> size_fields(MoEConfig(2, 1, 3))
        {'in_features': 2, 'out_features': 1, 'n_experts': 3, 'expert.hidden': 16}
    """
    sizes: dict[str, int] = {}
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if dataclasses.is_dataclass(value):
            sizes.update(size_fields(value, f"{prefix}{spec.name}."))
        elif isinstance(value, int) and not isinstance(value, bool):
            sizes[f"{prefix}{spec.name}"] = value
    return sizes


def read_header(directory: Path | str, *, classes: typing.Iterable[str] | None = None
                ) -> dict[str, Any]:
    """Read and check a model folder's config.json; errors say what is wrong with the folder.

    Checked: the folder and both files exist; config.json is at most
    :data:`~moekit.io.records.MAX_JSON_BYTES`, valid JSON, a moekit model config of this format
    version; ``class`` is a string (one of ``classes`` when given); ``config`` and ``metadata`` are
    JSON objects (a missing ``metadata`` is empty).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_model: no model folder at {str(directory)!r}.")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise DataError(f"load_model: {str(directory)!r} is not a moekit model folder: it needs "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE}.")
    header = read_json_file("load_model", config_path)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise DataError(f"load_model: {str(config_path)!r} is not a moekit model config "
                        f"(format={found!r}).")
    record = SavedRecord("load_model", config_path, "", header)
    version = header.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise DataError(f"load_model: {str(config_path)!r}: format_version={describe(version)} is "
                        f"not supported by moekit {__version__} (supports {FORMAT_VERSION}).")
    name = record.text("class")
    known = None if classes is None else sorted(classes)
    if known is not None and name not in known:
        raise record.error(f"unknown model class {name!r}; known: {known}.")
    record.child("config")
    header.setdefault("metadata", {})
    record.child("metadata")
    return header


__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "config_from_dict",
           "read_header", "size_fields"]

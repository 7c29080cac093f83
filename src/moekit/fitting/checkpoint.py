"""Checkpoints of a fit, and the checks that a resumed fit is the one that wrote them.

A gradient fit's checkpoint holds the model, the optimizer, the history, the shuffling generator and
the callbacks' state, written atomically, so that ``fit(..., resume=True)`` continues where a run
stopped (or was killed) and ends with the weights an uninterrupted run would have, bit for bit.

It also records what it belongs to (:func:`fit_identity`): the model's class, config and every
parameter's dtype and shape; the TrainConfig; the optimizer's class and hyper-parameters; and a
:func:`fingerprint` of every data tensor. Resuming with another identity would continue some other
fit as if it were this one (another lr silently ignored, another optimizer's state loaded into this
one), so it is refused with a :class:`~moekit.exceptions.DataError` naming each difference. Only
``RESUME_MAY_CHANGE`` may differ: ``max_epochs`` (raised, or at least the epochs already run),
``progress``, ``progress_label``, ``on_interrupt``, ``checkpoint_path``, ``checkpoint_every``; and
the callbacks (one of the same class at the same position gets its saved state back). A file
that cannot be read is refused by name.

An EM fit is short and deterministic, so it is saved whole when it ends (:func:`save_em_result`):
a finished fit is read back instead of run again, one interrupted midway runs again from its start.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.exceptions import DataError, Setting
from moekit.fitting.callbacks import Callback, TrainState
from moekit.fitting.em_config import EMConfig, EMResult
from moekit.fitting.history import History
from moekit.io.files import atomic_path

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: checkpoints that recorded no identity (they cannot be checked, so not resumed)
RESUME_MAY_CHANGE = ("max_epochs", "progress", "progress_label", "on_interrupt", "checkpoint_path",
                     "checkpoint_every")
RESUMABLE = ("epoch", "stop", "stop_reason", "best", "epochs_since_best")
# The parts of an identity, each with the words its fix uses; a part is compared only when the part
# it is derived from agrees (parameter shapes follow the model's config, the optimizer's
# hyper-parameters the TrainConfig), so that one cause is named once.
PARTS = {"model": "model", "parameters": "model", "train_config": "TrainConfig",
         "optimizer": "TrainConfig", "em_config": "EMConfig", "data": "data"}
DERIVED = {"parameters": "model", "optimizer": "train_config"}
SETTINGS = ("model", "train_config", "em_config")  # parts whose entries are named parameters
Identity = dict[str, dict[str, Any]]


def fingerprint(values: Tensor | np.ndarray) -> str:
    """A numeric tensor's or array's dtype, shape and the SHA-256 of its bytes (the first 16 hex
    digits): equal for equal values, and, but for a hash collision, different for any other.

    Example:
        >>> fingerprint(torch.zeros(2, 3, dtype=torch.float64)) == fingerprint(np.zeros((2, 3)))
        True
        >>> fingerprint(np.zeros((2, 3)))
        'float64 (2, 3) sha256:17b0761f87b081d5'
    """
    if isinstance(values, Tensor):
        flat = values.detach().cpu().contiguous().reshape(-1)
        dtype, data = str(values.dtype).removeprefix("torch."), flat.view(torch.uint8).numpy()
    else:  # read as it is: a read-only array needs no copy
        dtype, data = str(values.dtype), np.ascontiguousarray(values)
    digest = hashlib.sha256(data).hexdigest()
    return f"{dtype} {tuple(values.shape)} sha256:{digest[:16]}"


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def _flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass as {dotted field: value}, nested configs flattened."""
    if not dataclasses.is_dataclass(config):
        return {}
    flat: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flat_config(value, f"{prefix}{item.name}."))
        else:
            flat[prefix + item.name] = _plain(value)
    return flat


def _model_identity(model: nn.Module) -> Identity:
    return {"model": {"model": type(model).__name__,
                      **_flat_config(getattr(model, "config", None))},
            "parameters": {name: f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
                           for name, t in model.state_dict().items()}}


def _data_identity(data: dict[str, Tensor | None]) -> dict[str, str]:
    return {name: fingerprint(t) for name, t in data.items() if t is not None}


def fit_identity(model: nn.Module, optimizer: torch.optim.Optimizer, config: Any,
                 data: dict[str, Tensor | None]) -> Identity:
    """What a gradient fit's checkpoint belongs to: the model, the TrainConfig (less
    ``RESUME_MAY_CHANGE``), the optimizer and the data (``{"x": x, "y": y, ...}``)."""
    groups = optimizer.param_groups
    hyper = {(k if len(groups) == 1 else f"group{i}.{k}"): _plain(v)
             for i, group in enumerate(groups) for k, v in group.items() if k != "params"}
    return {**_model_identity(model),
            "train_config": {k: _plain(v) for k, v in dataclasses.asdict(config).items()
                             if k not in RESUME_MAY_CHANGE},
            "optimizer": {"optimizer class": type(optimizer).__name__, **hyper},
            "data": _data_identity(data)}


_ABSENT = object()


def _entry(part: str, name: str, value: Any) -> str | Setting:
    if value is _ABSENT:
        return f"no {name}"
    return Setting(name, value) if part in SETTINGS else f"{name}: {value}"


def _differences(saved: Identity, current: Identity) -> list[tuple[str, str, Any, Any]]:
    """(part, name, saved value, current value) for every entry that differs."""
    found: list[tuple[str, str, Any, Any]] = []
    for part in PARTS:
        if part not in current or any(d[0] == DERIVED.get(part) for d in found):
            continue
        old, new = saved.get(part, {}), current[part]
        if part == "model" and old.get("model") != new.get("model"):  # another class: only that
            found.append((part, "model", old.get("model", _ABSENT), new["model"]))
            continue
        found.extend((part, name, old.get(name, _ABSENT), new.get(name, _ABSENT))
                     for name in dict.fromkeys([*old, *new])
                     if old.get(name, _ABSENT) != new.get(name, _ABSENT))
    return found


def _joined(items: list[str | Setting]) -> list[str | Setting]:
    parts: list[str | Setting] = []
    for i, item in enumerate(items):
        parts.extend([", "] if i else [])
        parts.append(item)
    return parts


def check_identity(owner: str, path: Path, saved: Identity, current: Identity,
                   restart: str) -> None:
    """Raise a DataError naming every difference between a checkpoint's identity and this call's;
    ``restart`` says how to start afresh instead (e.g. 'start a new fit without resume=True')."""
    found = _differences(saved, current)
    if not found:
        return
    fixes = " and ".join(dict.fromkeys(PARTS[part] for part, *_ in found))
    raise DataError(f"{owner}: the checkpoint at {str(path)!r} was written with ",
                    *_joined([_entry(part, name, old) for part, name, old, _ in found]),
                    "; this call has ",
                    *_joined([_entry(part, name, new) for part, name, _, new in found]),
                    f"; resume with the same {fixes}, or {restart}.")


def read_checkpoint(owner: str, path: Path, kind: str) -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, or a DataError naming the file when it cannot be
    read, is truncated or corrupted, or is not a moekit checkpoint of this ``kind`` and format."""
    try:
        payload = torch.load(path, weights_only=True)
    except PermissionError as err:
        raise DataError(f"{owner}: the checkpoint {str(path)!r} cannot be read "
                        f"({err.strerror or err}); check its permissions.") from err
    except Exception as err:  # a truncated zip, a damaged pickle, another file: all unusable
        raise DataError(f"{owner}: the checkpoint {str(path)!r} is truncated or corrupted (it "
                        "cannot be loaded); delete it to start the fit again, or put back an "
                        "intact copy.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT \
            or payload.get("kind") != kind:
        raise DataError(f"{owner}: {str(path)!r} is not a checkpoint of a {kind} fit written by "
                        f"this moekit (format {FORMAT}); delete it to start the fit again.")
    return payload


def _callback_key(index: int, callback: Callback) -> str:
    return f"{index}:{type(callback).__name__}"


def save_checkpoint(state: TrainState, generator: torch.Generator,
                    callbacks: Sequence[Callback], identity: Identity) -> None:
    """Write the fit's state to ``state.config.checkpoint_path`` atomically."""
    payload = {
        "format": FORMAT, "kind": "gradient", "identity": identity,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "history": state.history.to_list(),
        "generator": generator.get_state(),
        "callbacks": {_callback_key(i, c): c.state_dict() for i, c in enumerate(callbacks)},
        **{name: getattr(state, name) for name in RESUMABLE},
    }
    with atomic_path(Path(state.config.checkpoint_path)) as tmp:
        torch.save(payload, tmp)


def _remove_temporaries(path: Path) -> None:
    """Delete what writes of this checkpoint killed midway left (see ``atomic_path``)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(state: TrainState, generator: torch.Generator,
                    callbacks: Sequence[Callback], identity: Identity) -> None:
    """Restore a fit's state from its checkpoint, if the file exists (else start from epoch 0),
    after checking that it belongs to this fit (``identity``)."""
    path = Path(state.config.checkpoint_path)
    _remove_temporaries(path)
    if not path.is_file():
        logger.info("resume: no checkpoint at %s; starting from epoch 0", path)
        return
    payload = read_checkpoint("fit", path, "gradient")
    check_identity("fit", path, payload["identity"], identity,
                   "start a new fit without resume=True")
    if payload["epoch"] > state.config.max_epochs:
        raise DataError(f"fit: the checkpoint at {str(path)!r} has run {payload['epoch']} epochs; "
                        "this call has ", Setting("max_epochs", state.config.max_epochs),
                        "; pass ", Setting("max_epochs", payload["epoch"]),
                        " or more to resume it.")
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    state.history = History(payload["history"])
    for name in RESUMABLE:
        setattr(state, name, payload[name])
    for i, callback in enumerate(callbacks):
        saved = payload["callbacks"].get(_callback_key(i, callback))
        if saved is not None:
            callback.load_state_dict(saved)
    if state.stop_reason == "max_epochs":  # a run that hit its cap goes on if the cap was raised
        state.stop_reason = None
    logger.info("resume: continuing from epoch %d of %s", state.epoch, path)


def _em_identity(model: nn.Module, config: EMConfig, data: dict[str, Tensor | None]) -> Identity:
    em = {k: _plain(v) for k, v in dataclasses.asdict(config).items()
          if k not in ("max_iter", "progress")}
    return {**_model_identity(model), "em_config": em, "data": _data_identity(data)}


def save_em_result(path: Path | str, model: nn.Module, result: EMResult,
                   data: dict[str, Tensor | None]) -> None:
    """Write a finished EM fit (the model's weights and the result) to ``path`` atomically."""
    payload = {"format": FORMAT, "kind": "em",
               "identity": _em_identity(model, result.config, data),
               "max_iter": result.config.max_iter, "model": model.state_dict(),
               "history": result.history.to_list(), "variance_E": result.variance_E,
               **{k: getattr(result, k) for k in ("n_iter", "converged", "stop_reason", "passes",
                                                  "sweeps")}}
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_em_result(path: Path | str, model: nn.Module, config: EMConfig,
                   data: dict[str, Tensor | None]) -> EMResult | None:
    """The EM fit saved at ``path``, its weights loaded into ``model``; None when there is none,
    or when it ran under another ``max_iter`` (the fit is then run again, from its start). A fit
    of another model, EMConfig or data is refused, naming the difference."""
    path = Path(path)
    _remove_temporaries(path)
    if not path.is_file():
        return None
    payload = read_checkpoint("fit_em", path, "em")
    check_identity("fit_em", path, payload["identity"], _em_identity(model, config, data),
                   "delete the checkpoint to fit again")
    if payload["max_iter"] != config.max_iter:
        return None
    model.load_state_dict(payload["model"])
    return EMResult(History(payload["history"]), payload["n_iter"], payload["converged"],
                    payload["stop_reason"], payload["variance_E"], payload["passes"],
                    payload["sweeps"], config)

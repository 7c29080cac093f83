"""Checkpoints that do not depend on the topology: a model (one process's, or with its experts
sharded by :class:`~moekit.parallel.expert_parallel.ExpertParallelMoE`) and its optimizer, saved
with torch.distributed.checkpoint (DCP) at one expert-parallel size and loaded at any other, one
process without a process group included; and the conversion to and from a model folder
(:func:`moekit.io.save_model`).

Shape legend: E experts (global), L = E / W experts per rank, W ranks of the ep group.

A checkpoint holds the global view whatever the topology: every tensor under the name and shape
one process's model gives it (``blocks.0.ffn.experts.w13_EFD``, (E, ...)). On a rank of an ep
group, an expert tensor (the weight, and its optimizer state: AdamW's ``exp_avg``,
``exp_avg_sq``) is its local (L, ...) block wrapped without a copy as a ``Shard(0)`` DTensor of the
global shape, so DCP writes each block at its offset and reads back whichever block the loading
rank owns; everything else (replicated: attention, embeddings, routers, shared experts, the
optimizer's steps and hyperparameters) is written once. The optimizer's state is keyed by
parameter name (torch's ``get_state_dict(..., flatten_optimizer_state_dict=True)``), not by
position, so it follows its parameters to any topology.

A checkpoint is a folder: DCP's files (``.metadata``, ``__0_0.distcp``, ...) and
:data:`INFO_FILE` (the model's class and config, dtype, the world size that saved it, whether the
optimizer is in it, the caller's metadata). It is built in the sibling ``.NAME.partial`` and put
in place by one rename after every rank's files are written, so a crash never leaves a partial
checkpoint under the real name. Every rank must see the same filesystem (DCP's requirement).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from moekit.exceptions import DataError, Setting
from moekit.io.files import remove, write_text_atomic
from moekit.io.header import config_from_dict
from moekit.io.models import MODEL_CLASSES, load_model, save_model
from moekit.io.run_folder import swap_in
from moekit.parallel.expert_parallel import ExpertParallelMoE

INFO_FILE = "moekit-checkpoint.json"
FORMAT, FORMAT_VERSION = "moekit-dcp-checkpoint", 1
MODEL, OPTIMIZER = "model", "optimizer"  # key prefixes in the saved (flat) state dict
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass(frozen=True)
class CheckpointInfo:
    """What :data:`INFO_FILE` records (:func:`read_checkpoint_info`).

    Attributes:
        class_name: the single-process model's class (a sharded SparseMoE is a ``SparseMoE``).
        config: its config as a dict (``dataclasses.asdict``), or None for a model without one.
        dtype: its floating dtype ('float32', ...). world_size: the ranks that saved it.
        has_optimizer: whether the optimizer is in it; optimizer_stepped: whether it had taken
            a step (if not, only its hyperparameters count: its state starts at its first step).
        metadata: the caller's JSON.
    """

    class_name: str
    config: dict[str, Any] | None
    dtype: str
    world_size: int
    has_optimizer: bool
    optimizer_stepped: bool
    metadata: dict[str, Any]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _class_name(model: nn.Module) -> str:
    return "SparseMoE" if isinstance(model, ExpertParallelMoE) else type(model).__name__


def _config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as read back


def _dtype(model: nn.Module) -> str:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return str(floating[0] if floating else torch.get_default_dtype()).removeprefix("torch.")


def _expert_layers(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    """Each sharded expert tensor's name (as in the model's state dict) -> its layer."""
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for name, _ in module.experts.named_parameters():
                found[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = module
    return found


def _as_global(local_L: Tensor, layer: ExpertParallelMoE, meshes: dict[int, DeviceMesh]) -> DTensor:
    """This rank's block (L, ...) as the global (E, ...) tensor sharded on its first axis."""
    key = id(layer)
    if key not in meshes:
        meshes[key] = layer.ep.device_mesh or DeviceMesh.from_group(layer.ep.group,
                                                                    local_L.device.type)
    shape = (layer.config.n_experts, *local_L.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_L, meshes[key], [Shard(0)], run_check=False, shape=shape,
                              stride=stride)


def global_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                      ) -> dict[str, Any]:
    """The flat state dict a checkpoint holds: ``model.NAME`` for each tensor of the model and,
    with ``optimizer``, ``optimizer.state.NAME.exp_avg``, ``optimizer.param_groups.NAME.lr``, ...;
    names and shapes are one process's, the sharded experts' tensors ``Shard(0)`` DTensors (module
    docstring). The values share memory with the model and the optimizer: loading into them (DCP
    loads in place) writes through. A fresh optimizer's state is created (torch's get_state_dict
    takes a step with zero gradients and learning rate 0: no weight moves, but Adam's step count
    becomes 1; :func:`save_checkpoint` undoes it)."""
    model = _unwrap(model)
    model_sd, optim_sd = get_state_dict(model, [] if optimizer is None else optimizer,
                                        options=OPTIONS)
    experts, meshes = _expert_layers(model), {}
    flat: dict[str, Any] = {}
    for name, value in model_sd.items():
        flat[f"{MODEL}.{name}"] = (_as_global(value, experts[name], meshes) if name in experts
                                   else value)
    for key, value in optim_sd.items():  # 'state.NAME.exp_avg', 'param_groups.NAME.lr'
        owner = next((n for n in experts if key.startswith(f"state.{n}.")), None)
        sharded = owner is not None and isinstance(value, Tensor) and value.ndim > 0
        flat[f"{OPTIMIZER}.{key}"] = _as_global(value, experts[owner], meshes) if sharded else value
    return flat


def _is_local(local: bool) -> bool:
    """Whether DCP runs in this process alone: asked for, or no process group to run over."""
    return local or not (dist.is_available() and dist.is_initialized())


@contextmanager
def _quiet(local: bool) -> Iterator[None]:
    """DCP warns that it 'assumes the intent' of one process even when asked to: silence that."""
    with warnings.catch_warnings():
        if local:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(path: Path | str, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    metadata: dict[str, Any] | None = None,
                    process_group: dist.ProcessGroup | None = None,
                    overwrite: bool = False, local: bool = False) -> Path:
    """Save ``model`` (and ``optimizer``) as a topology-free checkpoint folder at ``path``.

    Every rank of ``process_group`` (default: the default group; none needed in one process)
    must call it with its part of the model; ``local=True`` saves from this process alone (a
    model that is not sharded, with a process group running). ``metadata``: JSON kept beside the
    config (e.g. the training step). Returns ``path``.

    Example, in every process of ``torchrun --nproc-per-node 2``::

        save_checkpoint("runs/ckpt", model, optimizer, metadata={"step": 100})
    """
    path = Path(path)
    local = _is_local(local)
    if path.exists() and not overwrite:
        raise DataError(f"save_checkpoint: {str(path)!r} exists; pass ",
                        Setting("overwrite", True), " to replace it, or another path.")
    model = _unwrap(model)
    if local and _expert_layers(model):
        raise ValueError("save_checkpoint: the model's experts are sharded over ranks, so every "
                         "rank must save its part; got local=True. Call it on every rank with "
                         "local=False.")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "class": _class_name(model), "config": _config(model), "dtype": _dtype(model),
              "world_size": 1 if local else dist.get_world_size(process_group),
              "has_optimizer": optimizer is not None,
              "optimizer_stepped": optimizer is not None and bool(optimizer.state),
              "metadata": metadata or {}}
    text = json.dumps(header, indent=1, sort_keys=True)  # fails here, before anything is written
    fresh = optimizer is not None and not optimizer.state
    state = global_state_dict(model, optimizer)
    if fresh:  # undo get_state_dict's zero step (it counts in Adam's bias correction)
        optimizer.state.clear()
    partial = path.parent / f".{path.name}.partial"
    first = local or dist.get_rank(process_group) == 0
    if first:
        remove(partial)
        partial.mkdir(parents=True)
    if not local:
        dist.barrier(group=process_group)
    with _quiet(local):
        dcp.save(state, checkpoint_id=partial, process_group=process_group, no_dist=local)
    if first:  # DCP's coordinator (this rank) has written .metadata after every rank's files
        write_text_atomic(partial / INFO_FILE, text)
        swap_in(partial, path)
    if not local:
        dist.barrier(group=process_group)  # no rank returns before the checkpoint is in place
    return path


def read_checkpoint_info(path: Path | str) -> CheckpointInfo:
    """The record of the checkpoint at ``path``; a DataError naming the folder when it is none."""
    path = Path(path)
    info_path = path / INFO_FILE
    if not info_path.is_file() or not (path / ".metadata").is_file():
        raise DataError(f"{str(path)!r} is not a moekit checkpoint (no {INFO_FILE} and .metadata "
                        "in it); pass the folder save_checkpoint wrote.")
    try:
        header = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{str(info_path)!r} is not valid JSON ({err}); the checkpoint was "
                        "damaged: save it again.") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT \
            or header.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{str(info_path)!r} is not a {FORMAT} record of version "
                        f"{FORMAT_VERSION}; pass a folder save_checkpoint wrote.")
    return CheckpointInfo(class_name=header["class"], config=header["config"],
                          dtype=header["dtype"], world_size=header["world_size"],
                          has_optimizer=header["has_optimizer"],
                          optimizer_stepped=header["optimizer_stepped"],
                          metadata=header["metadata"])


def _check_fits(path: Path, info: CheckpointInfo, model: nn.Module,
                optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse, before any collective, a checkpoint of another model: the class, each config field,
    the dtype, the optimizer's presence (every rank reads the same record: all raise alike)."""
    where = f"load_checkpoint: the checkpoint {str(path)!r}"
    fix = (f"Build the model from the checkpoint's config (read_checkpoint_info({str(path)!r})"
           ".config) or pass the checkpoint of this model.")
    if info.class_name != _class_name(model):
        raise DataError(f"{where} holds a {info.class_name}; the model is a {_class_name(model)}. "
                        f"{fix}")
    ours = _config(model)
    if ours is not None and info.config is not None and ours != info.config:
        diffs = [f"{k}={info.config.get(k)!r} there, {k}={v!r} here" for k, v in ours.items()
                 if info.config.get(k) != v]
        raise DataError(f"{where} holds another {info.class_name} ({'; '.join(diffs)}). {fix}")
    if info.dtype != _dtype(model):
        raise DataError(f"{where} holds {info.dtype} weights; the model is {_dtype(model)}. Call "
                        f"model.to(torch.{info.dtype}) before loading.")
    if optimizer is not None and not info.has_optimizer:
        raise DataError(f"{where} holds no optimizer state (it was saved without one); pass ",
                        Setting("optimizer", None), " and start the optimizer afresh.")


def _check_keys(path: Path, state: dict[str, Any]) -> None:
    """Every entry the model and optimizer need is in the checkpoint, tensors with the global
    shape (DCP's own error names only the first missing key, after planning)."""
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for key, value in state.items():
        entry = stored.get(key)
        if entry is None or isinstance(value, Tensor) != isinstance(entry, TensorStorageMetadata):
            hint = (" (another optimizer than the one saved?)" if key.startswith(OPTIMIZER)
                    else "")
            raise DataError(f"load_checkpoint: the checkpoint {str(path)!r} has no {key!r}"
                            f"{hint}; load it into the model and optimizer it was saved from.")
        if isinstance(value, Tensor) and tuple(entry.size) != tuple(value.shape):
            raise DataError(f"load_checkpoint: {key!r} has shape {tuple(entry.size)} in the "
                            f"checkpoint {str(path)!r} and {tuple(value.shape)} here; build the "
                            "model from the checkpoint's config.")


def load_checkpoint(path: Path | str, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    process_group: dist.ProcessGroup | None = None,
                    local: bool = False) -> CheckpointInfo:
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``), whatever world size
    saved it; returns its record (``.metadata``: what the saver kept).

    ``model`` has the saved model's class, config and dtype, sharded over any ep size that divides
    its experts, or not sharded (one process, no process group needed; ``local=True`` when one is
    running). ``optimizer``: the same kind as the one saved, over ``model``'s parameters (a fresh
    one; its state and hyperparameters become the saved ones). A DataError, raised on every rank
    before any exchange, names what differs.
    """
    path = Path(path)
    local = _is_local(local)
    info = read_checkpoint_info(path)
    model = _unwrap(model)
    _check_fits(path, info, model, optimizer)
    fresh = optimizer is not None and not optimizer.state
    state = global_state_dict(model, optimizer)
    try:
        _check_keys(path, state)
    except DataError:
        if fresh:  # leave the caller's optimizer as it came (get_state_dict stepped it)
            optimizer.state.clear()
        raise
    with _quiet(local):
        dcp.load(state, checkpoint_id=path, process_group=process_group, no_dist=local)
    model_sd, optim_sd = {}, {}
    for key, value in state.items():
        part, _, name = key.partition(".")
        (model_sd if part == MODEL else optim_sd)[name] = (
            value.to_local() if isinstance(value, DTensor) else value)
    set_state_dict(model, [] if optimizer is None else optimizer, model_state_dict=model_sd,
                   optim_state_dict=optim_sd, options=OPTIONS)
    if optimizer is not None and not info.optimizer_stepped:
        optimizer.state.clear()  # saved before its first step: its hyperparameters only
    return info


def checkpoint_model(path: Path | str) -> nn.Module:
    """The single-process model the checkpoint at ``path`` holds (any world size saved it), in
    this process alone: built from the recorded class and config, in the recorded dtype."""
    path = Path(path)
    info = read_checkpoint_info(path)
    if info.class_name not in MODEL_CLASSES or info.config is None:
        raise DataError(f"checkpoint_model: the checkpoint {str(path)!r} holds a "
                        f"{info.class_name}, which moekit cannot rebuild (it rebuilds "
                        f"{', '.join(sorted(MODEL_CLASSES))}); build the model yourself and "
                        "call load_checkpoint(path, model, local=True).")
    cls = MODEL_CLASSES[info.class_name]
    try:
        config = config_from_dict(cls.config_class, info.config)
    except ValueError as err:
        raise DataError(f"checkpoint_model: {str(path / INFO_FILE)!r}: {err}") from None
    model = cls.from_config(config).to(getattr(torch, info.dtype))
    load_checkpoint(path, model, local=True)
    return model


def checkpoint_to_model_folder(path: Path | str, folder: Path | str) -> Path:
    """Write the checkpoint at ``path`` (any world size) as a model folder (safetensors + JSON)
    that :func:`moekit.io.load_model` reads as the single-process model; its metadata is the
    checkpoint's. Runs in this process alone; returns ``folder``."""
    model = checkpoint_model(path)
    return save_model(model, folder, metadata=read_checkpoint_info(path).metadata)


def model_folder_to_checkpoint(folder: Path | str, path: Path | str, *,
                               overwrite: bool = False) -> Path:
    """Write the model folder ``folder`` (:func:`moekit.io.save_model`) as a checkpoint at
    ``path`` (weights only, its metadata kept), loadable at any ep size by
    :func:`load_checkpoint`. Runs in this process alone; returns ``path``."""
    model = load_model(folder)
    return save_checkpoint(path, model, metadata=model.metadata, overwrite=overwrite, local=True)


__all__ = ["INFO_FILE", "CheckpointInfo", "checkpoint_model", "checkpoint_to_model_folder",
           "global_state_dict", "load_checkpoint", "model_folder_to_checkpoint",
           "read_checkpoint_info", "save_checkpoint"]

"""The weights file (safetensors), written in one stream and read back only after its header fits.

Layout of a safetensors file: 8 bytes (little-endian u64) giving the header's length n, n bytes of
JSON ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}``, then the data.
:func:`read_weights_header` reads the header alone, within a length bound, and checks every entry
(a floating dtype, one dtype for all, offsets inside the file) before a byte of data is read;
:func:`check_weights_fit` compares the entries with the shapes the config implies (a budget first,
so a config edited to ask for terabytes is refused by arithmetic); :func:`load_weights` reads the
tensors and refuses NaN or inf.

Floating dtypes float16, bfloat16, float32 and float64 are accepted and kept: a layer saved in half
precision loads in half precision and gives the outputs it gave. Integer and bool tensors are
refused: no moekit weight is one.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from moekit.exceptions import DataError
from moekit.io.records import FIX, describe

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F64": torch.float64}
DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
# Bytes per element of every dtype safetensors names, so that offsets can be checked for any.
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound
MAX_WEIGHTS = 2**36  # no single moekit layer comes near this many values (256 GiB in float32)
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def write_weights(state: Mapping[str, Tensor], path: Path) -> None:
    """Write ``state`` to ``path`` as a safetensors file, one tensor at a time (no second copy of
    the weights in memory, no temporary file of its own beside ``path``)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in state.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"save_model: weight {name!r} has dtype {tensor.dtype}; moekit saves "
                            f"floating weights only ({sorted(DTYPE_NAMES.values())}).")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as file:
        file.write(_LENGTH.pack(len(text)))
        file.write(text)
        for tensor in state.values():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            file.write(flat.view(torch.uint8).numpy().data)  # little-endian, as safetensors is


def _corrupt(path: Path, problem: str) -> DataError:
    return DataError(f"load_model: cannot read {path.name} in {str(path.parent)!r}: {problem}. "
                     f"{FIX}")


def _entry(path: Path, name: str, raw: Any, data_bytes: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise _corrupt(path, f"its entry {name!r} is {describe(raw)}, not an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise _corrupt(path, f"tensor {name!r} has an unknown dtype {describe(dtype)}")
    if dtype not in FLOAT_DTYPES:
        raise DataError(f"load_model: {str(path)!r}: tensor {name!r} has dtype {dtype}; moekit "
                        f"weights are floating point ({', '.join(FLOAT_DTYPES)}). {FIX}")
    whole = (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
             and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                     for v in [*shape, *offsets]))
    if not whole:
        raise _corrupt(path, f"tensor {name!r} has shape {describe(shape)} and data_offsets "
                             f"{describe(offsets)}; both must be lists of integers >= 0")
    entry = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    if entry.end - entry.begin != entry.numel * ITEM_BYTES[dtype] or entry.begin > entry.end:
        raise _corrupt(path, f"tensor {name!r} of shape {list(shape)} ({dtype}) has data_offsets "
                             f"{offsets}, which do not hold its {entry.numel:,} values")
    if entry.end > data_bytes:
        raise _corrupt(path, f"it is truncated: tensor {name!r} needs bytes up to {entry.end:,} "
                             f"of the data but the file holds {data_bytes:,}")
    return entry


def read_weights_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, read from its header alone and checked: each entry
    complete, a floating dtype, one dtype for all, its bytes inside the file."""
    try:
        file_bytes = path.stat().st_size
        with path.open("rb") as file:
            prefix = file.read(_LENGTH.size)
            if len(prefix) < _LENGTH.size:
                raise _corrupt(path, f"it is {file_bytes} bytes long, shorter than any header")
            (length,) = _LENGTH.unpack(prefix)
            if length > min(MAX_HEADER_BYTES, file_bytes - _LENGTH.size):
                raise _corrupt(path, f"its first 8 bytes give a header of {length:,} bytes, in a "
                                     f"file of {file_bytes:,}")
            raw = file.read(length)
    except OSError as err:
        raise _corrupt(path, err.strerror or str(err)) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"its header is {describe(header)}, not an object")
    header.pop("__metadata__", None)  # free-form strings that safetensors allows; moekit has none
    data_bytes = file_bytes - _LENGTH.size - length
    entries = {name: _entry(path, name, raw, data_bytes) for name, raw in header.items()}
    dtypes = sorted({e.dtype for e in entries.values()})
    if len(dtypes) > 1:
        first = {d: next(n for n, e in entries.items() if e.dtype == d) for d in dtypes}
        listed = ", ".join(f"{name!r} is {d}" for d, name in first.items())
        raise DataError(f"load_model: {str(path)!r} mixes dtypes ({listed}); a saved model has one "
                        f"dtype. {FIX}")
    return entries


def check_weights_fit(path: Path, entries: Mapping[str, TensorEntry],
                      expected: Mapping[str, tuple[int, ...]], sizes: Mapping[str, int]) -> None:
    """Refuse weights that are not the ones ``expected`` (the shapes the config implies, with
    ``sizes`` its size fields to name): an absolute cap on the values, the names, the number of
    values the file holds (the budget: a config edited to ask for more is refused here by
    arithmetic, naming its sizes), then every shape."""
    listed = ", ".join(f"{k}={v:,}" for k, v in sizes.items())
    start = (f"load_model: the weights in {str(path.parent)!r} do not fit the saved config "
             f"(config.json: {listed}):")
    fix = ("Restore the config.json saved with these weights, or save the model again.")
    wanted = sum(math.prod(s) for s in expected.values())
    held = sum(e.numel for e in entries.values())
    dtype = next(iter(entries.values())).dtype if entries else "F32"
    asks = (f"the config asks for {wanted:,} weight values "
            f"({_bytes(wanted * ITEM_BYTES[dtype])} in {dtype})")
    holds = f"{path.name} holds {held:,} ({_bytes(held * ITEM_BYTES[dtype])})"
    if wanted > MAX_WEIGHTS:
        raise DataError(f"{start} {asks}, past the {MAX_WEIGHTS:,} moekit loads at most, and "
                        f"{holds}. {fix}")
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        raise DataError(f"{start} {path.name} lacks tensors {missing} and has unexpected tensors "
                        f"{extra}. {fix}")
    if wanted > held:
        raise DataError(f"{start} {asks}, but {holds}. {fix}")
    wrong = [f"{n!r} is {list(entries[n].shape)} in {path.name}, the config needs {list(s)}"
             for n, s in expected.items() if entries[n].shape != tuple(s)]
    if wrong:
        raise DataError(f"{start} {'; '.join(wrong[:3])}. {fix}")


def load_weights(path: Path, device: str) -> dict[str, Tensor]:
    """The tensors of a checked weights file, on ``device``; NaN or inf anywhere is refused."""
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise _corrupt(path, str(err)) from None
    for name, tensor in state.items():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            where = [int(i) for i in bad.nonzero()[0]]
            first = tensor[tuple(where)].item()
            raise DataError(
                f"load_model: {str(path)!r}: tensor {name!r} holds {int(bad.sum()):,} non-finite "
                f"values (NaN or inf; the first at {where}: {first}). A model with such weights "
                "answers NaN: refit it, or restore the file.")
    return state


def _bytes(n: int) -> str:
    """A byte count in decimal units: 352 B, 12.3 GB, 563 TB."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    power = min(max((len(str(n)) - 1) // 3, 0), len(units) - 1)
    return f"{n} B" if power == 0 else f"{n / 1000**power:.3g} {units[power]}"

"""The on-disk routing store: per-row routing written batch by batch, read back as memory maps.

Shape legend: N rows, E experts, K experts chosen per row.

Each field is one raw file that grows by one batch at a time (so writing never holds more than a
batch in memory); a ``manifest.json`` written last, atomically, records the dtypes and shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moekit.io.files import write_text_atomic

STORE_FORMAT = "moekit-routing-store"


class RoutingStore:
    """Per-row routing on disk: one raw array file per field, read back as memory maps.

    Fields: ``probs`` (N, E) float32, ``primary`` (N,) int32; for routed layers ``experts`` (N, K)
    int32, ``weights`` (N, K) float32, ``kept`` and ``dropped`` (N, K) bool; with targets ``labels``
    (N,) int32 and, where the experts' outputs exist, ``posterior`` (N, E) float32. The files are
    written as ``*.part`` and renamed, then ``manifest.json`` is written atomically: a folder with a
    manifest is complete.

    Example:
        >>> store = RoutingStore.open("runs/x/routing")  # doctest: +SKIP
        >>> store["probs"][:5]                            # doctest: +SKIP
    """

    MANIFEST = "manifest.json"

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory, self.manifest = directory, manifest

    @property
    def n_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def fields(self) -> list[str]:
        return list(self.manifest["fields"])

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.manifest["fields"]:
            raise KeyError(f"RoutingStore: no field {name!r}; it has {self.fields}.")
        spec = self.manifest["fields"][name]
        shape = (self.n_rows, *spec["columns"])
        if self.n_rows == 0:
            return np.zeros(shape, dtype=spec["dtype"])
        return np.memmap(self.directory / f"{name}.bin", dtype=spec["dtype"], mode="r", shape=shape)

    @classmethod
    def open(cls, directory: Path | str) -> RoutingStore:
        directory = Path(directory)
        path = directory / cls.MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"RoutingStore: no complete store at {str(directory)!r} "
                                    f"(it has no {cls.MANIFEST}).")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"RoutingStore: {str(path)!r} is not a routing store manifest.")
        return cls(directory, manifest)


class StoreWriter:
    """Appends each batch's arrays to ``<field>.bin.part``; ``close`` makes the store complete."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / RoutingStore.MANIFEST).unlink(missing_ok=True)
        self.handles: dict[str, Any] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.rows = 0

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        if self.specs and set(arrays) != set(self.specs):
            raise ValueError(f"RoutingStore: every batch must have the same fields; the first had "
                             f"{sorted(self.specs)}, this one {sorted(arrays)}.")
        for name, array in arrays.items():
            if name not in self.handles:
                self.specs[name] = {"dtype": array.dtype.str, "columns": list(array.shape[1:])}
                self.handles[name] = open(self.directory / f"{name}.bin.part", "wb")  # noqa: SIM115
            elif list(array.shape[1:]) != self.specs[name]["columns"]:
                raise ValueError(f"RoutingStore: field {name!r} changed shape between batches; "
                                 f"got {array.shape[1:]}, first {self.specs[name]['columns']}.")
            np.ascontiguousarray(array).tofile(self.handles[name])
        self.rows += next(iter(arrays.values())).shape[0]

    def close(self, ok: bool) -> RoutingStore | None:
        for handle in self.handles.values():
            handle.close()
        for name in self.handles:
            part = self.directory / f"{name}.bin.part"
            if ok:
                os.replace(part, self.directory / f"{name}.bin")
            else:
                part.unlink(missing_ok=True)
        if not ok:
            return None
        manifest = {"format": STORE_FORMAT, "version": 1, "rows": self.rows, "fields": self.specs}
        write_text_atomic(self.directory / RoutingStore.MANIFEST, json.dumps(manifest, indent=1))
        return RoutingStore(self.directory, manifest)

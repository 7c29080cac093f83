"""Per-epoch training history, sliceable like skorch's: ``history[:, "train_loss"]``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, overload


class History:
    """A list of per-epoch records (dicts of metric name -> value).

    Indexing:
        ``history[-1]`` the last record; ``history[10:20]`` a History of those epochs;
        ``history["train_loss"]`` the column as a list; ``history[:, "train_loss"]`` the same;
        ``history[-5:, "val_loss"]`` the column over a slice.

    Example:
        >>> h = History([{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}])
        >>> h[:, "train_loss"]
        [0.5, 0.25]
    """

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records: list[dict[str, Any]] = list(records or [])

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    @property
    def keys(self) -> list[str]:
        """Every metric name seen in any record, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    @overload
    def __getitem__(self, key: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, key: slice) -> History: ...
    @overload
    def __getitem__(self, key: str | tuple[slice | int, str]) -> list[Any]: ...

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        if isinstance(key, str):
            return self.column(key)
        if isinstance(key, tuple):
            rows, name = key
            selected = self.records[rows] if isinstance(rows, slice) else [self.records[rows]]
            return History(selected).column(name)
        if isinstance(key, slice):
            return History(self.records[key])
        return self.records[key]

    def column(self, name: str) -> list[Any]:
        """The values of one metric over epochs; a KeyError lists the metrics that exist."""
        if self.records and not any(name in r for r in self.records):
            raise KeyError(f"History has no metric {name!r}; it has {self.keys}.")
        return [r.get(name) for r in self.records]

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records]

    def __repr__(self) -> str:
        return f"History({len(self)} epochs, metrics={self.keys})"

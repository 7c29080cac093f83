"""A byte corpus of Python source with a category for every byte, for a byte-level language model.

Shape legend: N bytes in a split, B windows in a batch, T bytes per window (``seq_len``).

The text is the Python standard library's own ``.py`` files (every installation has them; nothing is
downloaded) or the user's text files. Files go whole into ``'train'`` or ``'validation'`` by a
stable hash of their relative path, so adding a file never moves another. Every byte is labelled
with the category of the Python token it belongs to, by the rules of
:mod:`moekit.data.token_categories`. A file that does not tokenize (TokenError,
SyntaxError/IndentationError, UnicodeDecodeError) is labelled by byte class instead
(:func:`~moekit.data.token_categories.label_byte_classes`) and listed in the split record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
import time
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit._checks import check_choice, check_int
from moekit.data.token_categories import CATEGORIES, LABELLING, label_byte_classes, label_python
from moekit.exceptions import DataError, Setting

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# 4 MB: a third of the stdlib, labelled in about 3 s; a CPU-sized run (2000 steps x 32 windows x
# 256 bytes) sees each training byte about 4 times, and ~0.4 MB of validation gives thousands of
# targets even to the rarest category (numbers, about 1%).
DEFAULT_MAX_BYTES = 4_000_000
# Folders of the stdlib left out: third-party packages installed into the interpreter
# (site-packages, dist-packages: not the stdlib, and different on every machine); CPython's test
# suites (test, tests, idle_test: a third of the .py bytes, with deliberately malformed files and
# lib2to3's test data); pydoc_data (one generated 0.75 MB string of documentation, not code).
STDLIB_SKIPPED_DIRS = ("__pycache__", "dist-packages", "idle_test", "pydoc_data", "site-packages",
                       "test", "tests")


def in_validation(relative_path: str, validation_fraction: float) -> bool:
    """Whether a file goes to validation: the first 8 bytes of sha256(path), as an integer, modulo
    1000 is below 1000 * validation_fraction. Stable across runs, machines and added files.

        >>> in_validation("json/decoder.py", 0.0), in_validation("json/decoder.py", 1.0)
        (False, True)
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < 1000 * validation_fraction


def stdlib_files(root: Path | str | None = None) -> tuple[Path, list[str]]:
    """The standard library folder and its ``.py`` files (posix paths relative to it, sorted),
    without the folders of :data:`STDLIB_SKIPPED_DIRS` or hidden ones."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    return root, _walk(root, suffix=".py", skipped=STDLIB_SKIPPED_DIRS)


def _walk(folder: Path, *, suffix: str, skipped: Sequence[str]) -> list[str]:
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skipped and not d.startswith(".")]
        found += [Path(here, f).relative_to(folder).as_posix() for f in files
                  if f.endswith(suffix) and not f.startswith(".")]
    return sorted(found)


@dataclass(frozen=True)
class CorpusSplit:
    """One split: its bytes and their category ids (uint8, shape (N,)), and its files (relative
    paths, in order) with the offset where each starts in ``data_N``."""

    data_N: np.ndarray
    category_N: np.ndarray
    files: tuple[str, ...]
    file_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.data_N)


@dataclass(frozen=True)
class ByteCorpus:
    """Train and validation splits of a byte corpus, and the record of what they hold.

    ``record`` is JSON-able: the root, the Python version (it decides the stdlib and tokenize's
    rules), and per split the files with their byte counts, the sha256 of the concatenated bytes
    and of their labels, and the files labelled by byte class. Store it with a run; compare with
    :meth:`check_record`.
    """

    splits: dict[str, CorpusSplit]
    record: dict[str, Any]

    def batch(self, split: str, batch_size: int, seq_len: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows drawn uniformly from the concatenated split: inputs ``x_BT`` and
        next-byte targets ``y_BT`` (``x`` shifted by one), int64 in [0, 256).

            >>> corpus = stdlib_corpus(max_bytes=100_000, validation_fraction=0.5)
            >>> x_BT, y_BT = corpus.batch("train", 4, 16, torch.Generator().manual_seed(0))
            >>> x_BT.shape, bool((x_BT[:, 1:] == y_BT[:, :-1]).all())
            (torch.Size([4, 16]), True)
        """
        data_N = self._split("batch", split).data_N
        check_int("ByteCorpus.batch", "batch_size", batch_size, minimum=1)
        self._check_seq_len("batch", split, seq_len, len(data_N))
        starts_B = torch.randint(0, len(data_N) - seq_len, (batch_size,), generator=generator)
        index_BT = starts_B[:, None] + torch.arange(seq_len + 1)
        chunk_BT = torch.from_numpy(data_N)[index_BT].long()  # T + 1 columns
        return chunk_BT[:, :-1].contiguous(), chunk_BT[:, 1:].contiguous()

    def windows(self, split: str, seq_len: int, batch_size: int = 1
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Consecutive non-overlapping windows of the split, in order, for evaluation: batches of
        up to ``batch_size`` windows ``(x_BT, y_BT, category_BT)`` (int64), ``category_BT`` the
        category ids of the targets. Every byte but the first is a target exactly once; the last
        batch holds the remainder, one window shorter than ``seq_len`` when N - 1 is not a
        multiple of it.

            >>> corpus = stdlib_corpus(max_bytes=100_000, validation_fraction=0.5)
            >>> n = sum(y_BT.numel() for _, y_BT, _ in corpus.windows("validation", 64, 8))
            >>> n == len(corpus.splits["validation"]) - 1
            True
        """
        part = self._split("windows", split)
        check_int("ByteCorpus.windows", "batch_size", batch_size, minimum=1)
        self._check_seq_len("windows", split, seq_len, len(part))
        data, cats = torch.from_numpy(part.data_N), torch.from_numpy(part.category_N)
        n_windows, tail = divmod(len(part) - 1, seq_len)
        full = n_windows * seq_len
        x_WT = data[:full].view(n_windows, seq_len)
        y_WT, category_WT = data[1:full + 1].view(-1, seq_len), cats[1:full + 1].view(-1, seq_len)
        for lo in range(0, n_windows, batch_size):
            rows = slice(lo, lo + batch_size)
            yield x_WT[rows].long(), y_WT[rows].long(), category_WT[rows].long()
        if tail:
            yield (data[full:full + tail].long()[None], data[full + 1:].long()[None],
                   cats[full + 1:].long()[None])

    def check_record(self, record: dict[str, Any]) -> None:
        """Raise a DataError unless ``record`` (stored by a run) describes the same bytes and the
        same labels as this corpus."""
        for split in SPLITS:
            for what, field in (("bytes", "sha256"), ("labels", "labels_sha256")):
                ours = self.record["splits"][split][field]
                theirs = str(record.get("splits", {}).get(split, {}).get(field))
                if theirs != ours:
                    raise DataError(f"ByteCorpus: the {split} {what} differ from the record's "
                                    f"({field} {ours[:12]}... here, {theirs[:12]}... there); use "
                                    "the same files, Python, max_bytes and validation_fraction, "
                                    "or start a new run.")

    def _split(self, method: str, split: str) -> CorpusSplit:
        check_choice(f"ByteCorpus.{method}", "split", split, SPLITS)
        return self.splits[split]

    @staticmethod
    def _check_seq_len(method: str, split: str, seq_len: int, n: int) -> None:
        check_int(f"ByteCorpus.{method}", "seq_len", seq_len, minimum=1)
        if seq_len >= n:
            raise ValueError(f"ByteCorpus.{method}: seq_len must be below the {split} split's "
                             f"length ({n} bytes); got seq_len={seq_len}. Pass a smaller seq_len, "
                             "or more text (a larger max_bytes or validation_fraction).")


def stdlib_corpus(*, max_bytes: int | None = DEFAULT_MAX_BYTES, validation_fraction: float = 0.1
                  ) -> ByteCorpus:
    """The standard library's ``.py`` files (:func:`stdlib_files`) as a :class:`ByteCorpus`.

    ``max_bytes`` caps the total (None: all of it, about 12 MB on CPython 3.11): whole files are
    taken in the order of their path's hash (a stable pseudo-random order, so a cap samples the
    whole library instead of its first packages alphabetically), each that still fits under the
    cap. Nothing is written to disk: labelling runs at about 1.5 MB/s (3 s for the default cap).

        >>> corpus = stdlib_corpus(max_bytes=100_000, validation_fraction=0.5)
        >>> sorted(corpus.splits), corpus.record["source"]
        (['train', 'validation'], 'stdlib')
    """
    root, files = stdlib_files()
    return _build("stdlib_corpus", "stdlib", root, files, max_bytes, validation_fraction)


def text_corpus(paths: Path | str | Sequence[Path | str], *, max_bytes: int | None = None,
                validation_fraction: float = 0.1) -> ByteCorpus:
    """The user's text files as a :class:`ByteCorpus`: a file, a folder (walked recursively, any
    extension, hidden files and folders and ``__pycache__`` skipped), or a list of them. Each file
    is labelled as Python source, by byte class where it does not tokenize. ``max_bytes`` as in
    :func:`stdlib_corpus`."""
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    absolute = []
    for given_path in map(Path, given):
        if not given_path.exists():
            raise DataError("text_corpus: ", Setting("paths", str(given_path)), " does not exist; "
                            "pass an existing text file or folder, or a list of them.")
        path = given_path.resolve()
        absolute += ([path / f for f in _walk(path, suffix="", skipped=("__pycache__",))]
                     if path.is_dir() else [path])
    absolute = sorted(set(absolute))
    if not absolute:
        shown = [str(p) for p in given]
        raise DataError("text_corpus: ", Setting("paths", shown[0] if len(shown) == 1 else shown),
                        " holds no files (hidden ones and __pycache__ are skipped); pass a folder "
                        "with text files in it, or a list of text files.")
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    files = [p.relative_to(root).as_posix() for p in absolute]
    return _build("text_corpus", "paths", root, files, max_bytes, validation_fraction)


def _build(owner: str, source: str, root: Path, files: list[str], max_bytes: int | None,
           validation_fraction: float) -> ByteCorpus:
    if max_bytes is not None:
        check_int(owner, "max_bytes", max_bytes, minimum=1)
    if not (isinstance(validation_fraction, (int, float)) and 0 <= validation_fraction < 1):
        raise ValueError(f"{owner}: validation_fraction must be a number in [0, 1); got "
                         f"validation_fraction={validation_fraction!r}.")
    texts = _read(owner, root, files, max_bytes)
    names = {s: sorted(f for f in texts if (s == "validation") == in_validation(
        f, validation_fraction)) for s in SPLITS}
    empty = [s for s in SPLITS if not names[s] and (s == "train" or validation_fraction)]
    if empty:
        raise DataError(f"{owner}: the {empty[0]} split is empty: the path hashes put all "
                        f"{len(texts)} files in the other one (", Setting("validation_fraction",
                        validation_fraction), "); pass more files, a larger max_bytes, or "
                        "another validation_fraction.")
    record: dict[str, Any] = {
        "source": source, "root": str(root), "python": sys.version.split()[0],
        "labelling": LABELLING, "categories": list(CATEGORIES), "max_bytes": max_bytes,
        "validation_fraction": validation_fraction, "splits": {}}
    for split in SPLITS:
        record["splits"][split] = {
            "files": [[f, len(texts[f])] for f in names[split]],
            "bytes": sum(len(texts[f]) for f in names[split]),
            "sha256": hashlib.sha256(b"".join(texts[f] for f in names[split])).hexdigest()}
    began = time.perf_counter()
    labels = {s: _label_files(texts, names[s], record["splits"][s]) for s in SPLITS}
    logger.info("%s: labelled %d bytes in %.1f s", owner, sum(map(len, texts.values())),
                time.perf_counter() - began)
    splits = {}
    for split in SPLITS:
        data = [np.frombuffer(texts[f], dtype=np.uint8) for f in names[split]]
        sizes = [len(d) for d in data]
        splits[split] = CorpusSplit(data_N=np.concatenate([np.zeros(0, np.uint8), *data]),
                                    category_N=labels[split], files=tuple(names[split]),
                                    file_starts=np.cumsum([0, *sizes[:-1]])[:len(sizes)])
    return ByteCorpus(splits=splits, record=record)


def _label_files(texts: dict[str, bytes], names: list[str], entry: dict[str, Any]) -> np.ndarray:
    """The split's labels, concatenated; records the files labelled by byte class and the labels'
    sha256 in ``entry``."""
    labels, fallback = [np.zeros(0, np.uint8)], []
    for name in names:
        try:
            labels.append(label_python(texts[name]))
        except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
            labels.append(label_byte_classes(texts[name]))
            fallback.append(name)
    category_N = np.concatenate(labels)
    entry["byte_class_files"] = fallback
    entry["labels_sha256"] = hashlib.sha256(category_N.tobytes()).hexdigest()
    return category_N


def _read(owner: str, root: Path, files: list[str], max_bytes: int | None) -> dict[str, bytes]:
    """The files' bytes; under ``max_bytes``, each whole file in hash order that still fits."""
    order = files if max_bytes is None else sorted(  # a stable pseudo-random order
        files, key=lambda f: hashlib.sha256(b"order:" + f.encode("utf-8")).digest())
    texts, total = {}, 0
    for name in order:
        if max_bytes is not None and total + (root / name).stat().st_size > max_bytes:
            continue
        data = (root / name).read_bytes()
        if b"\0" in data:
            fix = "remove it from the folder, or pass paths as a list of the text files only"
            raise DataError(f"{owner}: {str(root / name)!r} holds NUL bytes, so it is binary, not "
                            f"text; {fix if owner == 'text_corpus' else 'repair the installation'}"
                            ".")
        texts[name], total = data, total + len(data)
    if total == 0:
        smallest = min(((root / f).stat().st_size for f in files), key=lambda n: n or 2**63,
                       default=0)
        if not smallest:
            raise DataError(f"{owner}: the {len(files)} files under {str(root)!r} are all empty; "
                            "pass files with text in them.")
        raise DataError(f"{owner}: the smallest non-empty file under {str(root)!r} has "
                        f"{smallest} bytes, more than ", Setting("max_bytes", max_bytes),
                        f"; pass max_bytes >= {smallest}, or None for no cap.")
    return texts

"""A user's table (CSV) into the arrays an estimator fits, with the same encoding at predict time.

Every problem with the data is a :class:`~moekit.exceptions.DataError` that says what is wrong,
where, and the fix (naming this module's parameters, which the command line spells as its flags),
and is raised before anything is written. The encoding (feature columns, one-hot categories, fill
values) is a :class:`Preprocessing` saved in the model folder as JSON, so predictions see what
fitting saw.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moekit.exceptions import DataError, Setting

TASKS = ("classify", "regress")
MISSING = ("error", "drop", "impute")
MAX_CLASSES_FOR_AUTO = 20  # an integer target with at most this many values is read as classes


def _parse_problem(err: Exception) -> str:
    """What pandas or the decoder found, without the parser's internals ("C error", codec names).

    Example:
        >>> _parse_problem(pd.errors.ParserError("Error tokenizing data. C error: Expected 3 "
        ...                                      "fields in line 3, saw 5"))
        'line 3 has 5 fields where the header has 3'
    """
    if isinstance(err, UnicodeDecodeError):
        return f"it holds bytes that are not UTF-8 text (such as 0x{err.object[err.start]:02x})"
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
    if found:
        want, line, saw = found.groups()
        return f"line {line} has {saw} fields where the header has {want}"
    return re.sub(r"^Error tokenizing data\. C error: ", "", str(err)).strip().rstrip(".")


def read_csv(path: Path | str) -> pd.DataFrame:
    """Read a CSV file with a header row; a missing, empty or header-only file is a DataError, and
    so is a header that pandas would rewrite (a repeated or empty column name) or data rows longer
    than the header (pandas would take their first field as a row label)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {str(path)!r}.")
    try:
        frame = pd.read_csv(path, skipinitialspace=True)
        names = _header(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{str(path)!r} is empty; it needs a header row and data rows.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{str(path)!r} is not a readable CSV file: {_parse_problem(err)}; it "
                        "needs comma-separated UTF-8 text, one row per line, each row as long "
                        "as the header.") from None
    _check_header(path, names)
    if not frame.index.equals(pd.RangeIndex(len(frame))):
        raise DataError(f"{str(path)!r}: its data rows have more fields than its header has names "
                        f"({len(names)}), so their first field would become a row label and every "
                        "column would shift. Remove the trailing separators, or name every column "
                        "in the header.")
    if frame.empty:
        raise DataError(f"{str(path)!r} has a header but no data rows.")
    return frame


def _header(path: Path) -> list[str]:
    """The header's names as the file spells them: read by the parser ``read_csv`` uses (same
    encoding, quoting and spaces), before pandas renames a repeated one ('a', 'a' -> 'a', 'a.1')."""
    first = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False,
                        skipinitialspace=True)
    return first.iloc[0].tolist()


def _check_header(path: Path, names: list[str]) -> None:
    """Refuse repeated and empty column names: pandas renames them, so a repeated target would
    become a feature ('t.1') and an unnamed column (a saved index) would be fitted on."""
    seen: dict[str, list[int]] = {}
    for position, name in enumerate(names, start=1):
        seen.setdefault(name, []).append(position)
    repeated = {name: cols for name, cols in seen.items() if len(cols) > 1 and name}
    if repeated:
        listed = "; ".join(f"{name!r} names columns {_positions(cols)}"
                           for name, cols in repeated.items())
        copy = f"{next(iter(repeated))}.1"
        raise DataError(f"{str(path)!r} repeats column names: {listed} (counted from 1). pandas "
                        f"would rename the copies ({copy!r}), so a repeated target would be fitted "
                        "on as a feature. Give each column its own name, or remove the copies.")
    if "" in seen:
        cols = seen[""]
        which, it = ((f"column {cols[0]} has", "it") if len(cols) == 1
                     else (f"columns {_positions(cols)} have", "them"))
        raise DataError(f"{str(path)!r}: {which} no name in the header (counted from 1). Name "
                        f"{it}, or remove {it} (a table saved by pandas with its row index starts "
                        "with an unnamed column: save it with index=False).")


def _positions(columns: list[int]) -> str:
    return ", ".join(map(str, columns[:-1])) + (" and " if len(columns) > 1 else "") \
        + str(columns[-1])


def _rows(mask: pd.Series) -> str:
    """'rows 3, 7 and 2 more' in the file's data-row numbering (1 = the first row under the header).

    The numbers come from the frame's integer index (read_csv numbers the file's rows from 0), so
    they stay right on a frame that some rows were already taken out of.
    """
    positions = np.flatnonzero(mask.to_numpy())
    integer_index = pd.api.types.is_integer_dtype(mask.index)
    rows = (np.asarray(mask.index[positions] if integer_index else positions) + 1).tolist()
    shown = ", ".join(map(str, rows[:5]))
    return (f"row{'s' if len(rows) > 1 else ''} {shown}"
            + (f" and {len(rows) - 5} more" if len(rows) > 5 else ""))


def infer_task(y: pd.Series) -> str:
    """'classify' for text, booleans and integers with few values; 'regress' otherwise."""
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return "classify"
    values = y.dropna()
    whole = np.all(np.mod(values, 1) == 0)
    return "classify" if whole and values.nunique() <= MAX_CLASSES_FOR_AUTO else "regress"


@dataclass(frozen=True)
class Preprocessing:
    """How the table's columns become the model's inputs.

    Attributes:
        target: the target column. task: 'classify' or 'regress'.
        features: the table's feature columns, in order.
        one_hot: for each text column, its categories (each becomes a 0/1 input column).
        fill: for each column with missing values at fit time, the value that fills them
            (median, or the most frequent category), when ``missing='impute'``.
        missing: what to do with missing feature values: 'error', 'drop' the rows, or 'impute'.
    """

    target: str
    task: str
    features: tuple[str, ...]
    one_hot: dict[str, list[str]] = field(default_factory=dict)
    fill: dict[str, Any] = field(default_factory=dict)
    missing: str = "error"

    @property
    def input_names(self) -> list[str]:
        """The model's input columns: numeric features as they are, text ones one-hot."""
        names = []
        for column in self.features:
            cats = self.one_hot.get(column)
            names.extend([f"{column}={c}" for c in cats] if cats is not None else [column])
        return names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(**{**data, "features": tuple(data["features"])})

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The model's inputs (N, D) and the kept row positions; checks the columns first."""
        self._check_columns(frame)
        features = frame[list(self.features)]
        if self.missing == "impute":
            features = features.fillna({c: v for c, v in self.fill.items() if c in features})
        incomplete = features.isna().any(axis=1)
        if incomplete.any():
            if self.missing != "drop":
                column = features.columns[features.isna().any()][0]
                raise DataError(
                    f"missing values in column {column!r} ({_rows(features[column].isna())}); "
                    "pass ", Setting("missing", "drop"), " to skip those rows or ",
                    Setting("missing", "impute"), " to fill them (median, or the most frequent "
                    "category).")
            features = features[~incomplete]
        kept = np.flatnonzero(~incomplete.to_numpy())
        return self._encode(features), kept

    def labelled(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows that have a target, as fitting saw them: inputs (N, D), targets (N,) and their
        row positions in ``frame`` (rows without a target are left out, as ``prepare_fit`` does)."""
        has_target_N = frame[self.target].notna().to_numpy()
        X, kept = self.transform(frame[has_target_N])
        rows = np.flatnonzero(has_target_N)[kept]
        return X, frame[self.target].to_numpy()[rows], rows

    def _check_columns(self, frame: pd.DataFrame) -> None:
        expected = set(self.features)
        present = set(frame.columns) - {self.target}
        missing, extra = sorted(expected - present), sorted(present - expected)
        if missing or extra:
            raise DataError(f"the columns differ from those the model was fitted on: missing "
                            f"{missing}, unexpected {extra}. The model expects "
                            f"{list(self.features)} (the target {self.target!r} is optional).")

    def _encode(self, features: pd.DataFrame) -> np.ndarray:
        blocks = []
        for column in self.features:
            values = features[column]
            cats = self.one_hot.get(column)
            if cats is None:
                blocks.append(_numeric(values, column).reshape(-1, 1))
                continue
            text = values.astype(str)
            unknown = sorted(set(text) - set(cats))
            if unknown:
                raise DataError(f"column {column!r} has categories not seen when fitting: "
                                f"{unknown}; known: {cats}.")
            blocks.append((text.to_numpy()[:, None] == np.array(cats)[None, :]).astype(np.float64))
        return np.hstack(blocks) if blocks else np.empty((len(features), 0))


def _numeric(values: pd.Series, column: str) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        bad = values[pd.to_numeric(values, errors="coerce").isna()].iloc[0]
        raise DataError(f"column {column!r} is not numeric (it holds {bad!r}); pass ",
                        Setting("one_hot", True), " to encode text columns, or remove the column.")
    array = values.to_numpy(dtype=np.float64)
    if not np.isfinite(array).all():
        raise DataError(f"column {column!r} holds infinite values ({_rows(~np.isfinite(values))}).")
    return array


def prepare_fit(frame: pd.DataFrame, target: str, *, task: str | None = None, one_hot: bool = False,
                missing: str = "error") -> tuple[np.ndarray, np.ndarray, Preprocessing]:
    """Check a table and split it into inputs X (N, D), targets y (N,) and its
    :class:`Preprocessing`.

    Example:
        >>> frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "c": ["x", "y", "x"], "t": [0, 1, 0]})
        >>> X, y, prep = prepare_fit(frame, "t", one_hot=True)
        >>> X.shape, prep.input_names
        ((3, 3), ['a', 'c=x', 'c=y'])
    """
    if target not in frame.columns:
        raise DataError(f"there is no target column {target!r}; the columns are "
                        f"{list(map(str, frame.columns))}. Pass one of them as ", Setting("target"),
                        ".")
    if missing not in MISSING:
        raise DataError(f"missing must be one of {MISSING}; got missing={missing!r}.")
    features = [c for c in frame.columns if c != target]
    if not features:
        raise DataError(f"the table has no feature columns besides the target {target!r}.")
    y_missing = frame[target].isna()
    if y_missing.any():
        if missing == "error":
            raise DataError(f"the target {target!r} is missing in {_rows(y_missing)}; pass ",
                            Setting("missing", "drop"), " (or ", Setting("missing", "impute"),
                            ": rows without a target are dropped either way).")
        frame = frame[~y_missing]
    if frame.empty:
        raise DataError(f"no rows are left: every row lacks the target {target!r}.")
    task = task or infer_task(frame[target])
    if task not in TASKS:
        raise DataError(f"task must be one of {TASKS}; got task={task!r}.")
    text = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])
            or pd.api.types.is_bool_dtype(frame[c])]
    if text and not one_hot:
        examples = ", ".join(f"{c!r} (e.g. {frame[c].dropna().iloc[0]!r})" for c in text[:5]
                             if frame[c].notna().any())
        raise DataError(f"non-numeric feature columns: {examples or text}; pass ",
                        Setting("one_hot", True), " to encode them as 0/1 columns, or remove them.")
    fill = _fill_values(frame[features]) if missing == "impute" else {}
    one_hot_cats = {c: sorted(frame[c].dropna().astype(str).unique().tolist()) for c in text}
    prep = Preprocessing(target, task, tuple(map(str, features)), one_hot_cats, fill, missing)
    X, y, _ = prep.labelled(frame)
    if task == "regress":
        if not pd.api.types.is_numeric_dtype(frame[target]):
            raise DataError(f"task 'regress' needs a numeric target; {target!r} holds "
                            f"{frame[target].iloc[0]!r}. Pass ", Setting("task", "classify"), ".")
        y = y.astype(np.float64)
    elif len(np.unique(y.astype(str))) < 2:
        raise DataError(f"the target {target!r} has one class only ({y[0]!r}); a classifier needs "
                        "at least 2 classes.")
    return X, y, prep


def _fill_values(features: pd.DataFrame) -> dict[str, Any]:
    fill: dict[str, Any] = {}
    for column in features.columns[features.isna().any()]:
        values = features[column].dropna()
        if values.empty:
            raise DataError(f"column {column!r} has no values at all; remove it.")
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        fill[str(column)] = float(values.median()) if numeric else str(values.mode().iloc[0])
    return fill

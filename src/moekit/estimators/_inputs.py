"""What the estimators accept as X and y: finite numbers (a refusal names the row and the column),
standardised by a scaler that cannot overflow.

Shape legend: N rows, D columns (features, or a regressor's outputs).

scikit-learn's StandardScaler takes a column's variance from squares: values beyond ~1.3e154
overflow it to inf (the inputs then become NaN, and the error blames the user's finite data), and
values near 1e-300 underflow it to 0 (the column is taken as constant and silently lost).
:func:`fit_scaler` divides each column by the power of two nearest above its largest magnitude
first and folds that back into ``mean_`` and ``scale_``; dividing by a power of two is exact, so
ordinary data are scaled bit for bit as before, and a column times 2**k is scaled exactly as the
column. :func:`standardize` applies it with the difference halved (no overflow even at ±1.7e308);
a new row whose standardised value would square to inf, out of all proportion to the training
data, is refused by name before it reaches the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.preprocessing import StandardScaler

from moekit.exceptions import DataError

LARGEST_STANDARDIZED = math.sqrt(np.finfo(np.float64).max)  # ~1.34e154: its square is finite


def _cell(name: str, row: int, column: int, columns: Any) -> str:
    if columns is None:
        return f"{name}[{row}, {column}]"
    return f"{name}[{row}, {str(columns[column])!r}]"


def check_finite_values(owner: str, name: str, values: Any, columns: Any = None) -> None:
    """Raise a DataError naming the first NaN or infinite value of ``values`` (1-D or 2-D numbers;
    anything else, e.g. string labels or ragged lists, is left to the caller), its row and
    column."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):  # ragged: scikit-learn's validation names that
        return
    if array.dtype.kind not in "fc" or array.ndim not in (1, 2):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    count = int(bad.sum())
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"{name}[{first[0]}]" if array.ndim == 1 else _cell(name, *first, columns)
    raise DataError(f"{owner}: {name} must be finite (no NaN or inf); got {where}="
                    f"{float(array[first]):g} ({count} non-finite value{'s' * (count > 1)}). "
                    "Drop or impute those rows first.")


def fit_scaler(x_ND: np.ndarray) -> StandardScaler:
    """A StandardScaler of the finite columns of ``x_ND`` that neither overflows nor underflows.

    Example:
        >>> x_N2 = np.array([[1e300, 1e-300], [-1e300, 3e-300]])
        >>> fit_scaler(x_N2).transform(x_N2)
        array([[ 1., -1.],
               [-1.,  1.]])
    """
    _, exponent_D = np.frexp(np.abs(x_ND).max(axis=0))  # max |x| = m 2^e with m in [0.5, 1)
    scaler = StandardScaler().fit(np.ldexp(x_ND, -exponent_D))
    scaler.mean_ = np.ldexp(scaler.mean_, exponent_D)
    scaler.scale_ = np.ldexp(scaler.scale_, exponent_D)
    with np.errstate(over="ignore"):  # informative only: transform uses scale_
        scaler.var_ = np.ldexp(scaler.var_, 2 * exponent_D)
    return scaler


def _divisor_hint(value: float, typical: float) -> str:
    """' (e.g. divide it by 1e+300)': the power of ten that brings ``value`` to the size of
    ``typical`` (a column's training values); empty for 0."""
    if value == 0:
        return ""
    exponent = round(math.log10(abs(value)) - math.log10(typical))
    return f" (e.g. divide it by 1e{min(exponent, 308):+03d})"


def standardize(owner: str, name: str, scaler: StandardScaler, x_ND: np.ndarray,
                columns: Any = None) -> np.ndarray:
    """(x - mean_) / scale_ by column, computed without overflow; a DataError naming the row,
    the column and the value when a standardised value's square would overflow float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        z_ND = (x_ND * 0.5 - scaler.mean_ * 0.5) / scaler.scale_ * 2.0  # halved: exact, no inf
    too_large_ND = ~(np.abs(z_ND) <= LARGEST_STANDARDIZED)
    if too_large_ND.any():
        row, column = (int(i) for i in np.argwhere(too_large_ND)[0])
        value = float(x_ND[row, column])
        mean, scale = float(scaler.mean_[column]), float(scaler.scale_[column])
        raise DataError(
            f"{owner}: {_cell(name, row, column, columns)}={value:g} is out of all proportion "
            f"to that column in the training data (mean {mean:g}, standard deviation "
            f"{scale:g}): standardised, its square overflows float64. Rescale that column as "
            f"the training data were{_divisor_hint(value, max(abs(mean), scale))}, or drop the "
            "row.")
    return z_ND

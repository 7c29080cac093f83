"""The estimators' input checks and scaler: NaN and inf named by row and column; a scaler that is
scikit-learn's StandardScaler bit for bit on ordinary data, exact under powers of two, and free of
overflow and underflow at the ends of float64."""

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from moekit.estimators._inputs import check_finite_values, fit_scaler, standardize
from moekit.exceptions import DataError


@pytest.fixture
def x_ND():
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 4)) * [1.0, 1e3, 1e-3, 7.0] + [0.0, 5.0, -2.0, 1e4]


def test_ordinary_data_scale_as_standard_scaler_does_bit_for_bit(x_ND):
    ours, theirs = fit_scaler(x_ND), StandardScaler().fit(x_ND)
    assert np.array_equal(ours.mean_, theirs.mean_) and np.array_equal(ours.scale_, theirs.scale_)
    assert np.array_equal(standardize("o", "X", ours, x_ND), theirs.transform(x_ND))


def test_a_column_times_a_power_of_two_scales_exactly_as_the_column(x_ND):
    far = x_ND * [2.0 ** 990, 2.0 ** -990, 1.0, 2.0 ** 40]  # ~1e298 and ~1e-298 magnitudes
    assert np.array_equal(standardize("o", "X", fit_scaler(far), far),
                          standardize("o", "X", fit_scaler(x_ND), x_ND))


def test_values_near_the_largest_float_do_not_overflow():
    x_N1 = np.array([[1.7e308], [-1.7e308], [0.0]])  # their difference, 3.4e308, is inf
    z_N1 = standardize("o", "X", fit_scaler(x_N1), x_N1)
    assert np.isfinite(z_N1).all()
    np.testing.assert_allclose(z_N1[:, 0], [np.sqrt(1.5), -np.sqrt(1.5), 0.0])  # ±1.7/sd(1.7)


def test_a_constant_column_standardises_to_zero():
    x_N2 = np.array([[3.0, 1e300], [3.0, 1e300], [3.0, 1e300]])
    assert np.array_equal(standardize("o", "X", fit_scaler(x_N2), x_N2), np.zeros((3, 2)))


def test_a_standardised_value_whose_square_overflows_is_refused(x_ND):
    scaler = fit_scaler(x_ND)
    row = x_ND[:2].copy()
    row[1, 2] = 1e200  # column 2 has a standard deviation of about 1e-3
    with pytest.raises(DataError, match=r"^Est: X\[1, 'c'\]=1e\+200 is out of all proportion to "
                                        r"that column in the training data \(mean -2\.\d+, "
                                        r"standard deviation 0\.001\d*\): standardised, its square "
                                        r"overflows float64\. Rescale that column as the training "
                                        r"data were \(e\.g\. divide it by 1e\+200\), or drop the "
                                        r"row\.$"):
        standardize("Est", "X", scaler, row, np.array(["a", "b", "c", "d"], dtype=object))


@pytest.mark.parametrize("values, message", [
    (np.array([[1.0, 2.0], [np.nan, 0.0]]),
     (r"^Est: X must be finite \(no NaN or inf\); got X\[1, 0\]=nan \(1 non-finite value\)\. "
      r"Drop or impute those rows first\.$")),
    (np.array([[1.0, np.inf], [-np.inf, 0.0]]), r"got X\[0, 1\]=inf \(2 non-finite values\)"),
    (np.array([1.0, -np.inf]), r"got X\[1\]=-inf"),
])
def test_non_finite_values_are_named_by_row_and_column(values, message):
    with pytest.raises(DataError, match=message):
        check_finite_values("Est", "X", values)


def test_labels_and_ragged_lists_are_left_to_scikit_learn():
    check_finite_values("Est", "y", np.array(["a", "b"]))
    check_finite_values("Est", "y", [[1.0], [2.0, 3.0]])

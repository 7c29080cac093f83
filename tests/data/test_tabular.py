"""Reading a user's table: task inference, encoding, and the same encoding at predict time."""

import numpy as np
import pandas as pd
import pytest

from moekit.data.tabular import Preprocessing, infer_task, prepare_fit, read_csv
from moekit.exceptions import DataError


@pytest.mark.parametrize("values, task", [
    (["a", "b", "a"], "classify"),
    ([True, False, True], "classify"),
    ([0, 1, 2, 1], "classify"),
    ([0.5, 1.25, 3.0], "regress"),
    (list(range(50)), "regress"),  # more integer values than a class list would have
])
def test_infer_task(values, task):
    assert infer_task(pd.Series(values)) == task


def test_one_hot_and_impute_round_trip_through_json():
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0], "c": ["x", "y", None, "x"],
                          "t": [0, 1, 0, 1]})
    X, y, prep = prepare_fit(frame, "t", one_hot=True, missing="impute")
    # a's median is 3; c's most frequent value is 'x'
    np.testing.assert_array_equal(X, [[1, 1, 0], [3, 0, 1], [3, 1, 0], [4, 1, 0]])
    again = Preprocessing.from_dict(prep.to_dict())
    X2, kept = again.transform(frame.drop(columns="t"))
    np.testing.assert_array_equal(X2, X)
    assert kept.tolist() == [0, 1, 2, 3] and y.tolist() == [0, 1, 0, 1]


def test_unknown_category_at_predict_time():
    frame = pd.DataFrame({"c": ["x", "y", "x"], "t": [0, 1, 0]})
    _, _, prep = prepare_fit(frame, "t", one_hot=True)
    with pytest.raises(DataError, match=r"categories not seen when fitting: \['z'\]"):
        prep.transform(pd.DataFrame({"c": ["z"]}))


def test_missing_target_needs_a_policy():
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "t": [0.5, None, 1.5]})
    with pytest.raises(DataError, match="target 't' is missing in row 2"):
        prepare_fit(frame, "t")
    X, y, _ = prepare_fit(frame, "t", missing="drop")
    assert X.shape == (2, 1) and y.tolist() == [0.5, 1.5]


def test_regression_needs_a_numeric_target_and_infinities_are_refused():
    with pytest.raises(DataError, match="needs a numeric target"):
        prepare_fit(pd.DataFrame({"a": [1.0, 2.0], "t": ["u", "v"]}), "t", task="regress")
    with pytest.raises(DataError, match="column 'a' holds infinite values"):
        prepare_fit(pd.DataFrame({"a": [1.0, np.inf], "t": [0, 1]}), "t")


def test_read_csv_keeps_the_columns_pandas_reads_when_the_header_is_clean(tmp_path):
    path = tmp_path / "t.csv"
    # a byte-order mark, blank lines before the header, quotes and spaces: all read as pandas does
    path.write_bytes(b'\xef\xbb\xbf\n\n"x", y ,t\n1, 2,0\n3,4,1\n')
    frame = read_csv(path)
    assert list(frame.columns) == ["x", "y ", "t"] and frame["y "].tolist() == [2, 4]

"""Hostile CSV headers: names pandas would rewrite are refused before they reach a model.

pandas renames a repeated column ('t', 't' -> 't', 't.1') and names an empty one ('Unnamed: 1'), and
takes the first field of rows longer than the header as a row label; each would fit a model on
columns the user did not mean (a repeated target becomes a feature: training accuracy 1.0)."""

import pytest

from moekit.data.tabular import read_csv
from moekit.exceptions import DataError
from moekit.runs.fit import FitRunConfig, run_fit


def table(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def rows(header, n=6):
    return header + "\n" + "".join(f"{i},{i % 2},{i * 2}\n" for i in range(n))


def test_a_duplicated_target_column_is_refused(tmp_path):
    path = table(tmp_path, rows("x,t,t"))
    with pytest.raises(DataError, match=r"repeats column names: 't' names columns 2 and 3 "
                                        r"\(counted from 1\)\. pandas would rename the copies "
                                        r"\('t\.1'\), so a repeated target"):
        read_csv(path)


def test_a_duplicated_feature_column_is_refused(tmp_path):
    path = table(tmp_path, rows("x,x,t"))
    with pytest.raises(DataError, match=r"'x' names columns 1 and 2 .* Give each column its own "
                                        "name, or remove the copies"):
        read_csv(path)


def test_three_copies_of_a_name_are_all_named(tmp_path):
    path = table(tmp_path, "t,x,t,y,t\n" + "1,2,1,3,1\n" * 3)
    with pytest.raises(DataError, match=r"'t' names columns 1, 3 and 5"):
        read_csv(path)


def test_two_repeated_names_are_both_named(tmp_path):
    path = table(tmp_path, "a,b,a,b\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"'a' names columns 1 and 3; 'b' names columns 2 and 4"):
        read_csv(path)


def test_names_repeated_with_quotes_and_spaces_are_still_repeats(tmp_path):
    path = table(tmp_path, 'x, "t",t\n1,0,0\n')  # read_csv skips the space and the quotes
    with pytest.raises(DataError, match=r"'t' names columns 2 and 3"):
        read_csv(path)


def test_a_name_that_looks_like_a_renamed_copy_is_kept(tmp_path):
    frame = read_csv(table(tmp_path, rows("t,t.1,x")))
    assert list(frame.columns) == ["t", "t.1", "x"]


def test_an_empty_column_name_is_refused(tmp_path):
    path = table(tmp_path, rows("x,,t"))
    with pytest.raises(DataError, match=r"column 2 has no name in the header \(counted from 1\)\. "
                                        "Name it, or remove it"):
        read_csv(path)


def test_a_saved_pandas_index_is_refused_with_the_fix(tmp_path):
    path = table(tmp_path, ",x,t\n0,1.5,0\n1,2.5,1\n")
    with pytest.raises(DataError, match=r"column 1 has no name .* save it with index=False"):
        read_csv(path)


def test_trailing_separators_in_header_and_rows_are_refused(tmp_path):
    path = table(tmp_path, "x,y,t,\n1,2,0,\n3,4,1,\n")
    with pytest.raises(DataError, match=r"column 4 has no name"):
        read_csv(path)


def test_rows_longer_than_the_header_are_refused(tmp_path):
    path = table(tmp_path, "x,y,t\n1,2,0,\n3,4,1,\n")  # pandas would make x the row labels
    with pytest.raises(DataError, match=r"data rows have more fields than its header has names "
                                        r"\(3\), so their first field would become a row label"):
        read_csv(path)


def test_a_fit_on_a_duplicated_target_writes_nothing(tmp_path):
    path = table(tmp_path, rows("x,t,t", n=20))
    out = tmp_path / "run"
    with pytest.raises(DataError, match="repeats column names"):
        run_fit(FitRunConfig(data=str(path), target="t", out=str(out)))
    assert not out.exists()


def test_a_row_the_parser_cannot_split_is_named_without_the_parsers_internals(tmp_path):
    path = table(tmp_path, "x,y,t\n1,2,0\n3,4,1,5,6\n")
    with pytest.raises(DataError, match="line 3 has 5 fields where the header has 3") as err:
        read_csv(path)
    assert "C error" not in str(err.value) and "tokenizing" not in str(err.value)


def test_bytes_that_are_not_utf8_are_named(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("x,y,t\n1,caf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"bytes that are not UTF-8 text \(such as 0xe9\)"):
        read_csv(path)

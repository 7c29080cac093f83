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


# header and rows -> what the error says (rows(header): six rows of three numbers)
REFUSED = {
    "a repeated target": (rows("x,t,t"), (r"repeats column names: 't' names columns 2 and 3 "
                          r"\(counted from 1\)\. pandas would rename the copies \('t\.1'\), so "
                          r"a repeated target")),
    "a repeated feature": (rows("x,x,t"), (r"'x' names columns 1 and 2 .* Give each column its "
                           r"own name, or remove the copies")),
    "three copies of a name": ("t,x,t,y,t\n" + "1,2,1,3,1\n" * 3,
                               r"'t' names columns 1, 3 and 5"),
    "two repeated names": ("a,b,a,b\n1,2,3,4\n",
                           r"'a' names columns 1 and 3; 'b' names columns 2 and 4"),
    # read_csv skips the space and the quotes
    "a repeat behind quotes and spaces": ('x, "t",t\n1,0,0\n', r"'t' names columns 2 and 3"),
    "an empty name": (rows("x,,t"), (r"column 2 has no name in the header \(counted from 1\)\. "
                      "Name it, or remove it")),
    "a saved pandas index": (",x,t\n0,1.5,0\n1,2.5,1\n",
                             r"column 1 has no name .* save it with index=False"),
    "trailing separators": ("x,y,t,\n1,2,0,\n3,4,1,\n", r"column 4 has no name"),
    # pandas would make x the row labels
    "rows longer than the header": ("x,y,t\n1,2,0,\n3,4,1,\n",
                                    (r"data rows have more fields than its header has names "
                                    r"\(3\), so their first field would become a row label")),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_header_pandas_would_rewrite_is_refused(tmp_path, case):
    text, message = REFUSED[case]
    with pytest.raises(DataError, match=message):
        read_csv(table(tmp_path, text))


def test_a_name_that_looks_like_a_renamed_copy_is_kept(tmp_path):
    frame = read_csv(table(tmp_path, rows("t,t.1,x")))
    assert list(frame.columns) == ["t", "t.1", "x"]


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

"""Saved JSON read back with suspicion: bounded reads and fields taken checked."""

import math
from pathlib import Path

import pytest

from moekit.exceptions import DataError
from moekit.io.records import SavedRecord, describe, is_finite_number, read_json_file


def test_describe_spells_values_as_json_does():
    assert describe([1, "a"]) == '[1, "a"] (a list)'
    assert describe(math.inf) == "Infinity (not a finite number)"
    assert describe("x" * 100) == '"' + "x" * 56 + "... (a string)"  # 60 characters at most


def test_a_file_over_the_bound_is_refused_without_parsing(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('"' + "x" * 100 + '"')
    with pytest.raises(DataError, match=r"is 102 bytes; moekit reads JSON files of at most 50"):
        read_json_file("owner", path, max_bytes=50)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("{not json", "is not valid JSON"),
    ("1" * 5000, "is not valid JSON"),  # past Python's limit on integer digits
])
def test_unreadable_json_is_a_data_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"owner: '.*f\.json'.* ?{message}"):
        read_json_file("owner", path)


def test_record_fields_are_checked_with_their_full_path():
    record = SavedRecord("load_x", Path("d/c.json"), "metadata.sklearn",
                         {"n": 3, "xs": [1.0, 2.0], "flag": True, "child": {"k": "v"}})
    assert record.integer("n", minimum=1) == 3
    assert record.numbers("xs", length=2, positive=True) == [1.0, 2.0]
    assert record.child("child").text("k", choices=["v", "w"]) == "v"
    with pytest.raises(DataError, match=r"metadata\.sklearn\.flag must be an integer; got true"):
        record.integer("flag")
    with pytest.raises(DataError, match=r"metadata\.sklearn\.child\.k must be one of \['w'\]"):
        record.child("child").text("k", choices=["w"])
    with pytest.raises(DataError, match=r"metadata\.sklearn\.missing is missing\."):
        record.get("missing")


@pytest.mark.parametrize("value, finite", [(1, True), (1.5, True), (True, False), (math.nan, False),
                                           (10**400, False), ("1", False)])
def test_is_finite_number(value, finite):
    assert is_finite_number(value) is finite


def test_read_json_file_names_the_file_that_is_not_json(tmp_path):
    bad = tmp_path / "summary.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"summary\.json' is not valid JSON \(Expecting property"):
        read_json_file("load_run", bad)
    bad.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(DataError, match=r"not valid JSON \('utf-8' codec can't decode byte 0xe9"):
        read_json_file("load_run", bad)
    bad.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="is nested too deeply"):
        read_json_file("load_run", bad)

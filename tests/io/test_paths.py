"""Paths read from files kept inside their folder, and outputs checked before any work
(`moekit.io.paths`)."""

import os

import pytest

from moekit.exceptions import DataError
from moekit.io.paths import check_writable, inside, plain_name

# --- paths read from files stay inside their folder ------------------------------------------

def test_inside_accepts_a_relative_path_and_a_link_that_stays_inside(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "models")
    assert inside(tmp_path, "models/a", source="r.json", field="f") == tmp_path / "models" / "a"
    assert inside(tmp_path, "alias/a", source="r.json", field="f") == tmp_path / "alias" / "a"


@pytest.mark.parametrize("path", ["../../x", "models/../../x", "/etc", "", None, 3, ["a"],
                                  "a\x00b"])
def test_inside_refuses_what_leads_out_or_is_not_a_path(tmp_path, path):
    with pytest.raises(DataError, match=r"analysis\.models\[0\]\.path in 'results\.json' is"):
        inside(tmp_path, path, source="results.json", field="analysis.models[0].path")


def test_inside_refuses_a_link_leading_out(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "models").symlink_to(elsewhere)
    with pytest.raises(DataError, match="a link leading outside the run folder"):
        inside(run, "models/a", source="results.json", field="path")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "..", None, "a b"])
def test_plain_name_refuses_anything_but_one_file_name(name):
    with pytest.raises(DataError, match=r"name in 'results\.json' must be a plain name"):
        plain_name(name, source="results.json", field="name")
    assert plain_name("4_experts-run1.b", source="r", field="f") == "4_experts-run1.b"


# --- the output folder -------------------------------------------------------------------------

def test_check_writable_refuses_a_file_a_folder_and_a_file_as_parent(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(DataError, match=r"out='.*f' is a file; give a folder"):
        check_writable(a_file)
    with pytest.raises(DataError, match="is a folder; give the path of a file"):
        check_writable(tmp_path, folder=False)
    with pytest.raises(DataError, match="cannot be written: it is a file, not a folder"):
        check_writable(a_file / "run")
    check_writable(tmp_path / "new" / "deeper")  # parents are made later: fine
    assert sorted(os.listdir(tmp_path)) == ["f"]  # the probe left nothing


def test_check_writable_refuses_a_folder_nothing_can_be_made_in():
    with pytest.raises(DataError, match=r"out='/proc/x' cannot be written"):
        check_writable("/proc/x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(DataError, match="cannot be written: Permission denied"):
            check_writable(tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


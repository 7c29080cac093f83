"""Files written whole or not at all (`moekit.io.files`): a failed write leaves the old file."""

import pytest

from moekit.io.files import atomic_path


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path, tree, fail_while_writing):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        fail_while_writing(atomic_path(target), {"": "half"}, RuntimeError("killed"))
    assert tree(tmp_path) == {"a.json": "old"}

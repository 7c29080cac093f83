import pytest

from moekit import History


def test_slicing_like_skorch():
    h = History([{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 4)])
    assert h[:, "train_loss"] == [1.0, 0.5, 0.25]
    assert h["epoch"] == [1, 2, 4]
    assert h[-1] == {"epoch": 4, "train_loss": 0.25}
    assert h[1:, "epoch"] == [2, 4] and len(h[1:]) == 2
    assert h[0, "train_loss"] == [1.0]


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"History has no metric 'val_loss'; "
                                       r"it has \['epoch', 'train_loss'\]"):
        History([{"epoch": 1, "train_loss": 1.0}])["val_loss"]

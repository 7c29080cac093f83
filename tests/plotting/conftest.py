import pytest

from moekit.plotting.style import save_figure


@pytest.fixture
def png(tmp_path):
    """Save a figure as PNG under tmp_path and check it is a real, non-trivial image."""

    def save(fig, name: str):
        path = save_figure(fig, tmp_path / f"{name}.png")
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 8_000
        return path

    return save

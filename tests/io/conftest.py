"""Helpers for the io tests: a folder's files as a dict, and a write that fails part way."""

from pathlib import Path

import pytest


def _tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones included) and its text."""
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def _fail_while_writing(context, files: dict[str, str], error: BaseException) -> None:
    """Enter ``context`` (yielding a folder or a path), write ``files`` there, then fail."""
    with context as where:
        for name, text in files.items():
            target = where / name if name else where
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        raise error


@pytest.fixture
def tree():
    return _tree


@pytest.fixture
def siblings():
    return _siblings


@pytest.fixture
def fail_while_writing():
    return _fail_while_writing

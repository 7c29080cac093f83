"""The README's Python blocks run as written, and the names it imports from ``moekit`` are what it
says they are (issue 20, item 5: 4 of its 5 blocks used undefined names or changed signatures, and
``from moekit import routing_agreement`` once gave a submodule, not the function).

Each ```python block runs alone in a fresh interpreter (``sys.executable -c``), in an empty working
directory, with a timeout, so a block that needs a name from another block, a file from the
repository, or that hangs, fails here and names itself.
"""

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import moekit

README = Path(__file__).parents[1] / "README.md"
# A fence opening on "```python" and the first fence after it; group 1 is the code.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
MIN_BLOCKS = 5  # the README had 5 when issue 20 was filed; none may silently stop being tested
# Per block: imports (2-3 s of CPU) and a small fit take seconds on 2 idle cores; the limit is for a
# block that hangs, with room for a machine shared with other test runs.
TIMEOUT_S = 300


def _blocks() -> list[tuple[int, int, str]]:
    """(number from 1, line in README.md where the code starts, code) of every ```python block."""
    text = README.read_text()
    return [(n, text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for n, m in enumerate(PYTHON_BLOCK.finditer(text), start=1)]


BLOCKS = _blocks()


def _first_line(code: str) -> str:
    return next((line for line in code.splitlines() if line.strip()), "")


def _error(stderr: str) -> str:
    """The last traceback in ``stderr``, or its tail (progress bars come before it)."""
    start = stderr.rfind("Traceback (most recent call last)")
    return stderr[start:] if start >= 0 else stderr[-2000:]


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= MIN_BLOCKS, (
        f"README.md has {len(BLOCKS)} ```python blocks; expected at least {MIN_BLOCKS}. A block "
        "fenced as ```py or ```python3 is not tested: fence it as ```python.")


def test_no_python_block_escapes_the_test_by_its_fence():
    fences = re.findall(r"^```[ \t]*(\S+)", README.read_text(), flags=re.MULTILINE)
    assert [f for f in fences if f.lower().startswith("py") and f != "python"] == []


@pytest.mark.parametrize(("number", "line", "code"), BLOCKS,
                         ids=[f"block{number}" for number, _, _ in BLOCKS])
def test_each_python_block_runs_as_written(number, line, code, tmp_path):
    if "moekit.interop" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip(f"README block {number} needs transformers (pip install 'moekit[interop]')")
    where = f"README block {number} (README.md line {line}: {_first_line(code)!r})"
    try:
        # -W: a deprecated call written in the README itself fails as an error.
        done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:__main__",
                               "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where} did not finish in {TIMEOUT_S} s.", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{where} failed with exit code {done.returncode}:\n{_error(done.stderr)}",
                    pytrace=False)


def _readme_imports() -> list[str]:
    """Every name a README block imports with ``from moekit import ...``."""
    names = []
    for _, _, code in BLOCKS:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module == "moekit" and not node.level:
                names += [alias.name for alias in node.names]
    return names


def test_every_name_the_readme_imports_from_moekit_is_a_public_class_or_function():
    names = _readme_imports()
    assert len(set(names)) >= 10  # the blocks import 16 distinct names
    assert [n for n in names if n not in moekit.__all__] == []
    wrong = {n: type(getattr(moekit, n)).__name__ for n in names
             if not (inspect.isclass(getattr(moekit, n)) or inspect.isfunction(getattr(moekit, n)))}
    assert wrong == {}


def test_routing_agreement_is_the_function():
    # Issue 20: `from moekit import routing_agreement` gave the module routing_agreement.py.
    from moekit import routing_agreement

    assert inspect.isfunction(routing_agreement)
    assert routing_agreement.__module__ == "moekit.analysis.agreement"


def test_every_public_name_is_an_object_not_a_module_even_after_every_submodule_is_imported():
    submodules = {m.name for m in pkgutil.iter_modules(moekit.__path__)}
    # A submodule of moekit named like a public name replaces it on import (the bug).
    assert submodules & set(moekit.__all__) == set()
    for name in sorted(submodules - {"__main__"}):
        importlib.import_module(f"moekit.{name}")
    modules = [n for n in moekit.__all__ if isinstance(getattr(moekit, n), ModuleType)]
    assert modules == []
    assert isinstance(moekit.__version__, str)

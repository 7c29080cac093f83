"""The package map holds: a few modules at the root, subpackages with explicit ``__all__``, files
readable in one sitting, no private name crossing files, the public surface of the flat layout still
importable, no backend chosen at import, and every ``moekit.x.y`` the docs name exists.
(import-linter checks the layer order and cycles: ``lint-imports``, run by ``make test``.)"""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moekit

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "moekit"
SUBPACKAGES = ["analysis", "cli", "data", "estimators", "experiments", "fitting", "interop", "io",
               "nn", "parallel", "plotting", "reports", "runs"]
MAX_LINES = 400
# Every name `from moekit import ...` gave before the package map.
FLAT_LAYOUT_NAMES = [
    "__version__", "ExpertConfig", "LinearExperts", "MLPExperts", "GateConfig", "Routing",
    "SoftmaxGate", "RouterConfig", "SparseMoE", "SparseMoEConfig", "History", "load_model",
    "save_model", "MixtureOfExperts", "MoEConfig", "MoEOutput", "categorical_mixture_nll",
    "competitive_loss", "cooperative_loss", "mixture_loss", "mixture_nll", "responsibilities",
    "Callback", "TrainConfig", "TrainResult", "TrainState", "evaluate", "fit", "EMConfig",
    "EMResult", "fit_em", "GaussianGate", "LocalizedMixtureOfExperts",
    "HierarchicalMixtureOfExperts", "HMEConfig", "MixtureOfExpertsClassifier",
    "MixtureOfExpertsRegressor", "save_estimator", "load_estimator", "record_routing",
    "routing_agreement", "RoutingHistory", "ablate_expert", "force_expert", "scale_temperature",
    "expert_importance", "keep_freed_memory", "release_gradient_memory"]
# The modules the flat layout had that stay importable, with the names their users import.
KEPT_MODULES = {
    "moekit.interop": ["from_transformers", "to_transformers", "transformers_block"],
    "moekit.losses": ["cooperative_loss", "competitive_loss", "mixture_nll", "responsibilities",
                      "categorical_mixture_nll", "load_balancing_loss", "importance_load_loss",
                      "router_z_loss", "cv_squared"],
    "moekit.estimators": ["MixtureOfExpertsClassifier", "MixtureOfExpertsRegressor"],
    "moekit.analysis": ["record_routing", "RoutingHistory", "routing_summary", "batch_routing",
                        "iter_batches", "target_bin_edges", "bin_names", "Recording",
                        "RoutingStore"],
    "moekit.io": ["save_model", "load_model", "atomic_path", "write_text_atomic",
                  "config_from_dict", "read_header"],
}


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_at_most_eight_modules_at_the_root():
    root = [p.name for p in SRC.glob("*.py")
            if p.name not in ("__init__.py", "__main__.py", "_version.py")]
    assert len(root) <= 8, sorted(root)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_subpackage_reexports_an_explicit_sorted_all(package):
    module = importlib.import_module(f"moekit.{package}")
    names = module.__all__
    assert names and len(set(names)) == len(names)
    assert all(hasattr(module, n) for n in names)
    tree = ast.parse((SRC / package / "__init__.py").read_text())
    assert any(isinstance(node, ast.Assign) and any(
        getattr(t, "id", None) == "__all__" for t in node.targets) for node in tree.body)


def test_no_source_file_is_hidden_by_an_ignore_rule():
    """A file git ignores never reaches a commit: `runs/` in .gitignore once hid moekit/runs/."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(p.relative_to(ROOT)) for p in [*_modules(), *(ROOT / "tests").rglob("*.py")]]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                             capture_output=True, text=True, check=False,
                             timeout=60).stdout.split()
    assert not ignored


def test_no_file_is_over_four_hundred_lines():
    long = {_name(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_no_private_name_is_imported_across_files():
    crossings = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moekit"):
                crossings += [f"{_name(path)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossings


def test_the_flat_layouts_names_are_still_importable_from_moekit():
    missing = [n for n in FLAT_LAYOUT_NAMES if not hasattr(moekit, n)]
    assert not missing
    assert set(FLAT_LAYOUT_NAMES) <= set(moekit.__all__)


def test_the_root_all_is_complete_and_resolves():
    public = {n for n, v in vars(moekit).items()
              if not n.startswith("_") and not isinstance(v, type(moekit))}
    lazy = set(moekit._LAZY)
    assert public | lazy | {"__version__"} == set(moekit.__all__)
    for name in moekit.__all__:
        getattr(moekit, name)  # lazy names resolve to the object, not a submodule
    assert callable(moekit.routing_agreement) and callable(moekit.record_routing)


@pytest.mark.parametrize("module, names", sorted(KEPT_MODULES.items()))
def test_the_modules_users_imported_stay_importable(module, names):
    loaded = importlib.import_module(module)
    assert [n for n in names if not hasattr(loaded, n)] == []


def test_importing_moekit_chooses_no_matplotlib_backend():
    code = ("import sys, importlib, pkgutil, moekit\n"
            "for m in pkgutil.walk_packages(moekit.__path__, 'moekit.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "print('matplotlib.pyplot' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300)
    assert done.stdout.strip() == "False"


REFERENCE = re.compile(r"(?<![\w/.])moekit(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _resolves(reference: str) -> bool:
    parts = reference.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return False
        return True
    return False


def test_every_module_path_the_docs_name_exists():
    texts = [ROOT / "README.md", *_modules(), *sorted((ROOT / "benchmarks").glob("*.py"))]
    stale = sorted({f"{ref} ({path.name})" for path in texts
                    for ref in REFERENCE.findall(path.read_text()) if not _resolves(ref)})
    assert not stale


def test_the_readme_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    unlisted = [str(p.relative_to(SRC)) for p in _modules()
                if p.name not in ("__init__.py", "__main__.py")
                and not re.search(rf"(?<![\w.]){re.escape(p.name)}", _block(layout, p))]
    assert not unlisted


def _block(layout: str, module: Path) -> str:
    """The lines of ``layout`` about ``module``'s subpackage (from its "  name/" line to the
    next subpackage's), or the whole layout for a top-level module."""
    package = module.relative_to(SRC).parts[0]
    start = layout.find(f"\n  {package}/")
    if module.parent == SRC or start < 0:
        return layout
    end = re.compile(r"\n  [a-z_]+/").search(layout, start + 1)
    return layout[start:end.start() if end else len(layout)]

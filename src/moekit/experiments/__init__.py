"""The paper reproduction and the demos: the vowel experiment of Jacobs et al. (1991)
(:mod:`~moekit.experiments.vowels` its protocol, :mod:`~moekit.experiments.vowels_run` the run and
its outputs, :mod:`~moekit.experiments.vowels_summary` Table 1 and the verdicts,
:mod:`~moekit.experiments.vowels_sweep` the sweep over what the paper leaves open), the comparison
of solvers to one criterion (:mod:`~moekit.experiments.solvers`, with its config and runs), and the
piecewise-linear demo (:mod:`~moekit.experiments.piecewise`)."""

from moekit._lazy import lazy_names as _lazy_names

# Each name is imported when first asked for: a worker process of `moekit vowels` imports
# moekit.experiments.vowels_pool, which runs this file first, and should not import every other
# experiment (the sweep's matplotlib among them) before its first job.
_LAZY = {
    "DemoConfig": "moekit.experiments.piecewise",
    "SolversConfig": "moekit.experiments.solver_config",
    "SweepConfig": "moekit.experiments.vowels_sweep",
    "VowelsConfig": "moekit.experiments.vowels",
    "compare_solvers": "moekit.experiments.solvers",
    "load_vowels_run": "moekit.experiments.vowels_models",
    "run_demo": "moekit.experiments.piecewise",
    "run_sweep": "moekit.experiments.vowels_sweep",
    "run_vowels": "moekit.experiments.vowels_run",
    "write_comparison": "moekit.experiments.solvers",
    "write_sweep": "moekit.experiments.vowels_sweep",
}

__all__ = ["DemoConfig", "SolversConfig", "SweepConfig", "VowelsConfig", "compare_solvers",
           "load_vowels_run", "run_demo", "run_sweep", "run_vowels", "write_comparison",
           "write_sweep"]


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

"""The paper reproduction and the demos: the vowel experiment of Jacobs et al. (1991)
(:mod:`~moekit.experiments.vowels` its protocol, :mod:`~moekit.experiments.vowels_run` the run and
its outputs, :mod:`~moekit.experiments.vowels_summary` Table 1 and the verdicts,
:mod:`~moekit.experiments.vowels_sweep` the sweep over what the paper leaves open), the comparison
of solvers to one criterion (:mod:`~moekit.experiments.solvers`, with its config and runs), and the
piecewise-linear demo (:mod:`~moekit.experiments.piecewise`)."""

from moekit.experiments.piecewise import DemoConfig, run_demo
from moekit.experiments.solver_config import SolversConfig
from moekit.experiments.solvers import compare_solvers, write_comparison
from moekit.experiments.vowels import VowelsConfig
from moekit.experiments.vowels_models import load_vowels_run
from moekit.experiments.vowels_run import run_vowels
from moekit.experiments.vowels_sweep import SweepConfig, run_sweep, write_sweep

__all__ = ["DemoConfig", "SolversConfig", "SweepConfig", "VowelsConfig", "compare_solvers",
           "load_vowels_run", "run_demo", "run_sweep", "run_vowels", "write_comparison",
           "write_sweep"]

"""What :func:`moekit.fitting.em.fit_em` takes and returns: :class:`EMConfig` and :class:`EMResult`.

Shape legend: E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.fitting.history import History

EM_METRICS = ("log_likelihood", "nll", "mse", "sse", "accuracy")
INITS = ("data", "model")


@dataclass(frozen=True)
class EMConfig:
    """How to fit by EM.

    Attributes:
        max_iter: the cap on EM iterations. tol: stop ('converged') when the log-likelihood's
            relative rise, (l_t - l_{t-1}) / |l_{t-1}|, is below it; l is the mean log-likelihood
            on the standardised inputs (it differs from the recorded one only for the Gaussian
            gate, by a constant), so the test does not depend on the units of x.
        ridge: relative Tikhonov term (x the mean diagonal, on the standardised inputs): the
            fallback for a singular weighted least-squares problem (with a warning naming the
            expert); the damping of Newton systems.
        irls_steps: Newton steps per M-step for logit experts and softmax gates; max_halvings:
            halvings of a Newton step before it is given up.
        fixed_variance: hold every Gaussian expert's variance at this (EM then maximises Eq. 3
            with that ``variance``); None learns one variance per expert.
        variance_floor: the least expert variance, as a fraction of the mean variance of y, and the
            least eigenvalue of a Gaussian gate covariance over the standardised inputs, as a
            fraction of their mean variance (so a feature's floor follows its units).
        stop_metric, stop_threshold: also stop once e.g. 'train_mse' <= 0.08 (>= for accuracy and
            log_likelihood); the metrics are EM_METRICS prefixed 'train_' ('train_accuracy'
            needs class-index targets).
        init: 'data' places a Gaussian gate on the data first (means on random rows drawn with
            ``seed``, the only randomness); 'model' starts from the model's weights as they are.
        progress: show a progress bar (on stderr).
    """

    max_iter: int = 200
    tol: float = 1e-6
    ridge: float = 1e-6
    irls_steps: int = 1
    max_halvings: int = 30
    fixed_variance: float | None = None
    variance_floor: float = 1e-6
    stop_metric: str | None = None
    stop_threshold: float | None = None
    init: str = "data"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        owner = "EMConfig"
        for name in ("max_iter", "irls_steps", "max_halvings"):
            check_int(owner, name, getattr(self, name), minimum=int(name != "max_halvings"))
        for name in ("tol", "ridge", "variance_floor", "fixed_variance"):
            if getattr(self, name) is not None:
                check_positive_float(owner, name, getattr(self, name))
        if (self.stop_metric is None) != (self.stop_threshold is None):
            raise ValueError(f"{owner}: stop_metric and stop_threshold go together; got stop_metric"
                             f"={self.stop_metric!r}, stop_threshold={self.stop_threshold!r}.")
        if self.stop_metric is not None:
            check_choice(owner, "stop_metric", self.stop_metric,
                         [f"train_{m}" for m in EM_METRICS])
        check_choice(owner, "init", self.init, INITS)


@dataclass(frozen=True)
class EMResult:
    """The outcome of :func:`fit_em`.

    Attributes:
        history: per iteration (0 is the start): 'iteration', 'log_likelihood' (mean per row, nats;
            non-decreasing), 'conditional_log_likelihood', cumulative 'passes' and 'sweeps' (see the
            module docstring), 'train_nll', 'train_mse', 'train_sse', 'train_accuracy'
            (classification).
        n_iter: EM iterations kept. stop_reason: 'converged' (then ``converged``), 'threshold',
            'max_iter' or 'likelihood_decreased'. passes, sweeps: the totals.
        variance_E: the Gaussian experts' learned variances (None for classification); the model
            has no place for them.
    """

    history: History
    n_iter: int
    converged: bool
    stop_reason: str
    variance_E: Tensor | None
    passes: int
    sweeps: int
    config: EMConfig = field(repr=False)

    @property
    def log_likelihood(self) -> list[float]:
        return self.history[:, "log_likelihood"]

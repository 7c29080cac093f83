"""Results of the vowel protocol built by hand, for testing the summaries and verdicts without
training."""

import numpy as np
import pytest

from moekit.experiments.vowels import StepTrial, System, SystemResult


def fake_result(system: System, lr: float, epochs, *, reached=None, partitions=None,
                active=None, train=88.0, test=90.0, trials=None) -> SystemResult:
    epochs_R = np.asarray(epochs, dtype=np.int64)
    runs = len(epochs_R)
    reached_R = np.ones(runs, dtype=bool) if reached is None else np.asarray(reached)
    return SystemResult(
        system=system, lr=lr,
        trials=trials or [StepTrial(lr, int(reached_R.sum()), 0, 0, 0, float(epochs_R.mean()))],
        epochs_R=epochs_R, reached_R=reached_R, train_acc_R=np.full(runs, train),
        test_acc_R=np.full(runs, test),
        active_experts_R=np.asarray(active if active is not None else [1] * runs),
        experts_per_case_R=np.ones(runs), curves_RT=np.tile(np.linspace(1, 0, 5), (runs, 1)),
        partition_R=list(partitions or ["one expert"] * runs),
        groups_R=["[i] [I] [a] [Λ]"] * runs, models=[])


@pytest.fixture
def fake():
    return fake_result

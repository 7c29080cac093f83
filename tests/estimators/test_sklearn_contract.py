"""The estimators against scikit-learn's own conformance checks."""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.estimators.regressor import MixtureOfExpertsRegressor

# Expected failures, each with its reason; empty: every check passes.
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {}


@parametrize_with_checks(
    [MixtureOfExpertsClassifier(n_experts=2, max_epochs=100, random_state=0),
     MixtureOfExpertsRegressor(n_experts=2, max_epochs=100, random_state=0),
     MixtureOfExpertsClassifier(n_experts=2, solver="em", max_epochs=30, random_state=0),
     MixtureOfExpertsRegressor(n_experts=2, solver="em", gate="gaussian", max_epochs=30,
                               random_state=0)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}),
)
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.mark.slow
@parametrize_with_checks(
    [MixtureOfExpertsClassifier(random_state=0), MixtureOfExpertsRegressor(random_state=0)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}),
)
def test_sklearn_contract_with_default_parameters(estimator, check):
    check(estimator)

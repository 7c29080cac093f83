"""RestartingLBFGS: the same steps as PyTorch's L-BFGS while those move the weights, and a restart
from the gradient when a step does not (which left a mixture stalled on a plateau)."""

import torch
from sklearn.datasets import load_iris

from moekit.estimators.classifier import MixtureOfExpertsClassifier
from moekit.fitting.lbfgs import RestartingLBFGS


def _quadratic_steps(optimizer_class, n_steps=5):
    """Weights after each step of minimising a convex quadratic 0.5 x'Ax - b'x."""
    a_DD = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b_D = torch.tensor([1.0, -1.0], dtype=torch.float64)
    x_D = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_class([x_D], lr=1.0, max_iter=1, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * x_D @ a_DD @ x_D - b_D @ x_D
        loss.backward()
        return loss

    steps = []
    for _ in range(n_steps):
        optimizer.step(closure)
        steps.append(x_D.detach().clone())
    return steps, torch.linalg.solve(a_DD, b_D)


def test_moving_steps_are_pytorchs_own():
    ours, solution_D = _quadratic_steps(RestartingLBFGS)
    theirs, _ = _quadratic_steps(torch.optim.LBFGS)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    torch.testing.assert_close(ours[-1], solution_D)


def test_a_step_at_the_minimum_leaves_the_weights_alone():
    x_D = torch.ones(3, dtype=torch.float64, requires_grad=True)
    optimizer = RestartingLBFGS([x_D], max_iter=1, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (x_D - 1.0).square().sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 0.0
    torch.testing.assert_close(x_D.detach(), torch.ones(3, dtype=torch.float64))


def test_a_mixture_that_stalled_now_trains():
    """With PyTorch's L-BFGS this fit stopped on a plateau (accuracy 0.293, the loss 0.665 from
    the second epoch on): a failed line search repeated itself every epoch."""
    X, y = load_iris(return_X_y=True)
    clf = MixtureOfExpertsClassifier(n_experts=2, expert_hidden=64, solver="lbfgs",
                                     loss="competitive", lr=1.0, max_epochs=60,
                                     random_state=0).fit(X, y)
    losses = clf.history_[:, "train_loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert clf.score(X, y) > 0.9

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator: tests never touch the global RNG."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(n)`` makes the n-th training epoch of the gradient loop raise
    KeyboardInterrupt (a Ctrl-C); it returns the list that counts the epochs started."""
    import moekit.fitting.gradient as gradient

    def patch(n: int) -> list[int]:
        calls, original = [], gradient.train_epoch

        def train_epoch(*args):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return original(*args)

        monkeypatch.setattr(gradient, "train_epoch", train_epoch)
        return calls

    return patch

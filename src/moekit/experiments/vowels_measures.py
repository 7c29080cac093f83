"""What a run of the vowel experiment looks like at its stopping point: its accuracy, its active
experts, how many experts it blends per case, how often its training error rose, and how its experts
divide the four vowels, compared with the paper's Figure 2.

Shape legend: N rows, E experts.

Figure 2 of Jacobs et al. (1991): "[i]/[I] is handled by one expert, [a]/[Λ] by the other two,
whose lines join into a slightly curved boundary", and the fourth expert's proportion is
effectively 0. Each training row goes to its primary expert (the largest mixing proportion); an
expert *takes* a vowel pair when it is the primary expert of at least ``TAKES_SHARE`` of that pair's
rows; an expert is *active* when its mean proportion reaches ``INACTIVE_PROPORTION`` (1%). Then:

    'figure 2'      one expert takes [i]/[I], two others take [a]/[Λ], no other expert is active
    'figure 2, more active'  the same division, with more than three experts active
    'front split'   two experts take [i]/[I], another takes [a]/[Λ] (the reverse of Figure 2)
    'one per pair'  one expert takes [i]/[I], another takes [a]/[Λ]
    'crossing'      an expert takes rows of both pairs (e.g. [I] with [a]/[Λ])
    'one expert'    a single active expert does all the work
    'other'         anything else

:func:`vowel_groups` says more plainly which vowels each expert takes (by majority).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from moekit.plotting.expert_lines import INACTIVE_PROPORTION

PARTITIONS = ("figure 2", "figure 2, more active", "front split", "one per pair", "crossing",
              "one expert", "other")
VOWELS = ("[i]", "[I]", "[a]", "[\u039b]")
FRONT, BACK = (0, 1), (2, 3)  # [i] [I] | [a] [Λ], the order of moekit.data.vowels.VOWEL_CODES
TAKES_SHARE = 0.1


def _takers(primary_N: Tensor, rows_N: Tensor, n_experts: int) -> set[int]:
    """The experts that are primary for at least TAKES_SHARE of the rows in ``rows_N``."""
    counts_E = torch.bincount(primary_N[rows_N], minlength=n_experts).double()
    share_E = counts_E / counts_E.sum().clamp_min(1.0)
    return {int(e) for e in torch.nonzero(share_E >= TAKES_SHARE).flatten()}


@torch.no_grad()
def partition_kind(model: nn.Module, x_ND: Tensor, y_N: Tensor) -> str:
    """One of ``PARTITIONS`` for a mixture of the vowel task (labels in VOWEL_CODES order).

    Example:
        >>> from moekit import MixtureOfExperts
        >>> one = MixtureOfExperts(2, 4, 1)
        >>> partition_kind(one, torch.rand(8, 2), torch.arange(8) % 4)
        'one expert'
    """
    p_NE = model(x_ND).routing.probs_NE
    n_experts = p_NE.shape[1]
    active = int((p_NE.mean(0) >= INACTIVE_PROPORTION).sum())
    if active == 1:
        return "one expert"
    primary_N = p_NE.argmax(1)
    front = _takers(primary_N, torch.isin(y_N, torch.tensor(FRONT)), n_experts)
    back = _takers(primary_N, torch.isin(y_N, torch.tensor(BACK)), n_experts)
    if front == back and len(front) == 1:
        return "one expert"
    if front & back:
        return "crossing"
    if (len(front), len(back)) == (1, 2):
        return "figure 2" if active == 3 else "figure 2, more active"
    return {(2, 1): "front split", (1, 1): "one per pair"}.get((len(front), len(back)), "other")


@torch.no_grad()
def vowel_groups(model: nn.Module, x_ND: Tensor, y_N: Tensor) -> str:
    """Which vowels each expert takes, by majority of their rows: experts separated by '|', e.g.
    '[i] | [I] [a] [Λ]' (an expert for [i], another for the other three).

    Example:
        >>> from moekit import MixtureOfExperts
        >>> vowel_groups(MixtureOfExperts(2, 4, 1), torch.rand(8, 2), torch.arange(8) % 4)
        '[i] [I] [a] [Λ]'
    """
    primary_N = model(x_ND).routing.probs_NE.argmax(1)
    owner = {v: int(torch.mode(primary_N[y_N == v]).values) for v in range(len(VOWELS))
             if bool((y_N == v).any())}
    groups: dict[int, list[str]] = {}
    for v, e in sorted(owner.items()):
        groups.setdefault(e, []).append(VOWELS[v])
    return " | ".join(" ".join(g) for g in groups.values())

@torch.no_grad()
def accuracies(models: list[nn.Module], x: Tensor, y: Tensor) -> np.ndarray:
    """Each model's accuracy on (x, y), in %."""
    return np.array([(m(x).output.argmax(-1) == y).double().mean().item() * 100 for m in models])


@torch.no_grad()
def active_experts(model: nn.Module, x: Tensor) -> int:
    """Experts whose mean mixing proportion over ``x`` is not effectively 0."""
    return int((model(x).routing.probs_NE.mean(0) >= INACTIVE_PROPORTION).sum())


@torch.no_grad()
def experts_per_case(model: nn.Module, x: Tensor) -> float:
    """The effective number of experts blended per case, exp(entropy of p), averaged over cases."""
    p_NE = model(x).routing.probs_NE.double()
    entropy_N = -(p_NE * p_NE.clamp_min(1e-300).log()).sum(-1)
    return float(entropy_N.exp().mean())


def rising_epochs(curves_RT: np.ndarray) -> float:
    """The percentage of updates after which the training error was higher than before."""
    steps_RT = np.diff(curves_RT, axis=1)
    valid = ~np.isnan(steps_RT)
    return float(100.0 * (steps_RT[valid] > 0).mean()) if valid.any() else 0.0

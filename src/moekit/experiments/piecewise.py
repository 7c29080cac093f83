"""The built-in demo: a mixture of linear experts on a 1-D function made of straight pieces.

Each expert should take one piece: the gate learns where the breaks are, each expert learns one
line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moekit.data.synthetic import piecewise_linear
from moekit.fitting.config import TrainConfig
from moekit.fitting.gradient import fit
from moekit.io.files import write_text_atomic
from moekit.io.models import save_model
from moekit.nn.dense import MixtureOfExperts

# The true function: three pieces with breaks at 1/3 and 2/3.
BREAKS = (1 / 3, 2 / 3)
PIECES = ((3.0, 0.0), (-3.0, 2.0), (1.5, -1.0))


@dataclass(frozen=True)
class DemoConfig:
    n_experts: int = 4
    n_rows: int = 600
    noise: float = 0.05
    epochs: int = 1000
    lr: float = 0.05
    # Eq. 3's variance: near the noise level, so the posteriors are sharp enough to split the
    # pieces.
    variance: float = 0.02
    seed: int = 0
    out: str = "runs/demo"
    progress: bool = True


@dataclass(frozen=True)
class ExpertSummary:
    """What one expert took: its share of rows (as the gate's top choice), where, and its line."""

    expert: int
    share: float
    x_min: float | None
    x_max: float | None
    slope: float
    intercept: float
    active: bool


@dataclass(frozen=True)
class DemoResult:
    experts: list[ExpertSummary]
    train_sse: float
    epochs: int
    stop_reason: str
    breaks: tuple[float, ...] = BREAKS
    pieces: tuple[tuple[float, float], ...] = PIECES
    out: str = field(default="")


@torch.no_grad()
def summarize_experts(model: MixtureOfExperts, x_N1: torch.Tensor,
                      min_share: float = 0.02) -> list[ExpertSummary]:
    """For each expert of a 1-D linear mixture: rows it wins under the gate, their x range, its
    line."""
    winner_N = model(x_N1).routing.probs_NE.argmax(-1)
    summaries = []
    for e in range(model.config.n_experts):
        mine = x_N1[winner_N == e, 0]
        share = mine.numel() / x_N1.shape[0]
        summaries.append(ExpertSummary(
            expert=e, share=share,
            x_min=float(mine.min()) if mine.numel() else None,
            x_max=float(mine.max()) if mine.numel() else None,
            slope=float(model.experts.w_EDO[e, 0, 0]), intercept=float(model.experts.b_EO[e, 0]),
            active=share >= min_share,
        ))
    return summaries


def run_demo(config: DemoConfig, folder: Path | str | None = None) -> DemoResult:
    """Fit the demo mixture, save the model and results.json under ``folder`` (default
    ``config.out``; the command builds its run elsewhere and moves it to ``config.out``, the folder
    the results name)."""
    data_gen = torch.Generator().manual_seed(config.seed)
    x, y = piecewise_linear(config.n_rows, breaks=BREAKS, pieces=PIECES, noise=config.noise,
                            generator=data_gen, dtype=torch.float64)
    model = MixtureOfExperts(1, 1, config.n_experts,
                             generator=torch.Generator().manual_seed(config.seed + 1)).double()
    train = TrainConfig(loss="mixture_nll", variance=config.variance, optimizer="adam",
                        lr=config.lr, max_epochs=config.epochs, seed=config.seed,
                        progress=config.progress)
    result = fit(model, x, y, train)
    out = Path(config.out if folder is None else folder)
    save_model(model, out / "model", metadata={"demo": asdict(config)})
    demo = DemoResult(experts=summarize_experts(model, x),
                      train_sse=result.history[-1]["train_sse"], epochs=result.epochs,
                      stop_reason=result.stop_reason, out=str(config.out))
    write_text_atomic(out / "results.json", json.dumps(asdict(demo), indent=2))
    return demo

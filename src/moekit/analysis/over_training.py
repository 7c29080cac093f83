"""Routing over training: a flat record of the routing on a fixed set of rows, and the callback that
adds it to every epoch's history (plotted by
:func:`moekit.plotting.routing.plot_routing_over_training`).

Shape legend: N rows, E experts.
"""

from __future__ import annotations

from torch import Tensor, nn

from moekit._checks import check_int
from moekit.analysis.recorder import record_routing
from moekit.fitting.callbacks import Callback, TrainState


def routing_summary(model: nn.Module, x: Tensor, *, batch_size: int = 4096) -> dict[str, float]:
    """A flat record of the routing on ``x``: ``load_<e>`` per expert, ``entropy_ratio``, ``cv``,
    ``dead`` (count). Keys are what :func:`moekit.plotting.routing.plot_routing_over_training` reads
    (with the ``routing_`` prefix that :class:`RoutingHistory` adds)."""
    stats = record_routing(model, x, batch_size=batch_size, contributions=False).stats
    record = {f"load_{e}": float(v) for e, v in enumerate(stats.load_E)}
    record.update(entropy_ratio=stats.entropy_ratio, cv=stats.cv,
                  dead=float(len(stats.dead_experts())))
    return record


class RoutingHistory(Callback):
    """A :func:`moekit.fitting.gradient.fit` callback that adds the routing on ``x`` to each
    epoch's record of the history, as ``routing_load_<e>``, ``routing_entropy_ratio``,
    ``routing_cv`` and ``routing_dead``; plot them with
    :func:`moekit.plotting.routing.plot_routing_over_training`.

    Example:
        >>> fit(moe, x, y, config, callbacks=[RoutingHistory(x)])  # doctest: +SKIP
    """

    def __init__(self, x: Tensor, *, every: int = 1) -> None:
        self.x = x
        self.every = check_int("RoutingHistory", "every", every, minimum=1)

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch % self.every == 0 or state.stop:
            summary = routing_summary(state.model, self.x)
            state.history.records[-1].update({f"routing_{k}": v for k, v in summary.items()})

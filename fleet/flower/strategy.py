"""SparseDeltaStrategy: any stock Flower strategy aggregates our sparse int8 deltas as dense records."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fleet.coordinator import WireCodec
from fleet.flower.records import (
    META,
    _with_content,
    arrays_from_state,
    initial_arrays,
    reply_content,
    state_from_arrays,
)


class SparseDeltaStrategy(Strategy):
    """Wrap any stock Flower strategy (FedAvg, FedProx, Krum, DP wrappers...) for a TinyFleet plan.

    Refuses FedProx with ``proximal_mu`` > 0: the proximal term lives in the device's loss, which our devices
    do not have (the grid refuses a train message with ``proximal-mu`` too).

    Replies that carry only the raw delta (``tinyfleet.delta`` bytes, e.g. forwarded by a ClientApp on a
    bridge) are decoded into dense records first; then the inner strategy aggregates; then its float arrays
    become the next integer model (``floor(x + 0.5)``, clamped; see :func:`state_from_arrays`), so the arrays
    sent in the next round are exactly what devices will hold. ``state`` is that integer model.
    """

    def __init__(self, inner: Strategy, plan, codec=None):
        if getattr(inner, "proximal_mu", 0.0):
            raise ValueError(f"{type(inner).__name__}(proximal_mu={inner.proximal_mu}): TinyFleet devices do not "  # type: ignore[attr-defined]
                             "add the proximal term to their int8 update, so this would silently be FedAvg; "
                             "use proximal_mu=0 or FedAvg")
        self.inner, self.plan = inner, plan
        self.codec = codec or WireCodec(plan)
        self.state: dict[int, np.ndarray] = state_from_arrays(plan, initial_arrays(plan))
        self._base = self.state

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._base = state_from_arrays(self.plan, arrays)
        return self.inner.configure_train(server_round, arrays_from_state(self.plan, self._base), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        dense = [self._densify(m) for m in replies]
        arrays, metrics = self.inner.aggregate_train(server_round, dense)
        if arrays is None:
            return None, metrics
        self.state = state_from_arrays(self.plan, arrays)
        return arrays_from_state(self.plan, self.state), metrics

    def _densify(self, m: Message) -> Message:
        if m.has_error() or m.content.array_records or META not in m.content.config_records:
            return m
        payload = bytes(m.content.config_records[META]["delta"])  # type: ignore[arg-type]
        d = self.codec.decode_delta(payload, hashlib.sha256(payload).hexdigest())
        up = d.header
        content = reply_content(self.plan, self._base, d.values, d.masks, up.num_samples, up.device_id,
                                up.round_id, payload)
        return _with_content(m, content)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

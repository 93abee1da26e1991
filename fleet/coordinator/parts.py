"""What the coordinator's mixins (publication, deltas, secure rounds) read of one another: declarations only.

:class:`fleet.coordinator.Coordinator` sets every attribute below in its ``__init__`` and defines every method;
this base class only names them with their types, so each mixin type-checks on its own (mypy). It holds no state
and no code, and refuses to be more than that: behaviour lives in the mixins and in core.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from fleet import round as rnd
    from fleet.coordinator.codec import Codec
    from fleet.coordinator.deltas import RoundDeltas
    from fleet.coordinator.events import CoordinatorConfig, Output
    from fleet.registry import Registry
    from fleet.store import Store


class CoordinatorParts:
    """The attributes and methods one mixin of the coordinator uses and another one (or core.py) provides."""

    plan: Any  # device_agent.engine.ir.Plan
    store: Store
    config: CoordinatorConfig
    codec: Codec
    registry: Registry
    machine: Any  # fleet.round.RoundMachine, or fleet.coordinator.async_round.AsyncMachine in async mode
    shared: list  # the plan's trainable tensors that devices upload and download
    size: int  # coordinates of the flat delta vector
    keep_rows: bool  # robust aggregators and DP need every accepted row, FedAvg only running sums
    version: int
    hash: str
    state: dict[int, np.ndarray]  # the current model's shared tensors
    round_deltas: RoundDeltas | None
    model_payload: bytes | None
    model_base: int | None
    _full: tuple[int, bytes] | None
    _member_full: dict[str, tuple]
    full_sent: dict[str, int]
    dp_secret: bytes
    dp_units: np.ndarray | None

    if TYPE_CHECKING:
        def plan_of(self, device_id: str) -> str | None: ...

        def _unpack(self, blob: bytes) -> dict[int, np.ndarray]: ...

        def _machine(self, event: object, now: float) -> list[Output]: ...

        def _close(self, cmd: rnd.Commit | rnd.Abandon, now: float) -> list[Output]: ...

        def _tasks(self, d: rnd.Dispatch) -> list[Output]: ...

        def _secure_tasks(self, d: rnd.Dispatch, task: bytes) -> list[Output]: ...

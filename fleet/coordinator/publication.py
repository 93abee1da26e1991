"""What the coordinator publishes besides acks: tasks, the current model (DIFF when it can), and the FULL model
for a device that lags behind. Deterministic bytes, so a restarted coordinator republishes the same payloads."""

from __future__ import annotations

import numpy as np

from device_agent.wire.messages import Publish, Task
from fleet import round as rnd
from fleet.coordinator.codec import FamilyCodec, encode_diff
from fleet.coordinator.events import Output
from fleet.coordinator.parts import CoordinatorParts


class Publication(CoordinatorParts):
    """Mixin of :class:`fleet.coordinator.Coordinator`: the outputs that carry models and tasks."""

    def _catch_up(self, device_id: str, held: int) -> list[Output]:
        """The FULL form on ``dev/<id>/model`` for a device whose held version ``model/current`` cannot update:
        older than the current version and not the base of its DIFF. Once per device and version (until its next
        hello): a status sent before the FULL arrived must not fetch it twice. A device on a smaller plan of a
        family gets its own plan's FULL form whenever it holds an older version (``model/current`` is not its)."""
        plan = self.plan_of(device_id)
        if plan is not None and plan != self.codec.plan_hash:
            return self._member_model(device_id, plan, held)
        if held >= self.version or held == self.model_base or self.model_base is None:
            return []
        if self.full_sent.get(device_id) == self.version:
            return []
        self.full_sent[device_id] = self.version
        return [Publish(f"dev/{device_id}/model", self._full_payload())]

    def _full_payload(self) -> bytes:
        if self._full is None or self._full[0] != self.version:
            self._full = (self.version, self.codec.encode_update(self.version - 1, self.version, self.state))
        return self._full[1]

    def _member_model(self, device_id: str, plan: str, held: int) -> list[Output]:
        """The FULL update of ``plan`` (a smaller member) on ``dev/<id>/model``, once per device and version."""
        if held >= self.version or self.full_sent.get(device_id) == self.version:
            return []
        self.full_sent[device_id] = self.version
        key = (plan, self.version)
        if self._member_full.get(plan, (None,))[0] != key:
            assert isinstance(self.codec, FamilyCodec)  # NOTE: only a plan family has members (plan_of)
            payload = self.codec.encode_member_update(plan, self.version - 1, self.version, self.state)
            self._member_full[plan] = (key, payload)
        return [Publish(f"dev/{device_id}/model", self._member_full[plan][1])]

    def _tasks(self, d: rnd.Dispatch) -> list[Output]:
        c = self.config
        task = Task(d.round_id, self.codec.plan_hash, self.version, self.hash, c.lr, c.local_steps, c.batch_size,
                    d.deadline, c.topk_permille).to_json()
        if c.secure_aggregation is not None:
            return self._secure_tasks(d, task)
        assigned = self.machine.assigned
        out: list[Output] = []
        for dev in d.device_ids:
            plan = assigned.get(dev)
            if plan is None:
                out.append(Publish(f"dev/{dev}/task", task))
                continue
            rec = self.registry.devices.get(dev)  # NOTE: its model first: model/current is the largest plan's
            out += self._member_model(dev, plan, rec.model_version if rec is not None else 0)
            out.append(Publish(f"dev/{dev}/task", Task(d.round_id, plan, self.version, self.machine.bases[plan],
                                                       c.lr, c.local_steps, c.batch_size, d.deadline,
                                                       c.topk_permille).to_json()))
        return out


    def _encode_model(self, old_version: int, old_state: dict[int, np.ndarray] | None, version: int,
                      state: dict[int, np.ndarray]) -> tuple[int | None, bytes]:
        """``(base, payload)`` of model/current for ``version``: the DIFF against ``old_version`` when there is
        one to diff against and the codec writes it, else the FULL form (``base`` None). Deterministic, so a
        restarted coordinator republishes the same bytes."""
        if old_version >= 1 and old_state is not None:
            diff = encode_diff(self.codec, old_version, version, old_state, state)
            if diff is not None:
                return old_version, diff
        return None, self.codec.encode_update(version - 1, version, state)

    def _model_output(self) -> Publish:
        """The current version as published after a commit (DIFF against the previous version): same bytes."""
        if self.model_payload is None:
            prev = self.store.version(self.version - 1) if self.version > 1 else None
            old = self._unpack(prev.state) if prev is not None else None
            self.model_base, self.model_payload = self._encode_model(self.version - 1, old, self.version,
                                                                     self.state)
        return Publish("model/current", self.model_payload, retain=True)

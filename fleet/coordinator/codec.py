"""What the coordinator needs from the binary formats (``device_agent.wire``), as an interface with one error type.

:class:`Codec` is the interface (the coordinator and the Flower grid take any object with these methods);
:class:`WireCodec` implements it over the project's wire formats. A payload the reader refuses is a
:class:`CodecError` carrying the reader's WireError code: the only error a codec raises. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from device_agent.wire.delta import delta_from_bytes, delta_to_flat, shared_layout
from device_agent.wire.errors import WireFormatError
from device_agent.wire.plan import plan_hash, plan_to_bytes
from device_agent.wire.update import model_hash, update_from_state, update_from_states, update_hash
from fleet import round as rnd


@dataclass(frozen=True)
class DecodedDelta:
    """A delta payload after the wire reader accepted it. ``values``/``masks`` are per shared trainable tensor
    id, full tensor shape: integer weight-unit differences and the coordinates this device actually sent."""

    header: rnd.Upload
    values: dict[int, np.ndarray]  # tensor id -> int64, tensor shape
    masks: dict[int, np.ndarray]  # tensor id -> bool, tensor shape


class CodecError(ValueError):
    """A payload the wire reader refused; ``code`` is its WireError number."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"wire error {code}: {detail}")
        self.code, self.detail = code, detail


class Codec(Protocol):
    plan_hash: str  # hex

    def plan_bytes(self) -> bytes: ...

    def decode_delta(self, payload: bytes, content_hash: str) -> DecodedDelta: ...  # raises CodecError

    def encode_update(self, base_version: int, new_version: int, state: dict[int, np.ndarray]) -> bytes: ...

    def update_hash(self, payload: bytes) -> str: ...  # hex identity of a model version (a delta's base_hash)

    # optional: ``encode_diff(base_version, new_version, old_state, new_state) -> bytes``, the DIFF form of the
    # same version (same update_hash); see :func:`encode_diff`


def encode_diff(codec, base_version: int, new_version: int, old: dict[int, np.ndarray],
                new: dict[int, np.ndarray]) -> bytes | None:
    """The DIFF form of model ``new_version`` against ``base_version`` (``old``), or None when ``codec`` writes
    only the FULL form (the coordinator then publishes that)."""
    own = getattr(codec, "encode_diff", None)
    return own(base_version, new_version, old, new) if own is not None else None


class WireCodec:
    """:class:`Codec` over ``device_agent.wire``. ``signer`` signs plan and updates; ``verify`` checks deltas."""

    def __init__(self, plan, signer=None, verify=None) -> None:
        self.plan, self.signer, self.verify = plan, signer, verify
        self._layout = shared_layout(plan)  # where delta_to_flat puts each shared tensor: computed once
        self._slices = [(t.id, self._layout.slots[t.id][0], t.numel, t.shape) for t in plan.tensors
                        if t.id in self._layout.slots]
        self._hash = plan_hash(plan)
        self.plan_hash = self._hash.hex()
        self._plan_bytes: bytes | None = None

    def plan_bytes(self) -> bytes:
        if self._plan_bytes is None:
            self._plan_bytes = plan_to_bytes(self.plan, self.signer)
        return self._plan_bytes

    def decode_delta(self, payload: bytes, content_hash: str) -> DecodedDelta:
        try:
            d = delta_from_bytes(payload, verify=self.verify, plan=self.plan, plan_hash=self._hash)
            header = rnd.Upload(d.device_id, d.round_id, bytes(d.plan_hash).hex(), bytes(d.base_hash).hex(),
                                d.counter, d.sample_count, content_hash)
            if bytes(d.plan_hash) != self._hash:  # a well-formed delta for another plan: the round rejects it
                return DecodedDelta(header, {}, {})
            flat_values, flat_mask = delta_to_flat(d, self.plan, plan_hash=self._hash, layout=self._layout)
        except WireFormatError as e:
            raise CodecError(int(e.code), str(e)) from None
        values = {tid: flat_values[off:off + n].reshape(shape) for tid, off, n, shape in self._slices}
        masks = {tid: flat_mask[off:off + n].reshape(shape) for tid, off, n, shape in self._slices}
        return DecodedDelta(header, values, masks)

    def encode_update(self, base_version: int, new_version: int, state: dict[int, np.ndarray]) -> bytes:
        upd = update_from_state(self.plan, state, base_version=base_version, new_version=new_version,
                                plan_hash=self._hash)
        return upd.to_bytes(self.signer)

    def update_hash(self, payload: bytes) -> str:
        return update_hash(payload).hex()

    def encode_diff(self, base_version: int, new_version: int, old: dict[int, np.ndarray],
                    new: dict[int, np.ndarray]) -> bytes:
        upd = update_from_states(self.plan, old, new, base_version=base_version, new_version=new_version,
                                 plan_hash=self._hash)
        return upd.to_bytes(self.signer)


class FamilyCodec(WireCodec):
    """:class:`WireCodec` for a nested plan family (:class:`fleet.compiler.family.PlanFamily`): the largest plan is
    the coordinator's plan (its tensor ids key the model state, ``model/current`` carries it); a delta of a smaller
    member is read with that member's plan and its tensors moved to the largest plan's ids, so aggregation sees one
    coordinate space (absent tensors: mask False). Updates for a member carry exactly its plan's shared tensors."""

    def __init__(self, family, signer=None, verify=None) -> None:
        super().__init__(family.largest.plan, signer, verify)
        self.family = family
        self.members: dict[str, tuple[Any, WireCodec, dict[int, int]]] = {}  # plan hash -> member (PlanMember), codec, ids
        for m in family.members[:-1]:
            c = WireCodec(m.plan, signer, verify)
            self.members[c.plan_hash] = (m, c, family.id_map(m))
        self.needs = {self.plan_hash: family.largest.need, **{h: m.need for h, (m, _, _) in self.members.items()}}

    def assign(self, sram: int) -> str | None:
        """The plan hash a device with ``sram`` bytes trains (the largest member that fits), or None."""
        m = self.family.choose(sram)
        if m is None:
            return None
        if m is self.family.largest:
            return self.plan_hash
        return next(h for h, (mm, _, _) in self.members.items() if mm is m)

    def plan_blobs(self) -> dict[str, bytes]:
        """Every member's signed plan blob by plan hash (each is published retained on ``plan/<hash>``)."""
        return {self.plan_hash: self.plan_bytes(), **{h: c.plan_bytes() for h, (_, c, _) in self.members.items()}}

    def decode_delta(self, payload: bytes, content_hash: str) -> DecodedDelta:
        d = super().decode_delta(payload, content_hash)
        member = self.members.get(d.header.plan_hash)
        if member is None:
            return d
        _, codec, ids = member
        got = codec.decode_delta(payload, content_hash)
        values = {t.id: np.zeros(t.shape, np.int64) for t in self.plan.trainable if not t.personal}
        masks = {tid: np.zeros(v.shape, bool) for tid, v in values.items()}
        for tid, v in got.values.items():
            values[ids[tid]], masks[ids[tid]] = v, got.masks[tid]
        return DecodedDelta(got.header, values, masks)

    def _member_state(self, plan_hash: str, state: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        _, _, ids = self.members[plan_hash]
        return {tid: state[big] for tid, big in ids.items() if big in state}

    def member_hashes(self, version: int, state: dict[int, np.ndarray]) -> dict[str, str]:
        """Model ``version``'s identity (``model_hash``) in every smaller member's view of it, by plan hash."""
        return {h: model_hash(m.plan, self._member_state(h, state), version, plan_hash=bytes.fromhex(h)).hex()
                for h, (m, _, _) in self.members.items()}

    def encode_member_update(self, plan_hash: str, base_version: int, new_version: int,
                             state: dict[int, np.ndarray]) -> bytes:
        """The FULL update of a smaller member: its plan's shared tensors of ``state`` (largest-plan ids)."""
        return self.members[plan_hash][1].encode_update(base_version, new_version, self._member_state(plan_hash, state))

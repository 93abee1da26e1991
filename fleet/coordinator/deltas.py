"""The open round's deltas: each judged and decoded once on arrival, folded into running sums, aggregated at commit.

:class:`RoundDeltas` holds one round's accepted deltas; :class:`DeltaBook` is the part of the coordinator that
judges a delta (through the round machine: the only place verdicts are decided), stores it before it counts,
answers the device, and aggregates a round from exactly the stored rows (re-decoding them after a restart).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from device_agent.wire.messages import Ack, Publish, ack_detail
from fleet import aggregate as agg
from fleet import round as rnd
from fleet.coordinator.codec import CodecError, DecodedDelta
from fleet.coordinator.events import Claimed, Output, Received, Verdict
from fleet.coordinator.partials import Merged, Partial, merge_partials
from fleet.coordinator.parts import CoordinatorParts
from fleet.security.dp import dp_mean, round_rng
from fleet.store import DeltaRow


@dataclass(frozen=True)
class Reading:
    """What :func:`read_delta` made of a payload: ``decoded``, or why the reader refused it."""

    content_hash: str
    decoded: DecodedDelta | None
    reject: int = 0  # fleet.round.Reject value when decoded is None
    detail: str = ""
    round_id: int | None = None  # the payload's round, when it could be read


def read_delta(codec, device_id: str, payload: bytes, content_hash: str | None = None) -> Reading:
    """Decode a delta that arrived on ``dev/<device_id>/delta`` and check what needs no round state: the wire
    reader accepts it and it names the device whose topic carried it. The coordinator and its aggregation workers
    both read deltas here; the round machine (fleet/round.py) judges the rest, in the coordinator only."""
    content_hash = content_hash or hashlib.sha256(payload).hexdigest()
    try:
        decoded = codec.decode_delta(payload, content_hash)
    except CodecError as e:
        return Reading(content_hash, None, int(rnd.Reject.MALFORMED), f"WireError {e.code}: {e.detail}")
    up = decoded.header
    if up.device_id != device_id:
        return Reading(content_hash, None, int(rnd.Reject.WRONG_DEVICE), f"payload says {up.device_id!r}",
                       up.round_id)
    return Reading(content_hash, decoded)


def flat_delta(shared: list, decoded: DecodedDelta) -> tuple[np.ndarray, np.ndarray]:
    """A decoded delta as one flat int64 vector and bool mask over the ``shared`` tensors, in their order."""
    vals = np.concatenate([decoded.values[t.id].reshape(-1) for t in shared]).astype(np.int64, copy=False)
    mask = np.concatenate([decoded.masks[t.id].reshape(-1) for t in shared]).astype(bool, copy=False)
    return vals, mask


class RoundDeltas:
    """One round's accepted deltas, decoded once: running FedAvg sums, plus every row if the aggregator needs them.

    ``hashes`` (device -> content hash) says exactly which deltas are in, so the coordinator can tell whether this
    equals what the store holds for the round before trusting it.
    """

    def __init__(self, round_id: int, size: int, keep_rows: bool):
        self.round_id = round_id
        self.hashes: dict[str, str] = {}
        self.sums = agg.RunningSums(size)
        self.rows: dict[str, tuple[np.ndarray, np.ndarray, int]] | None = {} if keep_rows else None

    def add(self, device_id: str, content_hash: str, values: np.ndarray, mask: np.ndarray, weight: int) -> None:
        if device_id in self.hashes:
            raise ValueError(f"round {self.round_id}: {device_id} already counted")  # the machine never allows it
        self.sums.add(values, mask, weight)
        self.hashes[device_id] = content_hash
        if self.rows is not None:
            self.rows[device_id] = (values, mask, weight)

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``values, masks, weights`` sorted by device id, as :meth:`Coordinator.stacked` reads them back."""
        if self.rows is None:
            raise ValueError("rows were not kept (FedAvg needs only the running sums)")
        rows = [self.rows[d] for d in sorted(self.rows)]
        return (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                np.array([r[2] for r in rows], np.int64))


class DeltaBook(CoordinatorParts):
    """Mixin of :class:`fleet.coordinator.Coordinator`: deltas in, verdicts and aggregates out."""

    # NOTE: set by an aggregation pool (fleet/coordinator/pool.py): ``round_id -> [Partial]``, the workers' sums of
    # the deltas they read (``Claimed``); None: this coordinator reads and sums every delta itself
    partials: Callable[[int], list[Partial]] | None = None
    last_merge: Merged | None = None  # how the last commit's sums were put together (workers, decoded here)

    def _delta(self, ev: Received, now: float) -> list[Output]:
        size = len(ev.payload)  # NOTE: the async coordinator's _judge leaves nbytes out; this one sets it
        return [dataclasses.replace(o, nbytes=size) if isinstance(o, Verdict) and o.nbytes != size else o
                for o in self._judge(ev, now)]

    def _judge(self, ev: Received, now: float) -> list[Output]:
        content_hash = hashlib.sha256(ev.payload).hexdigest()
        m, size = self.machine, len(ev.payload)
        if m.accepted.get(ev.device_id) == content_hash:  # QoS 1 redelivery of a counted delta: same bytes, same
            return self._verdict(ev.device_id, m.round_id, content_hash, None, "", nbytes=size)  # no need to decode
        read = read_delta(self.codec, ev.device_id, ev.payload, content_hash)
        if read.decoded is None:
            return self._verdict(ev.device_id, read.round_id if read.round_id is not None else m.round_id,
                                 content_hash, rnd.Reject(read.reject), read.detail, nbytes=size)
        return self._settle(read.decoded.header, ev.payload, now, read.decoded)

    def _claimed(self, ev: Claimed, now: float) -> list[Output]:
        """A delta an aggregation worker read: judged and stored here, summed by the worker (told by the verdict)."""
        m, size = self.machine, len(ev.payload)
        if m.accepted.get(ev.device_id) == ev.content_hash:
            return self._verdict(ev.device_id, m.round_id, ev.content_hash, None, "", nbytes=size)
        if ev.header is None:
            return self._verdict(ev.device_id, m.round_id, ev.content_hash, rnd.Reject(ev.reject), ev.detail,
                                 nbytes=size)
        return self._settle(ev.header, ev.payload, now, None)  # type: ignore[arg-type]

    def _settle(self, up: rnd.Upload, payload: bytes, now: float, decoded: DecodedDelta | None) -> list[Output]:
        """The round machine's verdict on a read delta; an accepted one is stored, then counted here when
        ``decoded`` is given (None: an aggregation worker holds it in its partial sum)."""
        m = self.machine
        content_hash, size = up.content_hash, len(payload)
        if up.round_id != m.round_id and self.store.has_delta(up.round_id, up.device_id, content_hash):
            return self._verdict(up.device_id, up.round_id, content_hash, None, "", nbytes=size)  # redelivered
        out: list[Output] = []
        for cmd in m.handle(rnd.DeltaArrived(up, now)):
            if isinstance(cmd, rnd.Accepted):
                self.store.accept_delta(DeltaRow(up.round_id, up.device_id, content_hash, up.counter,
                                                 up.num_samples, payload), m.state.value)
                if decoded is not None:
                    self._count(up, decoded)
                rec = self.registry.devices.get(up.device_id)
                if rec is not None and rec.model_version < self.version:  # NOTE: devices send status at connect
                    rec.model_version = self.version  # only; an accepted delta was trained on this version
                out += self._verdict(up.device_id, up.round_id, content_hash, None, "ok", accepted=True, nbytes=size)
            elif isinstance(cmd, rnd.Duplicate):
                out += self._verdict(up.device_id, up.round_id, content_hash, None, "", nbytes=size)
            elif isinstance(cmd, rnd.Rejected):
                out += self._verdict(up.device_id, up.round_id, content_hash, cmd.reason, cmd.detail, nbytes=size)
            else:
                out += self._close(cmd, now)
        return out

    def _verdict(self, device_id: str, round_id: int, content_hash: str, reason: rnd.Reject | None, detail: str,
                 accepted: bool = False, nbytes: int = 0) -> list[Output]:
        name = "ok" if accepted else "duplicate" if reason is None else reason.name.lower()
        ack = Ack(max(round_id, 0), content_hash, accepted or reason is None, name,
                  ack_detail(detail) if reason is not None and detail else None)
        return [Publish(f"dev/{device_id}/ack", ack.to_json()),
                Verdict(device_id, round_id, name, int(reason or 0), detail, nbytes, content_hash)]

    def _flat(self, decoded: DecodedDelta) -> tuple[np.ndarray, np.ndarray]:
        return flat_delta(self.shared, decoded)

    def _count(self, up: rnd.Upload, decoded: DecodedDelta) -> None:
        """Fold an accepted (already stored) delta into the open round's sums."""
        rd = self.round_deltas
        if rd is None or rd.round_id != up.round_id:
            rd = self.round_deltas = RoundDeltas(up.round_id, self.size, self.keep_rows)
        rd.add(up.device_id, up.content_hash, *self._flat(decoded), up.num_samples)

    def _reload(self, round_id: int) -> RoundDeltas:
        """The round's accepted deltas as stored, decoded again (restart, or anything in doubt)."""
        rd = RoundDeltas(round_id, self.size, self.keep_rows)
        for r in self.store.deltas(round_id):
            rd.add(r.device_id, r.content_hash, *self._flat(self.codec.decode_delta(r.payload, r.content_hash)),
                   r.num_samples)
        return rd

    def stacked(self, round_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The round's accepted deltas from the store, flat and sorted by device: ``values, masks, weights``."""
        rows = self.store.deltas(round_id)
        flat = [self._flat(self.codec.decode_delta(r.payload, r.content_hash)) for r in rows]
        weights = np.array([r.num_samples for r in rows], np.int64)
        return np.stack([f[0] for f in flat]), np.stack([f[1] for f in flat]), weights

    def _merged(self, round_id: int, partials: Callable[[int], list[Partial]]) -> agg.RunningSums:
        """The round's FedAvg sums: the workers' partials plus what this coordinator counted itself, each accepted
        delta exactly once; deltas no usable partial covers are decoded from the store here."""
        accepted = self.store.accepted_hashes(round_id)
        rd = self.round_deltas
        own = [Partial(round_id, rd.sums, dict(rd.hashes), "coordinator")] if rd is not None and rd.round_id == round_id else []
        merged = merge_partials(round_id, accepted, own + list(partials(round_id)), self.size)
        if merged.missing:
            for r in self.store.deltas(round_id):
                if r.device_id in merged.missing:
                    merged.sums.add(*self._flat(self.codec.decode_delta(r.payload, r.content_hash)), r.num_samples)
        self.last_merge = merged
        return merged.sums

    def aggregate(self, round_id: int) -> dict[int, np.ndarray]:
        """The model after applying the round's accepted deltas (pure given the store's rows).

        Uses the deltas decoded on arrival when they are exactly the round's stored ones, else decodes the store's.
        """
        c = self.config
        if (partials := self.partials) is not None and c.aggregator == "fedavg" and c.dp is None:
            return self._apply(self._merged(round_id, partials).mean())
        rd = self.round_deltas
        if rd is None or rd.round_id != round_id or rd.hashes != self.store.accepted_hashes(round_id):
            rd = self._reload(round_id)
        if c.dp is not None:
            values, masks, _ = rd.stacked()  # NOTE: equal weights: sample counts would scale a device's sensitivity
            mean = dp_mean(values, masks, clip=c.dp.clip, noise_multiplier=c.dp.noise_multiplier,
                           denominator=c.round.goal, rng=round_rng(self.dp_secret, round_id), units=self.dp_units)
        elif c.aggregator == "fedavg":
            mean = rd.sums.mean()
        else:
            mean = agg.aggregate(c.aggregator, *rd.stacked(), clip=c.clip, beta=c.trim)
        return self._apply(mean)

    def _apply(self, mean: agg.Mean) -> dict[int, np.ndarray]:
        """The current model plus ``mean`` rounded to integer weight units."""
        delta = agg.to_int_delta(mean)
        out, pos = {}, 0
        for t in self.shared:
            out[t.id] = agg.apply_int_delta(self.state[t.id], delta[pos:pos + t.numel])
            pos += t.numel
        return out

"""Secure aggregation on a board: a twin of :class:`device_agent.secagg.MaskedRound` whose work happens on the MCU.

The board keeps its trained delta (SEAL copies it into its masked-round area before the protocol reloads the base),
makes its X25519 keys from its own entropy, Shamir-shares its secrets, encrypts and decrypts the shares, masks the
input and reveals shares once; the host only moves frames (``device_agent/wire/frames_secagg.py``) between the
board and the coordinator's messages. The delta never crosses the UART in clear: :class:`SealingBoardTrainer` returns
the base instead of reading GET_DELTA in a masked round, and :class:`BoardMaskedRound` refuses a non-zero delta.

Entropy: the board's DRBG (SHA-256) mixes its TRNG (a real part's port defines ``tf_secagg_trng``; QEMU's mps2 has
none), 32 bytes the bridge host sends with BEGIN (``os.urandom``: the host is inside the device's trust boundary,
it already holds the samples), the round context, the device id and the tick count at every secagg command.
It refuses rosters asking for distributed DP noise (the board adds none) and 64-bit sums.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct

import numpy as np

from device_agent.board import BoardClient, BoardError
from device_agent.bridge import BoardTrainer
from device_agent.protocol import DeviceProtocol
from device_agent.wire import frames
from device_agent.wire.errors import WireFormatError
from device_agent.wire.frames_secagg import SecAggCommand as C
from device_agent.wire.secagg import (
    SHARE_BYTES,
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    Roster,
    SecAggError,
    ShareKeys,
    SharesFor,
    UnmaskRequest,
    UnmaskResponse,
)

# firmware/src/crypto/tf_secagg_device.h TF_SAR_*
REASONS = {
    1: "not the step the round is at", 2: "no plan or delta base on the board", 3: "a delta value beyond int32",
    4: "a device id outside [A-Za-z0-9_.-]{1,64}", 5: "the session is not this board's plan", 6: "weight 0",
    7: "the board sums mod 2^32 only (bits: 32)", 8: "the board adds no distributed DP noise",
    9: "roster length is not the sealed delta's + 1", 10: "threshold outside (n/2, n]",
    11: "roster ids not sorted and unique", 12: "public keys not all distinct",
    13: "the roster lacks this board's id with its keys", 14: "member index out of range or the board's own",
    15: "an encrypted share does not authenticate", 16: "a share received twice",
    17: "the shares held are not exactly those of U2", 18: "fewer than threshold devices",
    19: "delta x weight x group size may overflow 2^31", 20: "unmask lists overlap, miss U2 or omit this board",
    21: "a second, different unmask request",
}
BOX_BYTES = 2 * SHARE_BYTES + 16


def _call(client: BoardClient, cmd: C, what: str, tail: bytes = b"", **fields) -> tuple[dict, bytes]:
    """One secagg command; a refusal raises :class:`SecAggError` naming the board's reason."""
    f = client.request(cmd, frames.pack("req", cmd, tail, **fields))
    if f.code != frames.Status.OK:
        p = f.payload
        if f.code == frames.Status.ERR_NO_MEMORY and len(p) == 4:
            why = f"the board holds at most {struct.unpack('<I', p)[0]} (members or words)"
        elif f.code == frames.Status.ERR_STATE and len(p) == 4:
            why = REASONS.get(struct.unpack("<I", p)[0], f"reason {struct.unpack('<I', p)[0]}")
        elif f.code == frames.Status.ERR_FORMAT and len(p) == 4:
            why = REASONS.get(struct.unpack("<H", p[:2])[0], f"reason {struct.unpack('<H', p[:2])[0]}")
        else:
            why = "malformed request"
        raise SecAggError(f"board {what}: {frames.Status(f.code).name}: {why}")
    return frames.unpack("resp", cmd, f.payload)


def seal(client: BoardClient) -> int:
    """SEAL: the board keeps ``new - base`` of its shared tensors for the masked round; returns D + 1."""
    return _call(client, C.SEAL, "SEAL")[0]["length"]


class SealingBoardTrainer(BoardTrainer):
    """A :class:`BoardTrainer` whose ``trainable_state`` in a masked round seals the delta on the board and returns
    the base (so the protocol's delta is zero and nothing trained crosses the UART). :class:`BoardDeviceProtocol`
    sets ``seal_next`` for the round it runs."""

    seal_next = False
    sealed_length: int | None = None

    def trainable_state(self) -> dict[int, np.ndarray]:
        if not self.seal_next:
            return super().trainable_state()
        self.seal_next = False
        self.sealed_length = seal(self.client)
        return {tid: v.copy() for tid, v in self.base.items()}


class BoardDeviceProtocol(DeviceProtocol):
    """:class:`DeviceProtocol` for a board: a task of a masked round (OPEN) trains with ``seal_next`` set on its
    :class:`SealingBoardTrainer` (the trainer itself, or the one a wrapper holds as ``.board``, as the simulator's
    ``LazyBoardTrainer`` does)."""

    def _sealer(self) -> SealingBoardTrainer | None:
        for t in (self.trainer, getattr(self.trainer, "board", None)):
            if isinstance(t, SealingBoardTrainer):
                return t
        return None

    def _masked(self, task, new):
        """As :meth:`DeviceProtocol._masked`; a board that refuses or fails BEGIN fails this round (a ``failed``
        status: the coordinator counts the device out) instead of ending the agent."""
        try:
            return super()._masked(task, new)
        except (SecAggError, BoardError, OSError, WireFormatError) as e:
            self.masked = None
            return self.failed(task.round_id, "secagg_board", str(e))

    def _run(self, task):
        sealer = self._sealer()
        if sealer is not None:
            sealer.seal_next = task.round_id == self.secure_round
        try:
            return super()._run(task)
        finally:
            if sealer is not None:
                sealer.seal_next = False


class BoardMaskedRound:
    """One board's masked round, built as ``masked_round=board_masked_round(client)`` for :class:`DeviceProtocol`:
    the same signature and answers as :class:`device_agent.secagg.MaskedRound`, computed by the board."""

    def __init__(self, client: BoardClient, device_id: str, round_id: int, session: bytes, values: np.ndarray,
                 weight: int, units: np.ndarray | None = None, entropy=os.urandom, lock=None):
        self.lock = lock or contextlib.nullcontext()  # held around each conversation with the board
        values = np.asarray(values)
        if values.any():
            raise SecAggError(f"{device_id}: the delta crossed the UART in clear: train with SealingBoardTrainer")
        self.client, self.id, self.round_id, self.session = client, device_id, round_id, session
        self.length = values.size + 1
        ident = device_id.encode()
        with self.lock:
            fields, _ = _call(client, C.BEGIN, "BEGIN", bytes(session) + ident, round_id=round_id,
                              weight=int(weight), entropy=entropy(32), session_len=len(session), id_len=len(ident))
        self.advert = AdvertiseKeys(device_id, fields["c_pk"], fields["s_pk"])
        self.roster: Roster | None = None
        self.index: dict[str, int] = {}
        self._last: tuple[type, object] | None = None

    def answer(self, msg: object) -> object:
        """As :meth:`device_agent.secagg.MaskedRound.answer`: a repeated stage request gets the same reply."""
        if self._last is not None and type(msg) is self._last[0]:
            return self._last[1]
        try:
            with self.lock:
                reply = self._answer(msg)
        except (BoardError, OSError, WireFormatError) as e:  # the board halted or the link broke: a dropout
            raise SecAggError(f"{self.id}: board link: {e}") from e
        self._last = (type(msg), reply)
        return reply

    def _answer(self, msg: object) -> object:
        if isinstance(msg, Roster):
            return self._roster(msg)
        if isinstance(msg, SharesFor):
            return self._mask(msg)
        if isinstance(msg, UnmaskRequest):
            return self._unmask(msg)
        raise SecAggError(f"{self.id}: {type(msg).__name__} is not a coordinator message")

    def _roster(self, r: Roster) -> ShareKeys:
        if r.round_id != self.round_id or r.session != self.session:
            raise SecAggError(f"{self.id}: roster for another round or plan")
        if self.roster is not None:
            raise SecAggError(f"{self.id}: a second roster")
        c = self.client
        _call(c, C.ROSTER, "ROSTER", n=len(r.keys), threshold=r.threshold, length=r.length, bits=r.bits,
              noise=int(r.noise is not None))
        batch, first = b"", 0
        for i, k in enumerate(r.keys):
            ident = k.device_id.encode()
            if len(ident) > 255 or len(k.c_pk) != 32 or len(k.s_pk) != 32:
                raise SecAggError(f"{self.id}: roster member {k.device_id!r} has a malformed id or keys")
            rec = bytes([len(ident)]) + ident + k.c_pk + k.s_pk
            if len(batch) + len(rec) > frames.MAX_PAYLOAD - 4:
                _call(c, C.ROSTER_ADD, "ROSTER_ADD", batch, first=first, count=i - first)
                batch, first = b"", i
            batch += rec
        _call(c, C.ROSTER_ADD, "ROSTER_ADD", batch, first=first, count=len(r.keys) - first)
        own = _call(c, C.SHARE_KEYS, "SHARE_KEYS")[0]["own"]
        self.roster, self.index = r, {k.device_id: i for i, k in enumerate(r.keys)}
        out = []
        for i, k in enumerate(r.keys):
            if i != own:
                fields, box = _call(c, C.GET_SHARE, f"GET_SHARE {i}", index=i)
                if fields["index"] != i or len(box) != BOX_BYTES:
                    raise SecAggError(f"{self.id}: board answered GET_SHARE {i} with {fields}, {len(box)} bytes")
                out.append(EncryptedShare(self.id, k.device_id, box))
        return ShareKeys(self.id, tuple(out))

    def _indices(self, ids) -> bytes:
        try:
            idx = sorted(self.index[d] for d in ids)
        except KeyError as e:
            raise SecAggError(f"{self.id}: {e.args[0]!r} is not in the roster") from None
        return struct.pack(f"<{len(idx)}H", *idx)

    def _mask(self, m: SharesFor) -> MaskedInput:
        if self.roster is None:
            raise SecAggError(f"{self.id}: shares before a roster")
        shared = sorted(set(m.shared))
        if m.receiver != self.id or self.id not in shared:
            raise SecAggError(f"{self.id}: share list is not for this device")
        c = self.client
        for s in m.shares:
            if s.receiver != self.id or s.sender not in shared or s.sender not in self.index:
                raise SecAggError(f"{self.id}: unexpected share {s.sender} -> {s.receiver}")
            if len(s.ciphertext) != BOX_BYTES:
                raise SecAggError(f"{self.id}: share from {s.sender} of {len(s.ciphertext)} bytes, {BOX_BYTES} expected")
            _call(c, C.PUT_SHARE, f"PUT_SHARE from {s.sender}", s.ciphertext, sender=self.index[s.sender])
        _call(c, C.MASK, "MASK", self._indices(shared), count=len(shared))
        raw = bytearray()
        total = None
        while total is None or len(raw) < total:
            fields, tail = _call(c, C.GET_MASKED, f"GET_MASKED at {len(raw)}", offset=len(raw),
                                 max_len=frames.MAX_PAYLOAD - 4)
            total = fields["total"]
            if total != 4 * self.length or (not tail and len(raw) < total) or len(raw) + len(tail) > total:
                raise SecAggError(f"{self.id}: board's masked input of {total} bytes, {4 * self.length} expected")
            raw += tail
        return MaskedInput(self.id, np.frombuffer(bytes(raw), "<u4").astype(np.uint32))

    def _unmask(self, req: UnmaskRequest) -> UnmaskResponse:
        if self.roster is None:
            raise SecAggError(f"{self.id}: unmask request before a roster")
        surv, drop = sorted(req.survivors), sorted(req.dropped)
        c = self.client
        n = _call(c, C.UNMASK, "UNMASK", self._indices(surv) + self._indices(drop), survivors=len(surv),
                  dropped=len(drop))[0]["reveals"]
        per = (frames.MAX_PAYLOAD - 2) // SHARE_BYTES
        raw = b""
        for first in range(0, n, per):
            count = min(per, n - first)
            raw += _call(c, C.GET_REVEAL, f"GET_REVEAL at {first}", first=first, count=count)[1]
        vals = [int.from_bytes(raw[i * SHARE_BYTES:(i + 1) * SHARE_BYTES], "big") for i in range(n)]
        if len(vals) != len(surv) + len(drop):
            raise SecAggError(f"{self.id}: board revealed {len(vals)} shares, {len(surv) + len(drop)} asked")
        return UnmaskResponse(self.id, dict(zip(surv, vals[:len(surv)], strict=True)),
                              dict(zip(drop, vals[len(surv):], strict=True)))


def board_masked_round(client: BoardClient, entropy=os.urandom, lock=None):
    """The ``masked_round=`` builder of a board's :class:`DeviceProtocol` (see the module docstring); ``lock``: held
    around each conversation with the board when other threads talk to it too (a ``threading.Lock``)."""
    return functools.partial(BoardMaskedRound, client, entropy=entropy, lock=lock)





def step_ticks(client: BoardClient) -> dict[str, int]:
    """STATS: core ticks the board spent in each secagg step since reset (``<step>_ticks``; under QEMU
    ``-icount shift=0`` a tick is 40 instructions on mps2)."""
    return _call(client, C.STATS, "STATS")[0]
__all__ = ["REASONS", "BoardDeviceProtocol", "BoardMaskedRound", "SealingBoardTrainer", "board_masked_round", "seal",
           "step_ticks"]

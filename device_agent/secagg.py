"""Secure aggregation, device side (host devices only): the coordinator learns the sum of a group's inputs, not one.

Double masking as in Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), honest-but-curious variant, sans-I/O: each method takes the coordinator's last message and returns
this device's next one. A device's input is an integer vector over the plan's fixed support; it sends

    y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} sign(u, v) PRG(s_uv)      (mod 2^bits, sign = +1 if u < v else -1)

where ``b_u`` is a fresh 32-byte self-mask seed, ``s_uv`` an X25519 agreement between u's and v's masking keys,
and PRG is ChaCha20 keyed by HKDF-SHA256(seed, round context). Pairwise masks cancel in the sum; ``b_u`` and the
masking private key are Shamir-shared (threshold ``t`` over GF(2^521 - 1)) with the other devices, encrypted
pairwise (X25519 + ChaCha20-Poly1305), so the coordinator can remove the masks of devices that dropped out
(from their key shares) and of survivors (from their self-mask shares) once ``t`` devices answer. For any
device it asks for *either* its self-mask share *or* its key share, never both: a device answers one unmask
request per round and refuses one that names a device on both lists.

Primitives and messages: ``device_agent/wire/secagg.py`` (the shared spec), their bytes on MQTT:
``device_agent/wire/secagg_frames.py``. The coordinator-side counterpart is ``fleet/security/secagg.py``;
:class:`MaskedRound` is what the device protocol (``device_agent/protocol.py``) runs for one masked round. The
firmware does not implement the protocol itself (a board's bridge would). It refuses rosters with a threshold at
or below half the group, and a roster bound to another plan.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.wire.secagg import (
    SHARE_BYTES,
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    Roster,
    SecAggError,
    ShareKeys,
    SharesFor,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    check_roster,
    context,
    encode_dense_input,
    noisy_lattice,
    pair_aead,
    pair_mask,
    prg,
    raw_priv,
    raw_pub,
    shamir_split,
)


class SecAggDevice:
    """One device in one round: ``advertise -> share_keys -> masked_input -> unmask``, each exactly once."""

    def __init__(self, device_id: str):
        self.id = device_id
        self.stage = Stage.NEW
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = secrets.token_bytes(32)
        self.roster: Roster | None = None
        self._received: dict[str, tuple[int, int]] = {}  # sender -> (share of s_sk, share of b)
        self._shared: tuple[str, ...] = ()

    def _expect(self, stage: Stage) -> None:
        if self.stage != stage:
            raise SecAggError(f"{self.id}: message for stage {stage.value}, device is at {self.stage.value}")

    def advertise(self) -> AdvertiseKeys:
        self._expect(Stage.NEW)
        self.stage = Stage.ADVERTISED
        return AdvertiseKeys(self.id, raw_pub(self._c), raw_pub(self._s))

    def _x(self, device_id: str) -> int:
        """Shamir point of a roster member: its 1-based position in the sorted roster."""
        assert self.roster is not None
        return 1 + [k.device_id for k in self.roster.keys].index(device_id)

    def share_keys(self, roster: Roster) -> ShareKeys:
        self._expect(Stage.ADVERTISED)
        check_roster(roster)
        me = [k for k in roster.keys if k.device_id == self.id]
        if me != [AdvertiseKeys(self.id, raw_pub(self._c), raw_pub(self._s))]:
            raise SecAggError(f"{self.id}: roster does not carry this device's keys")
        self.roster = roster
        ctx = context(roster.round_id, roster.session)
        xs = [self._x(k.device_id) for k in roster.keys]
        s_sh = shamir_split(raw_priv(self._s), xs, roster.threshold)
        b_sh = shamir_split(self._b, xs, roster.threshold)
        out = []
        for k in roster.keys:
            x = self._x(k.device_id)
            plain = s_sh[x].to_bytes(SHARE_BYTES, "big") + b_sh[x].to_bytes(SHARE_BYTES, "big")
            if k.device_id == self.id:
                self._received[self.id] = (s_sh[x], b_sh[x])
                continue
            box, nonce, ad = pair_aead(self._c, k.c_pk, self.id, k.device_id, ctx)
            out.append(EncryptedShare(self.id, k.device_id, box.encrypt(nonce, plain, ad)))
        self.stage = Stage.SHARED
        return ShareKeys(self.id, tuple(out))

    def masked_input(self, shares: SharesFor, x: np.ndarray) -> MaskedInput:
        """Decrypt the shares addressed to this device and mask ``x`` ((length,) integers, already mod-safe)."""
        self._expect(Stage.SHARED)
        r = self.roster
        assert r is not None
        ctx = context(r.round_id, r.session)
        keys = {k.device_id: k for k in r.keys}
        shared = tuple(sorted(set(shares.shared)))
        if shares.receiver != self.id or self.id not in shared or not set(shared) <= set(keys):
            raise SecAggError(f"{self.id}: share list is not for this device or names unknown devices")
        if len(shared) < r.threshold:
            raise SecAggError(f"{self.id}: only {len(shared)} devices shared keys, threshold {r.threshold}")
        for s in shares.shares:
            if s.receiver != self.id or s.sender not in shared or s.sender == self.id or s.sender in self._received:
                raise SecAggError(f"{self.id}: unexpected share {s.sender} -> {s.receiver}")
            box, nonce, ad = pair_aead(self._c, keys[s.sender].c_pk, s.sender, self.id, ctx)
            try:
                plain = box.decrypt(nonce, s.ciphertext, ad)
            except InvalidTag:
                raise SecAggError(f"{self.id}: share from {s.sender} does not authenticate") from None
            self._received[s.sender] = (int.from_bytes(plain[:SHARE_BYTES], "big"),
                                        int.from_bytes(plain[SHARE_BYTES:], "big"))
        if set(self._received) != set(shared):
            raise SecAggError(f"{self.id}: shares missing from {sorted(set(shared) - set(self._received))}")
        x = np.asarray(x)
        if x.shape != (r.length,) or x.dtype.kind not in "iu":
            raise SecAggError(f"{self.id}: input must be ({r.length},) integers, got {x.shape} {x.dtype}")
        dt = np.dtype(f"u{r.bits // 8}")
        y = x.astype(np.int64).astype(dt)  # two's complement, i.e. mod 2^bits
        y = y + prg(self._b, ctx, r.length, r.bits)
        own = raw_priv(self._s)
        for v in shared:
            if v != self.id:
                y = y + pair_mask(self.id, own, v, keys[v].s_pk, ctx, r.length, r.bits)
        self._shared = shared
        self.stage = Stage.MASKED
        return MaskedInput(self.id, y.astype(dt))

    def unmask(self, req: UnmaskRequest) -> UnmaskResponse:
        """Reveal shares for the coordinator's unmasking; refuses anything that would unmask one input."""
        self._expect(Stage.MASKED)
        r = self.roster
        assert r is not None
        surv, drop = set(req.survivors), set(req.dropped)
        if surv & drop:
            raise SecAggError(f"{self.id}: {sorted(surv & drop)} listed as both survivor and dropped")
        if surv | drop != set(self._shared) or self.id not in surv:
            raise SecAggError(f"{self.id}: survivors + dropped must be exactly the devices that shared keys")
        if len(surv) < r.threshold:
            raise SecAggError(f"{self.id}: {len(surv)} survivors, threshold {r.threshold}: refusing to unmask")
        self.stage = Stage.DONE
        return UnmaskResponse(self.id, {v: self._received[v][1] for v in sorted(surv)},
                              {v: self._received[v][0] for v in sorted(drop)})


class MaskedRound:
    """One device's masked round: its trained delta waits here, masked, until the coordinator's stages ask.

    ``values`` is the flat delta (:func:`device_agent.wire.secagg.flat_delta`), ``weight`` the sample count; the
    masked input is :func:`device_agent.wire.secagg.encode_dense_input` of them (D + 1 integers), or, when the
    roster asks for DP noise, of :func:`device_agent.wire.secagg.noisy_lattice` with weight 1 (``units``: the
    plan's :func:`device_agent.wire.secagg.flat_units`).
    Each coordinator message gives this device's answer (or raises :class:`SecAggError`, and the round goes on
    without this device). The input is encoded for the roster's group size and modulus only once the roster is
    known, and nothing of it leaves unmasked.
    """

    def __init__(self, device_id: str, round_id: int, session: bytes, values: np.ndarray, weight: int,
                 units: np.ndarray | None = None):
        self.round_id, self.session = round_id, session
        self.values, self.weight = np.asarray(values, np.int64), int(weight)
        self.units = units  # (D,) real value of one integer step: for a roster that asks for DP noise
        self.device = SecAggDevice(device_id)
        self.advert = self.device.advertise()
        self._last: tuple[type, object] | None = None  # (request kind, reply) of the last stage answered

    def answer(self, msg: object) -> object:
        """The reply to a Roster, SharesFor or UnmaskRequest of this round. A repeated request of the stage just
        answered (the coordinator re-sends after a broker restart) gets the same reply again, never a new one."""
        if self._last is not None and type(msg) is self._last[0]:
            return self._last[1]
        reply = self._answer(msg)
        self._last = (type(msg), reply)
        return reply

    def _answer(self, msg: object) -> object:
        d = self.device
        if isinstance(msg, Roster):
            if msg.round_id != self.round_id or msg.session != self.session:
                raise SecAggError(f"{d.id}: roster for another round or plan")
            if msg.length != self.values.size + 1:
                raise SecAggError(f"{d.id}: roster length {msg.length}, this plan's masked input is "
                                  f"{self.values.size + 1}")
            return d.share_keys(msg)
        if isinstance(msg, SharesFor):
            r = d.roster
            if r is None:
                raise SecAggError(f"{d.id}: shares before a roster")
            if r.noise is None:
                x = encode_dense_input(self.values, self.weight, len(r.keys), r.bits)
            else:  # distributed DP: equal weights (a sample count would scale one device's sensitivity)
                units = self.units if r.noise.real_units else None
                if units is None and r.noise.real_units:
                    raise SecAggError(f"{d.id}: the roster asks for real units and this device has no plan scales")
                rng = np.random.default_rng(secrets.randbits(128))
                x = encode_dense_input(noisy_lattice(self.values, units, r.noise, r.threshold, rng), 1,
                                       len(r.keys), r.bits)
            return d.masked_input(msg, x)
        if isinstance(msg, UnmaskRequest):
            return d.unmask(msg)
        raise SecAggError(f"{d.id}: {type(msg).__name__} is not a coordinator message")

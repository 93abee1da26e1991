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

The firmware does not implement this (an MCU would need X25519, ChaCha20-Poly1305 and Shamir in C); the
coordinator-side counterpart is ``fleet/security/secagg.py``. Wire encoding of the messages over MQTT is not
defined yet: they are dataclasses here. It refuses rosters with a threshold at or below half the group.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PRIME = 2**521 - 1  # Mersenne prime: every 32-byte secret is a field element
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_GROUP = 300  # devices per secure-aggregation group (share traffic and work grow as n^2)
BITS = (32, 64)
_VERSION = b"tinyfleet-secagg-v1"


class SecAggError(ValueError):
    """A message that breaks the protocol (wrong stage, bad roster, forged share...); the device stops."""


# --- primitives ---------------------------------------------------------------------------------------------


def shamir_split(secret: bytes, xs: list[int], threshold: int) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` (<= 64 bytes) with a random degree ``threshold - 1`` polynomial."""
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise SecAggError(f"shamir: need distinct non-zero points and 1 <= t <= n, got t={threshold}, n={len(xs)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def shamir_combine(shares: dict[int, int], threshold: int, size: int) -> bytes:
    """The secret (``size`` bytes) from at least ``threshold`` shares: Lagrange interpolation at 0."""
    if len(shares) < threshold:
        raise SecAggError(f"shamir: {len(shares)} shares, {threshold} needed")
    pts = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise SecAggError("shamir: shares are inconsistent (reconstructed value out of range)")
    return secret.to_bytes(size, "big")


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_VERSION + info).derive(ikm)


def context(round_id: int, session: bytes) -> bytes:
    """What every key is bound to: the round id and a session label (e.g. fleet name + plan hash)."""
    return struct.pack("<I", round_id) + hashlib.sha256(session).digest()


def prg(seed: bytes, ctx: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform integers mod ``2^bits``: ChaCha20 keystream under ``HKDF(seed, ctx)``, little-endian."""
    key = _hkdf(seed, b" mask " + ctx)
    enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    width = bits // 8
    return np.frombuffer(enc.update(b"\0" * (width * length)), f"<u{width}").astype(f"u{width}")


def _raw_pub(k: X25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_priv(k: X25519PrivateKey) -> bytes:
    return k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def pair_seed(own_private: bytes, peer_public: bytes) -> bytes:
    """The pairwise mask seed ``s_uv`` (same for u and v): raw X25519 agreement, expanded later by :func:`prg`."""
    return X25519PrivateKey.from_private_bytes(own_private).exchange(X25519PublicKey.from_public_bytes(peer_public))


def pair_mask(own_id: str, own_private: bytes, peer_id: str, peer_public: bytes, ctx: bytes, length: int,
              bits: int) -> np.ndarray:
    """``sign(u, v) * PRG(s_uv)`` mod 2^bits, as device ``own_id`` adds it (sign +1 if own_id < peer_id)."""
    m = prg(pair_seed(own_private, peer_public), ctx, length, bits)
    return m if own_id < peer_id else np.negative(m)  # unsigned: wraps mod 2^bits


def _aead(own_c: X25519PrivateKey, peer_c_pub: bytes, sender: str, receiver: str, ctx: bytes):
    key = _hkdf(own_c.exchange(X25519PublicKey.from_public_bytes(peer_c_pub)), b" share-encryption " + ctx)
    nonce = hashlib.sha256(f"{sender}\0{receiver}".encode()).digest()[:12]  # distinct per direction, one use
    ad = ctx + f"{sender}\0{receiver}".encode()
    return ChaCha20Poly1305(key), nonce, ad


# --- messages -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    """Device -> coordinator: two X25519 public keys (share encryption ``c_pk``, masking ``s_pk``)."""

    device_id: str
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class Roster:
    """Coordinator -> every advertiser (U1): who takes part, in device-id order, and the parameters."""

    round_id: int
    session: bytes
    threshold: int
    length: int  # integers per input vector
    bits: int  # values are mod 2^bits
    keys: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShare:
    sender: str
    receiver: str
    ciphertext: bytes  # AEAD(share of s_sk || share of b), 2 x 66 bytes + 16-byte tag


@dataclass(frozen=True)
class ShareKeys:
    """Device -> coordinator: one encrypted share pair for every other roster member."""

    device_id: str
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class SharesFor:
    """Coordinator -> one device of U2: the shares addressed to it, and who shared (U2)."""

    receiver: str
    shared: tuple[str, ...]
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    device_id: str
    y: np.ndarray = field(repr=False)  # (length,) uint32 / uint64


@dataclass(frozen=True)
class UnmaskRequest:
    """Coordinator -> every survivor: U3 (masked inputs received) and U2 \\ U3 (dropped after sharing)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """Device -> coordinator: its share of ``b_v`` for each survivor, of ``s_sk_v`` for each dropped device."""

    device_id: str
    self_mask_shares: dict[str, int]
    key_shares: dict[str, int]


# --- the device's state machine -----------------------------------------------------------------------------


class Stage(str, Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"


def check_roster(r: Roster, max_group: int = MAX_GROUP) -> None:
    """The rules both sides apply to a roster; raises :class:`SecAggError`."""
    ids = [k.device_id for k in r.keys]
    n = len(ids)
    if ids != sorted(set(ids)):
        raise SecAggError("roster: device ids must be unique and sorted")
    if n > max_group:
        raise SecAggError(f"roster: {n} devices, at most {max_group} per group (split the fleet into groups)")
    if not n // 2 < r.threshold <= n:
        raise SecAggError(f"roster: threshold must be in ({n // 2}, {n}] for {n} devices, got {r.threshold}")
    pubs = [k.c_pk for k in r.keys] + [k.s_pk for k in r.keys]
    if len(set(pubs)) != len(pubs) or any(len(p) != 32 for p in pubs):
        raise SecAggError("roster: public keys must be 32 bytes and all distinct")
    if r.bits not in BITS or r.length < 1:
        raise SecAggError(f"roster: bits in {BITS} and length >= 1 expected, got {r.bits}, {r.length}")


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
        return AdvertiseKeys(self.id, _raw_pub(self._c), _raw_pub(self._s))

    def _x(self, device_id: str) -> int:
        """Shamir point of a roster member: its 1-based position in the sorted roster."""
        assert self.roster is not None
        return 1 + [k.device_id for k in self.roster.keys].index(device_id)

    def share_keys(self, roster: Roster) -> ShareKeys:
        self._expect(Stage.ADVERTISED)
        check_roster(roster)
        me = [k for k in roster.keys if k.device_id == self.id]
        if me != [AdvertiseKeys(self.id, _raw_pub(self._c), _raw_pub(self._s))]:
            raise SecAggError(f"{self.id}: roster does not carry this device's keys")
        self.roster = roster
        ctx = context(roster.round_id, roster.session)
        xs = [self._x(k.device_id) for k in roster.keys]
        s_sh = shamir_split(_raw_priv(self._s), xs, roster.threshold)
        b_sh = shamir_split(self._b, xs, roster.threshold)
        out = []
        for k in roster.keys:
            x = self._x(k.device_id)
            plain = s_sh[x].to_bytes(SHARE_BYTES, "big") + b_sh[x].to_bytes(SHARE_BYTES, "big")
            if k.device_id == self.id:
                self._received[self.id] = (s_sh[x], b_sh[x])
                continue
            aead, nonce, ad = _aead(self._c, k.c_pk, self.id, k.device_id, ctx)
            out.append(EncryptedShare(self.id, k.device_id, aead.encrypt(nonce, plain, ad)))
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
            aead, nonce, ad = _aead(self._c, keys[s.sender].c_pk, s.sender, self.id, ctx)
            try:
                plain = aead.decrypt(nonce, s.ciphertext, ad)
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
        own = _raw_priv(self._s)
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


# --- inputs: a delta over the plan's fixed support as one integer vector -----------------------------------


def encode_input(values: np.ndarray, mask: np.ndarray, weight: int, group_size: int, bits: int = 32) -> np.ndarray:
    """``concat(w * v * m, w * m)`` (2D,) int64: summed over a group, the two halves are FedAvg's ``num, den``.

    Refuses values whose sum over ``group_size`` devices could leave the signed ``bits`` range (the sum is only
    known mod 2^bits): every entry must satisfy ``|entry| * group_size < 2^(bits-1)``.
    """
    v = np.asarray(values, np.int64).reshape(-1)
    m = np.asarray(mask, bool).reshape(-1)
    if v.shape != m.shape or weight < 1:
        raise SecAggError(f"values {v.shape} and mask {m.shape} must match, weight must be >= 1 (got {weight})")
    out = np.concatenate([np.where(m, v * weight, 0), m.astype(np.int64) * weight])
    limit = (1 << (bits - 1)) // group_size
    if np.abs(out).max(initial=0) >= limit:
        raise SecAggError(f"input entry {int(np.abs(out).max())} x {group_size} devices may overflow 2^{bits - 1}: "
                          "use bits=64 or clip the delta")
    return out

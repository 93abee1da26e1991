"""Secure aggregation, the shared spec: Shamir sharing, PRG masks, pairwise keys and the protocol messages.

Imported by both sides: the device (``device_agent/secagg.py``, which holds the protocol and its narrative)
and the coordinator (``fleet/security/secagg.py``). Pure functions and dataclasses, no I/O; it refuses rosters
with a threshold at or below half the group.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
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


def shamir_coefficients(seed: bytes, count: int) -> list[int]:
    """``count`` field elements from a 32-byte secret seed: the ChaCha20 keystream under it (zero nonce), read as
    66-byte big-endian numbers masked to 521 bits (``PRIME`` itself reads as 0). A board derives its polynomial the
    same way (firmware/src/crypto/tf_shamir.c), so it never stores the polynomial."""
    if len(seed) != 32 or count < 0:
        raise SecAggError(f"shamir: a 32-byte seed and count >= 0 expected, got {len(seed)} bytes, {count}")
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    stream = enc.update(b"\0" * (SHARE_BYTES * count))
    out = []
    for k in range(count):
        v = int.from_bytes(stream[SHARE_BYTES * k:SHARE_BYTES * (k + 1)], "big") & PRIME
        out.append(0 if v == PRIME else v)
    return out


def shamir_split(secret: bytes, xs: list[int], threshold: int, seed: bytes | None = None) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` (<= 64 bytes) with a random degree ``threshold - 1`` polynomial: its
    coefficients are :func:`shamir_coefficients` of ``seed`` (default: 32 fresh secret bytes)."""
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise SecAggError(f"shamir: need distinct non-zero points and 1 <= t <= n, got t={threshold}, n={len(xs)}")
    seed = secrets.token_bytes(32) if seed is None else seed
    coeffs = [int.from_bytes(secret, "big")] + shamir_coefficients(seed, threshold - 1)
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


def raw_pub(k: X25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def raw_priv(k: X25519PrivateKey) -> bytes:
    return k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def pair_seed(own_private: bytes, peer_public: bytes) -> bytes:
    """The pairwise mask seed ``s_uv`` (same for u and v): raw X25519 agreement, expanded later by :func:`prg`."""
    return X25519PrivateKey.from_private_bytes(own_private).exchange(X25519PublicKey.from_public_bytes(peer_public))


def pair_mask(own_id: str, own_private: bytes, peer_id: str, peer_public: bytes, ctx: bytes, length: int,
              bits: int) -> np.ndarray:
    """``sign(u, v) * PRG(s_uv)`` mod 2^bits, as device ``own_id`` adds it (sign +1 if own_id < peer_id)."""
    m = prg(pair_seed(own_private, peer_public), ctx, length, bits)
    return m if own_id < peer_id else np.negative(m)  # unsigned: wraps mod 2^bits


def pair_aead(own_c: X25519PrivateKey, peer_c_pub: bytes, sender: str, receiver: str, ctx: bytes):
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
class Noise:
    """Distributed DP in a masked round (docs/security.md): each device clips its delta to L2 ``clip`` (real units
    when ``real_units``, else integer units), scales it so ``clip`` is ``resolution`` lattice steps, rounds, and adds
    symmetric Skellam noise ``Poisson(mu / t) - Poisson(mu / t)`` per coordinate (t: the roster's threshold), so a
    sum of at least t devices carries at least ``Skellam(mu)``."""

    clip: float
    resolution: int
    mu: float
    real_units: bool = True


@dataclass(frozen=True)
class Roster:
    """Coordinator -> every advertiser (U1): who takes part, in device-id order, and the parameters."""

    round_id: int
    session: bytes
    threshold: int
    length: int  # integers per input vector
    bits: int  # values are mod 2^bits
    keys: tuple[AdvertiseKeys, ...]
    noise: Noise | None = None  # distributed DP noise every member adds (None: an exact sum)


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
    z = r.noise
    if z is not None and not (math.isfinite(z.clip) and z.clip > 0 and math.isfinite(z.mu) and z.mu > 0
                              and 1 <= z.resolution <= 1 << 24):
        raise SecAggError(f"roster: noise needs clip > 0, mu > 0 (finite) and 1 <= resolution <= 2^24, got {z}")


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


def encode_dense_input(values: np.ndarray, weight: int, group_size: int, bits: int = 32) -> np.ndarray:
    """``concat(w * v, [w])`` (D + 1,) int64: a delta on every coordinate of the fixed support (no top-k), so
    FedAvg's denominator is one number, the sum of the weights. Refuses, as :func:`encode_input`, entries whose sum
    over ``group_size`` devices could leave the signed ``bits`` range."""
    v = np.asarray(values, np.int64).reshape(-1)
    if weight < 1:
        raise SecAggError(f"weight must be >= 1, got {weight}")
    out = np.concatenate([v * weight, [weight]])
    limit = (1 << (bits - 1)) // group_size
    if np.abs(out).max(initial=0) >= limit:
        raise SecAggError(f"input entry {int(np.abs(out).max())} x {group_size} devices may overflow 2^{bits - 1}: "
                          "use bits=64 or clip the delta")
    return out


def flat_units(shared: list) -> np.ndarray:
    """(D,) float64: the real value of one integer step of every coordinate of ``shared`` (in that order): a
    tensor's per-channel scale repeated over the channel's elements, a per-tensor scale over the whole tensor."""
    parts = []
    for t in shared:
        s = np.asarray(t.scale, np.float64).reshape(-1)
        if s.size == 1:
            parts.append(np.full(t.numel, s[0]))
        elif s.size == t.shape[0]:
            parts.append(np.repeat(s, t.numel // t.shape[0]))
        else:
            raise SecAggError(f"tensor {t.name}: {s.size} scales for shape {t.shape}")
    u = np.concatenate(parts) if parts else np.zeros(0)
    if not (np.isfinite(u).all() and (u > 0).all()):
        raise SecAggError("plan scales must be finite and > 0")
    return u


def noisy_lattice(values: np.ndarray, units: np.ndarray | None, noise: Noise, threshold: int,
                  rng: np.random.Generator) -> np.ndarray:
    """A device's share of a distributed-DP sum (D,) int64: its delta in real units (``units``; None: integer
    units) clipped to L2 ``noise.clip``, scaled by ``resolution / clip`` and rounded to integers (the clipped
    norm grows by at most sqrt(D) / 2), plus ``Poisson(mu / threshold) - Poisson(mu / threshold)`` per coordinate.
    ``rng`` must come from a secret seed (the device's own entropy)."""
    v = np.asarray(values, np.float64).reshape(-1)
    real = v * (np.ones_like(v) if units is None else np.asarray(units, np.float64))
    norm = float(np.sqrt((real * real).sum()))
    real = real * min(1.0, noise.clip / norm) if norm > 0 else real
    lattice = np.rint(real * (noise.resolution / noise.clip)).astype(np.int64)
    lam = noise.mu / threshold
    return lattice + rng.poisson(lam, lattice.size) - rng.poisson(lam, lattice.size)


def session_label(plan_hash: bytes) -> bytes:
    """The session every masked round of a plan is bound to (with the round id): both sides derive it."""
    return b"tinyfleet-secagg plan=" + bytes(plan_hash)


def flat_delta(shared: list, old: dict[int, np.ndarray], new: dict[int, np.ndarray]) -> np.ndarray:
    """``new - old`` (int64) of the shared trainable tensors, flat, in ``shared`` order (the plan's trainable order,
    personal tensors left out): the layout of a masked input, the same on the device and the coordinator."""
    return np.concatenate([np.asarray(new[t.id], np.int64).reshape(-1) - np.asarray(old[t.id], np.int64).reshape(-1)
                           for t in shared])

"""Secure aggregation, coordinator side: route keys and shares, collect masked inputs, remove the masks.

Sans-I/O counterpart of ``device_agent/secagg.py`` (read its docstring for the protocol). One
:class:`SecAggServer` runs one group of at most ``MAX_GROUP`` devices for one round through four stages:

    advertise keys (U1) -> share keys (U2) -> masked input (U3) -> unmasking (>= t answers) -> sum mod 2^bits

Each stage closes with an explicit call (``roster()``, ``route_shares()``, ``unmask_request()``, ``result()``)
that raises :class:`SecAggAborted` when fewer than ``threshold`` devices took part: the round's sum is then
unknowable and no partial result exists. The server never sees an individual input: it holds masked vectors
and, per device, either the self-mask seed (survivors) or the masking key (dropouts), never both.

It refuses to aggregate robustly (median, trimming, norm checks need individual inputs): a malicious device
inside a secure-aggregation group can shift the sum arbitrarily (mod 2^bits). See docs/security.md.
"""

from __future__ import annotations

import numpy as np

from device_agent.wire.secagg import (
    MAX_GROUP,
    SHARE_BYTES,
    AdvertiseKeys,
    MaskedInput,
    Noise,
    Roster,
    SecAggError,
    ShareKeys,
    SharesFor,
    UnmaskRequest,
    UnmaskResponse,
    check_roster,
    context,
    pair_mask,
    prg,
    shamir_combine,
)


class SecAggAborted(RuntimeError):
    """Fewer than ``threshold`` devices are left at some stage: the round's secure sum cannot be computed."""


def plan_groups(device_ids: list[str], max_group: int = MAX_GROUP) -> list[list[str]]:
    """Split devices (sorted) into ``ceil(n / max_group)`` groups of near-equal size, each run separately.

    Sums of groups add up to the fleet's sum; each group's sum is what the coordinator learns.
    """
    ids = sorted(device_ids)
    k = max(1, -(-len(ids) // max_group))
    return [ids[i::k] for i in range(k)]


class SecAggServer:
    """One group, one round. Feed every device message to ``receive``; close stages in order."""

    def __init__(self, round_id: int, session: bytes, threshold: int, length: int, bits: int = 32,
                 max_group: int = MAX_GROUP, noise: Noise | None = None):
        self.round_id, self.session, self.threshold, self.noise = round_id, session, threshold, noise
        self.length, self.bits, self.max_group = length, bits, max_group
        self.ctx = context(round_id, session)
        self.stage = "advertise"
        self.keys: dict[str, AdvertiseKeys] = {}
        self.shares: dict[str, ShareKeys] = {}
        self.masked: dict[str, np.ndarray] = {}
        self.answers: dict[str, UnmaskResponse] = {}
        self._roster: Roster | None = None
        self._request: UnmaskRequest | None = None

    def _need(self, stage: str, have: int, what: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"secagg round {self.round_id}: {what} in stage {self.stage}")
        if have < self.threshold:
            self.stage = "aborted"
            raise SecAggAborted(f"secagg round {self.round_id}: only {have} devices {what}, threshold "
                                f"{self.threshold}: round aborted, no sum")

    def receive(self, msg: object) -> None:
        """Accept one device message for the current stage; late or unexpected messages raise SecAggError."""
        if isinstance(msg, AdvertiseKeys) and self.stage == "advertise":
            if msg.device_id in self.keys:
                raise SecAggError(f"{msg.device_id} advertised twice")
            self.keys[msg.device_id] = msg
        elif isinstance(msg, ShareKeys) and self.stage == "share":
            assert self._roster is not None
            others = {k.device_id for k in self._roster.keys} - {msg.device_id}
            if msg.device_id not in self.keys or msg.device_id in self.shares:
                raise SecAggError(f"{msg.device_id}: shares from a non-member or twice")
            if sorted(s.receiver for s in msg.shares) != sorted(others) or any(s.sender != msg.device_id
                                                                               for s in msg.shares):
                raise SecAggError(f"{msg.device_id}: must send exactly one share to every other member")
            self.shares[msg.device_id] = msg
        elif isinstance(msg, MaskedInput) and self.stage == "masked":
            y = np.asarray(msg.y)
            if msg.device_id not in self.shares or msg.device_id in self.masked:
                raise SecAggError(f"{msg.device_id}: masked input from a device outside U2, or twice")
            if y.shape != (self.length,) or y.dtype != np.dtype(f"u{self.bits // 8}"):
                raise SecAggError(f"{msg.device_id}: masked input must be ({self.length},) uint{self.bits}")
            self.masked[msg.device_id] = y
        elif isinstance(msg, UnmaskResponse) and self.stage == "unmask":
            assert self._request is not None
            if msg.device_id not in self.masked or msg.device_id in self.answers:
                raise SecAggError(f"{msg.device_id}: unmask answer from a non-survivor, or twice")
            if (sorted(msg.self_mask_shares) != sorted(self._request.survivors)
                    or sorted(msg.key_shares) != sorted(self._request.dropped)):
                raise SecAggError(f"{msg.device_id}: unmask answer does not match the request")
            self.answers[msg.device_id] = msg
        else:
            raise SecAggError(f"secagg round {self.round_id}: {type(msg).__name__} not expected in stage {self.stage}")

    def roster(self) -> Roster:
        """Close the advertise stage: the roster (U1) every advertiser receives."""
        self._need("advertise", len(self.keys), "advertised keys")
        r = Roster(self.round_id, self.session, self.threshold, self.length, self.bits,
                   tuple(self.keys[d] for d in sorted(self.keys)), self.noise)
        try:
            check_roster(r, self.max_group)
        except SecAggError as e:
            self.stage = "aborted"
            raise SecAggAborted(str(e)) from None
        self._roster, self.stage = r, "share"
        return r

    def route_shares(self) -> dict[str, SharesFor]:
        """Close the share stage: each device of U2 gets the shares addressed to it."""
        self._need("share", len(self.shares), "shared keys")
        u2 = tuple(sorted(self.shares))
        out = {d: SharesFor(d, u2, tuple(s for sender in u2 if sender != d for s in self.shares[sender].shares
                                         if s.receiver == d)) for d in u2}
        self.stage = "masked"
        return out

    def unmask_request(self) -> UnmaskRequest:
        """Close the masked-input stage: survivors U3 and the devices that dropped after sharing."""
        self._need("masked", len(self.masked), "sent masked inputs")
        self._request = UnmaskRequest(tuple(sorted(self.masked)), tuple(sorted(set(self.shares) - set(self.masked))))
        self.stage = "unmask"
        return self._request

    def result(self) -> np.ndarray:
        """Close the round: ``sum_{u in U3} x_u mod 2^bits`` as (length,) uint; needs ``threshold`` answers."""
        self._need("unmask", len(self.answers), "answered the unmask request")
        assert self._roster is not None and self._request is not None
        xs = {k.device_id: i + 1 for i, k in enumerate(self._roster.keys)}
        keys = {k.device_id: k for k in self._roster.keys}
        dt = np.dtype(f"u{self.bits // 8}")
        total = np.zeros(self.length, dt)
        for y in self.masked.values():
            total = total + y
        for v in self._request.survivors:  # remove the survivors' self masks
            b = shamir_combine({xs[a.device_id]: a.self_mask_shares[v] for a in self.answers.values()},
                               self.threshold, 32)
            total = total - prg(b, self.ctx, self.length, self.bits)
        for v in self._request.dropped:  # remove the pairwise masks survivors shared with dropped devices
            s_sk = shamir_combine({xs[a.device_id]: a.key_shares[v] for a in self.answers.values()},
                                  self.threshold, 32)
            for u in self._request.survivors:
                # u added sign(u, v) PRG(s_uv); v's view of the same mask is its negation
                total = total + pair_mask(v, s_sk, u, keys[u].s_pk, self.ctx, self.length, self.bits)
        self.stage = "done"
        return total.astype(dt)


def to_signed(total: np.ndarray, bits: int = 32) -> np.ndarray:
    """Two's-complement reading of a sum mod 2^bits (exact when the true sum is in the signed range)."""
    t = np.asarray(total).astype(np.uint64)
    half = np.uint64(1 << (bits - 1))
    signed = t.astype(np.int64)
    if bits == 32:
        signed = np.where(t >= half, signed - (1 << 32), signed)
    return signed


def split_sums(total: np.ndarray, bits: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The FedAvg ``(num, den)`` (int64, D each) from the sum of ``device_agent.wire.secagg.encode_input`` vectors."""
    s = to_signed(total, bits)
    d = s.size // 2
    return s[:d], s[d:]


def split_dense_sums(total: np.ndarray, bits: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The FedAvg ``(num, den)`` (int64, D each) from the sum of ``encode_dense_input`` vectors (D + 1)."""
    s = to_signed(total, bits)
    return s[:-1], np.full(s.size - 1, s[-1], np.int64)


__all__ = ["SHARE_BYTES", "SecAggAborted", "SecAggServer", "plan_groups", "split_dense_sums", "split_sums",
           "to_signed"]

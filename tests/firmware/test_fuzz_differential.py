"""Differential decoding: the same bytes to the C readers (firmware/fuzz/decode_cli.c, ASan/UBSan build) and to
device_agent/wire give the same verdict, the same WireError and the same decoded values (fuzz/digest.py).

Inputs: every golden vector (MANIFEST.txt, uart_frames.bin), truncation at every offset and every single-bit
flip of each valid one (both languages must refuse them), every body cut resealed with a right CRC, and a few
hundred seeded random mutations. Ed25519-signed vectors are compared under the Ed25519 policy (and stripped of
their signature under "unsigned only"), with signed-byte edits whose CRC is fixed up so that only the signature
refuses them. Known, documented difference: the board reads model updates v1 only (a v2 blob is
UNSUPPORTED_VERSION in C).
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.wire import Verifier
from device_agent.wire.envelope import FormatId, open_blob, seal
from tests.conftest import ROOT, VECTORS, require_cmd

sys.path.insert(0, str(ROOT / "fuzz"))
from digest import verdict
from targets import reseal

BUILD = ROOT / "build" / "fuzz-fw"  # NOTE: shared and incremental: make rebuilds only what changed
HMAC_KEY = VECTORS / "keys" / "test_hmac.key"
ED25519_PUB = VECTORS / "keys" / "test_ed25519.pub"
POLICY = {"unsigned": Verifier.unsigned(), "hmac": Verifier.hmac_sha256(HMAC_KEY.read_bytes()),
          "ed25519": Verifier.ed25519(Ed25519PublicKey.from_public_bytes(ED25519_PUB.read_bytes()))}
KEY_ARGS = {"unsigned": [], "hmac": ["--hmac", str(HMAC_KEY)], "ed25519": ["--ed25519", str(ED25519_PUB)]}
CHUNK = 4000


@pytest.fixture(scope="module")
def decode_cli() -> Path:
    require_cmd("clang", "make")
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "firmware"), f"BUILD={BUILD}", "decode-cli"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return BUILD / "host" / "decode_cli"


def c_verdicts(cli: Path, fmt: str, policy: str, blobs: list[bytes]) -> list[str]:
    out: list[str] = []
    args = [str(cli), fmt] + KEY_ARGS[policy]
    for i in range(0, len(blobs), CHUNK):
        batch = b"".join(struct.pack("<I", len(b)) + b for b in blobs[i:i + CHUNK])
        r = subprocess.run(args, input=batch, capture_output=True, check=False)
        assert r.returncode == 0, f"decode_cli crashed (exit {r.returncode}):\n{r.stderr.decode()[-3000:]}"
        out += r.stdout.decode().splitlines()
    assert len(out) == len(blobs)
    return out


def compare(cli: Path, fmt: str, policy: str, blobs: list[bytes], *, all_refused: bool = False) -> int:
    """Assert C and Python agree on every blob (and, if asked, that both refuse each one); returns the count."""
    c = c_verdicts(cli, fmt, policy, blobs)
    bad = []
    for blob, cv in zip(blobs, c, strict=True):
        pv = verdict(fmt, blob, POLICY[policy])
        if fmt == "update" and blob[:4] == b"TFUP" and blob[4:6] == b"\2\0" and len(blob) >= 16:
            agree = cv == "err 3"  # the board speaks TFUP v1 only
        else:
            agree = cv == pv
        if not agree or (all_refused and ("ok" in cv or "ok" in pv)):
            bad.append(f"{blob[:24].hex()}… ({len(blob)} bytes): C {cv!r}, Python {pv!r}")
    assert not bad, f"{len(bad)} of {len(blobs)} {fmt} inputs disagree, e.g.:\n" + "\n".join(bad[:8])
    return len(blobs)


def _manifest(fmt: str) -> list[tuple[bytes, str, str]]:
    out = []
    for line in (VECTORS / "MANIFEST.txt").read_text(encoding="utf-8").splitlines():
        f = line.split()
        if len(f) >= 4 and not line.startswith("#") and f[1] == fmt:
            out.append(((VECTORS / f[0]).read_bytes(), f[2], f[3]))
    return out


def unsign(blob: bytes) -> bytes | None:
    """The same body sealed unsigned; None if the envelope itself is bad."""
    fmt = FormatId("blob", blob[:4], int.from_bytes(blob[4:6], "little"), "")
    try:
        return seal(fmt, bytes(open_blob(fmt, blob, Verifier.skip())))
    except ValueError:
        return None


def vectors(fmt: str) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """(every manifest blob, the valid ones) by the policy the C tool can read them with."""
    every: dict[str, list[bytes]] = {"unsigned": [], "hmac": [], "ed25519": []}
    valid: dict[str, list[bytes]] = {"unsigned": [], "hmac": [], "ed25519": []}
    for blob, policy, expect in _manifest(fmt):
        if policy == "ed25519":
            stripped = unsign(blob)
            every["unsigned"] += [blob] + ([stripped] if stripped else [])
            if expect == "ok" and stripped:
                valid["unsigned"].append(stripped)
        every[policy].append(blob)
        if expect == "ok":
            valid[policy].append(blob)
    if fmt == "update":  # the board's update leg is v1: its truncations and flips are the ones to compare
        valid = {k: [b for b in v if b[4:6] == b"\1\0"] for k, v in valid.items()}
    return every, valid


def flips(blob: bytes) -> list[bytes]:
    out = []
    for bit in range(8 * len(blob)):
        b = bytearray(blob)
        b[bit // 8] ^= 1 << (bit % 8)
        out.append(bytes(b))
    return out


def mutations(blob: bytes, n: int, seed: int) -> list[bytes]:
    """Seeded structural mutations of the body (u32 fields set to edge values, bytes changed, inserted,
    deleted), resealed with a right length and CRC so they reach the body checks."""
    rng = random.Random(seed)
    edge = (0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(blob), len(blob) - 16)
    out = []
    for _ in range(n):
        b = bytearray(blob[:-4])
        for _ in range(rng.choice((1, 1, 2, 3))):
            op, at = rng.randrange(4), rng.randrange(16, len(b))
            if op == 0:
                at -= at % 4
                b[at:at + 4] = struct.pack("<I", rng.choice(edge) & 0xFFFFFFFF)
            elif op == 1:
                b[at] = rng.randrange(256)
            elif op == 2:
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8))))
            else:
                del b[at:at + rng.choice((1, 4, 12))]
        sealed = reseal(bytes(b) + b"\0\0\0\0")
        if sealed is not None:
            out.append(sealed)
    return out


@pytest.mark.parametrize("fmt", ["plan", "update"])
def test_golden_vectors_agree(decode_cli, fmt):
    every, _ = vectors(fmt)
    assert all(compare(decode_cli, fmt, policy, blobs) for policy, blobs in every.items())


@pytest.mark.parametrize("fmt", ["plan", "update"])
def test_signed_edits_refused_alike(decode_cli, fmt):
    """Bit flips anywhere before the CRC of the valid Ed25519-signed vectors, CRC fixed up: header fields, body,
    R and S; the signature (or an earlier header check) refuses every one, with the same code in C and Python."""
    _, valid = vectors(fmt)
    rng = random.Random(11)
    blobs = []
    for blob in valid["ed25519"]:
        for bit in sorted(rng.sample(range(8 * (len(blob) - 4)), 96)) + [8 * (len(blob) - 5) + 4]:  # + S >= L
            b = bytearray(blob)
            b[bit // 8] ^= 1 << (bit % 8)
            b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])) & 0xFFFFFFFF)
            blobs.append(bytes(b))
    assert compare(decode_cli, fmt, "ed25519", blobs, all_refused=True) > 96


@pytest.mark.parametrize("fmt", ["plan", "update"])
def test_every_truncation_and_bit_flip_refused_alike(decode_cli, fmt):
    _, valid = vectors(fmt)
    n = 0
    for policy, blobs in valid.items():
        for blob in blobs:
            n += compare(decode_cli, fmt, policy, [blob[:cut] for cut in range(len(blob))], all_refused=True)
            n += compare(decode_cli, fmt, policy, flips(blob), all_refused=True)
    assert n > 1000


@pytest.mark.parametrize("fmt", ["plan", "update"])
def test_resealed_cuts_and_mutations_agree(decode_cli, fmt):
    _, valid = vectors(fmt)
    blobs = []
    for i, blob in enumerate(valid["unsigned"]):
        body_end = len(blob) - 4
        blobs += [reseal(blob[:cut] + b"\0\0\0\0") for cut in range(16, body_end)]
        blobs += mutations(blob, 300, seed=i)
    assert compare(decode_cli, fmt, "unsigned", blobs) > 300


def size_edges(blob: bytes) -> list[bytes]:
    """Every CONST / TRAINABLE tensor of a valid unsigned plan re-shaped to sizes whose byte count passes 2^31 or
    2^32 (numel 2^30, 2^30 + 1, 2^31 - 1 as (n_scales, rest)), each with data_bytes 0xFFFFFFFF, the size mod 2^32
    and the true size: the readers must compare sizes exactly (C once saturated at 0xFFFFFFFF and said BAD_OFFSET
    where Python says BAD_LENGTH); plus arena offsets near 2^31 for the arena tensors. Resealed: right CRC."""
    from device_agent.wire.plan import PLAN_HEADER, TENSOR_REC

    body = bytearray(blob[:-4])
    nt, n_ratios = PLAN_HEADER.unpack_from(body, 16)[0], PLAN_HEADER.unpack_from(body, 16)[8]
    table = 16 + PLAN_HEADER.size + 8 * n_ratios
    out = []
    for i in range(nt):
        at = table + i * TENSOR_REC.size
        kind, dtype, rank, flags, *dims, zp, off, n_scales, s_off, d_off, d_len = TENSOR_REC.unpack_from(body, at)
        width = {1: 1, 2: 2, 3: 4}.get(dtype)
        if kind in (1, 2, 3, 4) or width is None:  # activation-like: offsets near the arena's limits instead
            for o in (0x7FFFFFFF, 0x7FFFFFFF - 3, -2):
                b = bytearray(body)
                TENSOR_REC.pack_into(b, at, kind, dtype, rank, flags, *dims, zp, o, n_scales, s_off, d_off, d_len)
                out.append(reseal(bytes(b) + b"\0\0\0\0"))
            continue
        c = max(1, n_scales)
        for numel in (2**30, 2**30 + 1, 2**31 - 1):
            rest = -(-numel // c)
            nb = c * rest * width
            for dl, do in ((0xFFFFFFFF, d_off), (0xFFFFFFFF, d_off + 4), (nb & 0xFFFFFFFF, d_off),
                           (min(nb, 0xFFFFFFFF) - 1, d_off)):
                b = bytearray(body)
                shape = (c, rest, 0, 0) if c > 1 else (rest, 0, 0, 0)
                TENSOR_REC.pack_into(b, at, kind, dtype, 2 if c > 1 else 1, flags, *shape, zp, off, n_scales, s_off,
                                     do, dl)
                out.append(reseal(bytes(b) + b"\0\0\0\0"))
    return [b for b in out if b is not None]


def test_size_edges_agree(decode_cli):
    """Huge declared tensor sizes: C and Python give the same error code for every one (item: INT32 CONST of
    numel >= 2^30 with data_bytes = 0xFFFFFFFF is BAD_LENGTH in both)."""
    _, valid = vectors("plan")
    blobs = [b for blob in valid["unsigned"] for b in size_edges(blob)]
    assert len(blobs) > 50
    assert compare(decode_cli, "plan", "unsigned", blobs, all_refused=True)
    int32_edge = [b for b in blobs if verdict("plan", b, POLICY["unsigned"]) == "err 4"]
    assert int32_edge, "the corpus must hold the BAD_LENGTH case of a 2^32-byte tensor"


def test_misaligned_arena_offsets_refused_alike(decode_cli):
    """Every arena tensor of the valid unsigned plans moved 1, 2 or 3 bytes: refused alike, BAD_OFFSET (fuzz_plan
    found an EMBEDDING reading its int32 ids at arena offset 1; offsets are multiples of ARENA_ALIGN), while the
    same plans moved by 4 bytes (inside the arena) stay valid in both."""
    from device_agent.wire.errors import WireError
    from device_agent.wire.plan import ARENA_ALIGN, PLAN_HEADER, TENSOR_REC

    _, valid = vectors("plan")
    moved, aligned = [], []
    for blob in valid["unsigned"]:
        body = bytearray(blob[:-4])
        nt, n_ratios = (PLAN_HEADER.unpack_from(body, 16)[k] for k in (0, 8))
        table = 16 + PLAN_HEADER.size + 8 * n_ratios
        for i in range(nt):
            at = table + i * TENSOR_REC.size
            rec = list(TENSOR_REC.unpack_from(body, at))
            if rec[9] < 0:
                continue
            for delta in (1, 2, 3, -ARENA_ALIGN):
                if rec[9] + delta < 0:
                    continue
                b = bytearray(body)
                TENSOR_REC.pack_into(b, at, *rec[:9], rec[9] + delta, *rec[10:])
                (aligned if delta % ARENA_ALIGN == 0 else moved).append(reseal(bytes(b) + b"\0\0\0\0"))
    assert len(moved) > 30 and aligned
    assert compare(decode_cli, "plan", "unsigned", moved, all_refused=True)
    assert compare(decode_cli, "plan", "unsigned", aligned)
    codes = {verdict("plan", b, POLICY["unsigned"]) for b in moved}  # past the arena's end: OUT_OF_ARENA first
    assert codes == {f"err {int(WireError.BAD_OFFSET)}", f"err {int(WireError.OUT_OF_ARENA)}"}
    assert any(verdict("plan", b, POLICY["unsigned"]).startswith("ok") for b in aligned)


def _frames() -> list[bytes]:
    return [f for f in (VECTORS / "uart_frames.bin").read_bytes().split(b"\0") if f]


def test_uart_frames_agree(decode_cli):
    stream = (VECTORS / "uart_frames.bin").read_bytes()
    frames = _frames()
    # valid COBS of 518 raw bytes in 521 encoded ones: FRAME_TOO_LONG in both (C once said BAD_COBS)
    oversize = [b"\xff" + bytes(range(1, 255)) + b"\xff" + b"\7" * 254 + b"\x0b" + b"\1" * 10]
    assert compare(decode_cli, "frames", "unsigned", [stream] + frames + oversize)


def test_every_frame_truncation_and_bit_flip_refused_alike(decode_cli):
    good = [f for f in _frames() if verdict("frames", f, POLICY["unsigned"]).startswith("ok:")]
    blobs = []
    for f in good:
        blobs += [f[:cut] for cut in range(1, len(f))] + flips(f)
    assert compare(decode_cli, "frames", "unsigned", blobs, all_refused=True) > 1000


def test_frame_mutations_agree(decode_cli):
    rng = random.Random(7)
    good = [f for f in _frames() if verdict("frames", f, POLICY["unsigned"]).startswith("ok:")]
    blobs = []
    for _ in range(400):
        b = bytearray(rng.choice(good))
        for _ in range(rng.choice((1, 2, 4))):
            at = rng.randrange(len(b))
            if rng.random() < 0.5:
                b[at] = rng.randrange(256)
            else:
                b[at:at] = bytes(rng.randrange(1, 256) for _ in range(rng.choice((1, 3, 300))))
        blobs.append(bytes(b))
    assert compare(decode_cli, "frames", "unsigned", blobs)

"""Signed downlink blobs on the emulated boards: a board provisioned with the fleet's Ed25519 public key in its
key slot (docs/formats.md "Key slot") loads a plan signed with that key and trains it bit-exactly, and refuses a
tampered plan (BAD_SIGNATURE), an unsigned one (UNSIGNED), an HMAC-signed one (SIG_ALG_MISMATCH) and one signed by
another key (BAD_SIGNATURE), keeping its last good plan. HMAC provisioning works the same way; a damaged key slot
refuses everything."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.board import BoardClient, BoardError, QemuBoard, key_slot_preload
from device_agent.wire import frames
from device_agent.wire.envelope import SigAlg, Signer, Verifier, open_blob, seal
from device_agent.wire.errors import WireError
from device_agent.wire.keyslot import key_slot_to_bytes
from device_agent.wire.plan import PLAN
from tests.firmware.conftest import PLAN_VECTORS, PlanVector

FLEET = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
HMAC_KEY = b"tinyfleet device key 0001"


def _pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _resign(blob: bytes, signer: Signer | None) -> bytes:
    return seal(PLAN, bytes(open_blob(PLAN, blob, Verifier.unsigned())), signer)


def _tamper(blob: bytes, at: int, mask: int = 0x01) -> bytes:
    """One byte changed and the CRC fixed up: only the signature can tell."""
    b = bytearray(blob)
    b[at] ^= mask
    b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])) & 0xFFFFFFFF)
    return bytes(b)


def _refusal(c: BoardClient, blob: bytes) -> int:
    with pytest.raises(BoardError) as e:
        c.load_plan(blob)
    assert e.value.status == frames.Status.ERR_FORMAT
    return int(str(e.value).split("'wire_error': ")[1].split(",")[0])


@pytest.mark.parametrize("machine", ["mps2-an500", "mps2-an386"])
def test_ed25519_provisioned_board(board_elfs, tmp_path: Path, machine: str) -> None:
    # Prepare
    v = PlanVector.read(PLAN_VECTORS / "imu.tfv")
    elf = board_elfs[machine]
    signed = _resign(v.plan, Signer.ed25519(FLEET))
    slot = key_slot_preload(elf, key_slot_to_bytes(SigAlg.ED25519, _pub(FLEET)), tmp_path / "slot.bin")
    nb, n = len(v.samples[0]), len(v.samples)
    # Execute
    with QemuBoard(machine, elf=elf, preload=[slot]) as board, BoardClient(board.endpoint) as c:
        held = c.load_plan(signed)
        codes = [_refusal(c, _tamper(signed, 16 + 40)),  # plan header
                 _refusal(c, _tamper(signed, len(signed) - 64 - 4 - 1)),  # last body byte
                 _refusal(c, _tamper(signed, len(signed) - 64 - 4)),  # signature R
                 _refusal(c, _tamper(signed, len(signed) - 4 - 1, 0x10)),  # S + 2^252 >= L: not canonical
                 _refusal(c, _resign(v.plan, Signer.ed25519(Ed25519PrivateKey.from_private_bytes(b"\1" * 32)))),
                 _refusal(c, v.plan),
                 _refusal(c, _resign(v.plan, Signer.hmac_sha256(HMAC_KEY)))]
        still = c.stats()["plan_bytes"]
        c.store_samples(0, [(s, int(y)) for s, y in zip(v.samples, v.labels)], nb)
        c.train_list([s % n for s in range(v.steps)], v.lr_m, v.lr_e)
        state = c.state()
        info = c.board_info()
    # Assert
    assert held == len(signed) and still == len(signed)
    assert codes == [WireError.BAD_SIGNATURE] * 5 + [WireError.UNSIGNED, WireError.SIG_ALG_MISMATCH]
    assert state["state_hash"] == v.state_hash
    assert info["stack_high_water"] < info["stack_size"] - 2048, info  # verify's ~1.4 KB leaves room


def test_hmac_provisioned_and_damaged_key_slots(board_elfs, tmp_path: Path) -> None:
    # Prepare
    v = PlanVector.read(PLAN_VECTORS / "tiny.tfv")
    elf = board_elfs["mps2-an500"]
    hmac_signed = _resign(v.plan, Signer.hmac_sha256(HMAC_KEY))
    ed_signed = _resign(v.plan, Signer.ed25519(FLEET))
    rec = bytearray(key_slot_to_bytes(SigAlg.ED25519, _pub(FLEET)))
    rec[20] ^= 1  # a flipped key bit: CRC mismatch
    hmac_slot = key_slot_preload(elf, key_slot_to_bytes(SigAlg.HMAC_SHA256, HMAC_KEY), tmp_path / "hmac.bin")
    bad_slot = key_slot_preload(elf, bytes(rec), tmp_path / "bad.bin")
    # Execute
    with QemuBoard("mps2-an500", elf=elf, preload=[hmac_slot]) as board, BoardClient(board.endpoint) as c:
        hmac_held = c.load_plan(hmac_signed)
        hmac_codes = [_refusal(c, _tamper(hmac_signed, 16 + 40)), _refusal(c, ed_signed)]
    with QemuBoard("mps2-an500", elf=elf, preload=[bad_slot]) as board, BoardClient(board.endpoint) as c:
        bad_codes = [_refusal(c, ed_signed), _refusal(c, v.plan), _refusal(c, hmac_signed)]
    # Assert
    assert hmac_held == len(hmac_signed)
    assert hmac_codes == [WireError.BAD_SIGNATURE, WireError.SIG_ALG_MISMATCH]
    assert bad_codes == [WireError.BAD_SIGNATURE, WireError.UNSIGNED, WireError.SIG_ALG_MISMATCH]

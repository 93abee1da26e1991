"""Golden wire vectors: committed files equal a fresh generation; every reader verdict matches MANIFEST.txt;
truncation at every offset and every single-bit flip of each valid blob is refused with a WireError."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from device_agent.wire import ModelUpdate, WireError, WireFormatError, delta_from_bytes, plan_from_bytes
from device_agent.wire import frames as F
from device_agent.wire.delta import read_records
from device_agent.wire.envelope import Cursor

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def _load_generate():
    spec = importlib.util.spec_from_file_location("wire_vectors_generate", VECTORS / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generate()
VERIFY = gen.verifiers()


def _records(data: bytes, verify=None, version: int = 2):
    c = Cursor(memoryview(data), "records", base=0)
    out = read_records(c, version)
    c.end()
    return out


READERS = {
    "plan": lambda d, v: plan_from_bytes(d, verify=v),
    "update": lambda d, v: ModelUpdate.from_bytes(d, verify=v),
    "delta": lambda d, v: delta_from_bytes(d, verify=v),
    "records": lambda d, v: _records(d),
    "records_v1": lambda d, v: _records(d, version=1),
}


def _manifest() -> list[list[str]]:
    lines = (VECTORS / "MANIFEST.txt").read_text(encoding="utf-8").splitlines()
    return [ln.split() for ln in lines if ln and not ln.startswith("#") and not ln.startswith("frame ")]


def test_committed_vectors_equal_a_fresh_generation(tmp_path):
    # Prepare / Execute
    written = gen.write(tmp_path)
    # Assert
    for p in written:
        rel = p.relative_to(tmp_path)
        committed = VECTORS / rel
        assert committed.exists(), f"{rel} missing: run python tests/vectors/generate.py"
        assert committed.read_bytes() == p.read_bytes(), f"{rel} differs: run python tests/vectors/generate.py"
    assert gen.STAMP in (VECTORS / "MANIFEST.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("row", _manifest(), ids=lambda r: r[0])
def test_manifest_verdict(row):
    name, fmt, verify, expect = row[:4]
    data = (VECTORS / name).read_bytes()
    if expect == "ok":
        READERS[fmt](data, VERIFY.get(verify))
        return
    with pytest.raises(WireFormatError) as e:
        READERS[fmt](data, VERIFY.get(verify))
    assert e.value.code == WireError[expect], str(e.value)


VALID = [r for r in _manifest() if r[3] == "ok" and not r[1].startswith("records")]


@pytest.mark.parametrize("row", VALID, ids=lambda r: r[0])
def test_every_truncation_is_refused_as_truncated(row):
    name, fmt, verify = row[:3]
    data = (VECTORS / name).read_bytes()
    read = READERS[fmt]
    for n in range(len(data)):
        with pytest.raises(WireFormatError) as e:
            read(data[:n], VERIFY[verify])
        assert e.value.code == WireError.TRUNCATED, (n, str(e.value))


@pytest.mark.parametrize("row", VALID, ids=lambda r: r[0])
def test_every_bit_flip_is_refused(row):
    name, fmt, verify = row[:3]
    data = bytearray((VECTORS / name).read_bytes())
    read = READERS[fmt]
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            try:
                read(bytes(data), VERIFY[verify])
            except WireFormatError:
                pass
            else:
                raise AssertionError(f"bit {bit} of byte {i} flipped and the blob was accepted")
            data[i] ^= 1 << bit


@pytest.mark.parametrize("name,version", [("delta_topk.records", 2), ("v1/delta_topk.records", 1)])
def test_records_truncations_and_flips_never_crash(name, version):
    data = bytearray((VECTORS / name).read_bytes())
    for n in range(len(data)):
        with pytest.raises(WireFormatError):
            _records(bytes(data[:n]), version=version)
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            try:
                _records(bytes(data), version=version)  # no CRC here: some flips are valid, none may crash
            except WireFormatError:
                pass
            data[i] ^= 1 << bit


def test_v1_golden_files_are_v1_and_v2_files_are_v2():
    for row in _manifest():
        if row[1] in ("update", "delta") and row[3] == "ok":
            version = int.from_bytes((VECTORS / row[0]).read_bytes()[4:6], "little")
            assert version == (1 if row[0].startswith("v1/") else 2), row[0]


def test_uart_stream_verdicts():
    # Prepare
    want = [ln.split()[1:3] for ln in (VECTORS / "MANIFEST.txt").read_text(encoding="utf-8").splitlines()
            if ln.startswith("frame ")]
    # Execute
    got = F.Deframer().feed((VECTORS / "uart_frames.bin").read_bytes())
    # Assert
    assert len(got) == len(want)
    for (name, expect), item in zip(want, got):
        if expect == "ok":
            assert isinstance(item, F.Frame), (name, item)
        else:
            assert isinstance(item, WireFormatError) and item.code == WireError[expect], (name, item)

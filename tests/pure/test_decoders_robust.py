"""Robustness of every Python decoder (plan, model update, delta, UART frames, envelope): on any bytes a reader
either returns or raises WireFormatError with a WireError code, never anything else, never hangs; what it accepts
round-trips byte for byte. Seeded mutations in-process, then short atheris runs of fuzz/fuzz_*.py (coverage-guided,
bounded by runs and seconds). Long campaigns: `make fuzz` (docs/formats.md "Robustness").
"""

from __future__ import annotations

import importlib.util
import random
import struct
import subprocess
import sys

import pytest

from device_agent.wire import ModelUpdate, Verifier, WireError, WireFormatError
from device_agent.wire import frames as F
from device_agent.wire.envelope import Builder, seal
from device_agent.wire.update import MAX_UPDATE_VALUES, UPDATE
from tests.conftest import ROOT, require

sys.path.insert(0, str(ROOT / "fuzz"))
import corpus
from targets import TARGETS, reseal

ATHERIS_RUNS, ATHERIS_SECONDS = 3000, 4
SEEDS = corpus.seeds()


def mutate(rng: random.Random, blob: bytes) -> bytes:
    """1-3 edits: a u32 set to an edge value, a byte changed, bytes inserted or deleted, a cut."""
    b = bytearray(blob)
    edge = (0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(blob))
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not b:
            break
        op, at = rng.randrange(5), rng.randrange(len(b))
        if op == 0:
            b[at:at + 4] = struct.pack("<I", rng.choice(edge))
        elif op == 1:
            b[at] = rng.randrange(256)
        elif op == 2:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 9))))
        elif op == 3:
            del b[at:at + rng.choice((1, 4, 16))]
        else:
            del b[at:]
    return bytes(b)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeded_mutations_raise_only_wire_errors(target):
    # Prepare
    rng = random.Random(target)
    seeds = SEEDS[target]
    inputs = []
    for _ in range(400):
        m = mutate(rng, rng.choice(seeds))
        inputs.append(reseal(m) or m if target != "frames" and rng.random() < 0.7 else m)
    # Execute / Assert: the target re-raises anything that is not a WireFormatError, and checks round trips
    for data in inputs:
        TARGETS[target](data)


def test_filled_update_cannot_ask_for_gigabytes():
    # Prepare: one FILLED_GAPS record naming numel 2**31 - 1 with a single listed value (130 bytes on the wire)
    b = Builder()
    b.pack("IIB3x32s32sI", 0, 1, 1, bytes(32), bytes(32), 1)
    b.pack("HBBII", 0, 5, 1, 2**31 - 1, 1)
    b.buf += b"\x05\0\0\0\x03\0\0\0"
    blob = seal(UPDATE, bytes(b.buf))
    # Execute
    with pytest.raises(WireFormatError) as e:
        ModelUpdate.from_bytes(blob, verify=Verifier.unsigned())
    # Assert
    assert e.value.code == WireError.SIZE_OVERFLOW and str(MAX_UPDATE_VALUES) in str(e.value)


def test_valid_cobs_above_the_raw_limit_is_frame_too_long():
    # 518 raw bytes in 521 encoded ones: the encoded size passes, the decoded one does not
    encoded = b"\xff" + bytes(range(1, 255)) + b"\xff" + b"\7" * 254 + b"\x0b" + b"\1" * 10
    assert len(encoded) == F.MAX_ENCODED and len(F.cobs_decode(encoded)) == F.MAX_RAW + 1
    with pytest.raises(WireFormatError) as e:
        F.decode_frame(encoded)
    assert e.value.code == WireError.FRAME_TOO_LONG


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_atheris_short_run(tmp_path, target):
    require(importlib.util.find_spec("atheris") is not None, "atheris not installed (run `make setup`)")
    # Prepare
    seeds = corpus.write(tmp_path / "seeds")[target]
    work = tmp_path / "corpus"
    work.mkdir()
    # Execute
    r = subprocess.run([sys.executable, str(ROOT / "fuzz" / f"fuzz_{target}.py"), f"-runs={ATHERIS_RUNS}",
                        f"-max_total_time={ATHERIS_SECONDS}", "-timeout=10", "-max_len=4200",
                        f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(work), str(seeds)],
                       capture_output=True, text=True, check=False, timeout=ATHERIS_SECONDS + 90)
    # Assert
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert r.returncode == 0 and not artifacts, f"fuzz_{target}.py found a bug {artifacts}:\n{r.stderr[-4000:]}"
    runs = [ln for ln in r.stderr.splitlines() if ln.startswith("stat::number_of_executed_units:")]
    assert runs and int(runs[0].split(":")[-1]) > 50, r.stderr[-2000:]

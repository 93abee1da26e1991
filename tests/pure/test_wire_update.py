"""Model update: round trip, signatures, application to a plan's trainable state, plan mismatches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from device_agent.wire import (
    ModelUpdate,
    Signer,
    Verifier,
    WireError,
    WireFormatError,
    apply_update,
    plan_hash,
    trainable_state,
    update_from_state,
    update_hash,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
_spec = importlib.util.spec_from_file_location("wire_vectors_generate", VECTORS / "generate.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
KEY = b"device-key-0042-0123456789abcdef"


def test_round_trip_and_apply():
    # Prepare
    plan = gen.golden_plan()
    new = gen.new_state(plan)
    # Execute
    u = update_from_state(plan, new, base_version=3, new_version=4)
    blob = u.to_bytes(Signer.hmac_sha256(KEY))
    back = ModelUpdate.from_bytes(blob, verify=Verifier.hmac_sha256(KEY))
    state = apply_update(back, plan)
    # Assert
    assert (back.base_version, back.new_version, back.plan_hash) == (3, 4, plan_hash(plan))
    assert sorted(back.tensors) == [2, 3]  # fc.b (8) is personal: never in an update
    assert np.array_equal(state[2], new[2]) and np.array_equal(state[3], new[3])
    assert np.array_equal(state[8], plan.tensors[8].data)  # personal value kept
    assert back.to_bytes(Signer.hmac_sha256(KEY)) == blob
    assert len(update_hash(blob)) == 32 and update_hash(blob) == update_hash(u.to_bytes())


def test_apply_is_pure():
    plan = gen.golden_plan()
    before = trainable_state(plan)
    state = dict(before)
    apply_update(update_from_state(plan, gen.new_state(plan), base_version=0, new_version=1), plan, state)
    assert all(np.array_equal(plan.tensors[k].data, v) for k, v in before.items())
    assert all(state[k] is before[k] for k in before)


def test_unsigned_update_refused_by_a_keyed_reader():
    plan = gen.golden_plan()
    blob = update_from_state(plan, gen.new_state(plan), base_version=0, new_version=1).to_bytes()
    with pytest.raises(WireFormatError) as e:
        ModelUpdate.from_bytes(blob, verify=Verifier.hmac_sha256(KEY))
    assert e.value.code == WireError.UNSIGNED


@pytest.mark.parametrize("edit", ["other_plan", "personal", "frozen", "dtype", "size"])
def test_plan_mismatch(edit):
    plan = gen.golden_plan()
    u = update_from_state(plan, gen.new_state(plan), base_version=0, new_version=1)
    if edit == "other_plan":
        u.plan_hash = bytes(32)
    elif edit == "personal":
        u.tensors[8] = np.zeros(4, np.int32)
    elif edit == "frozen":
        u.tensors[7] = np.zeros(12, np.int8)
    elif edit == "dtype":
        u.tensors[2] = u.tensors[2].astype(np.int16)
    else:
        u.tensors[3] = np.zeros(2, np.int32)
    with pytest.raises(WireFormatError) as e:
        apply_update(u, plan)
    assert e.value.code == WireError.PLAN_MISMATCH


def test_writer_refuses_bad_versions():
    with pytest.raises(ValueError):
        ModelUpdate(5, 5, bytes(32), {}).to_bytes()

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
    update_from_states,
    update_hash,
)
from device_agent.wire.update import Form, model_hash

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
    assert update_hash(blob) == back.model_hash == model_hash(plan, state, 4)


def test_diff_carries_only_changes_and_names_the_same_version_as_full():
    # Prepare
    plan = gen.golden_plan()
    old, new = trainable_state(plan), gen.new_state(plan)
    new[3] = old[3].copy()  # conv.b unchanged: left out of the diff
    # Execute
    diff = update_from_states(plan, old, new, base_version=3, new_version=4)
    blob = diff.to_bytes(Signer.hmac_sha256(KEY))
    back = ModelUpdate.from_bytes(blob, verify=Verifier.hmac_sha256(KEY))
    state = apply_update(back, plan, old)
    full = update_from_state(plan, new, base_version=3, new_version=4).to_bytes()
    # Assert
    assert back.form == Form.DIFF and sorted(back.tensors) == [2]
    assert np.array_equal(state[2], new[2]) and np.array_equal(state[3], old[3])
    assert update_hash(blob) == update_hash(full)  # one version, one identity, whichever form carried it
    assert back.to_bytes(Signer.hmac_sha256(KEY)) == blob


def test_diff_on_another_base_is_refused():
    plan = gen.golden_plan()
    old, new = trainable_state(plan), gen.new_state(plan)
    other = {k: v.copy() for k, v in old.items()}
    other[2].reshape(-1)[0] += 1  # conv.w[0] is 3 in the golden plan: one weight off
    back = ModelUpdate.from_bytes(update_from_states(plan, old, new, base_version=1, new_version=2).to_bytes(),
                                  verify=Verifier.unsigned())
    with pytest.raises(WireFormatError) as e:
        apply_update(back, plan, other)
    assert e.value.code == WireError.HASH_MISMATCH


def test_int32_diff_wraps():
    plan = gen.golden_plan()
    old, new = trainable_state(plan), trainable_state(plan)
    old[3] = np.array([2**31 - 1, -2**31, 0], np.int32)
    new[3] = np.array([-2**31, 2**31 - 1, 5], np.int32)
    u = ModelUpdate.from_bytes(update_from_states(plan, old, new, base_version=1, new_version=2).to_bytes(),
                               verify=Verifier.unsigned())
    assert u.tensors[3].tolist() == [1, -1, 5]
    assert np.array_equal(apply_update(u, plan, old)[3], new[3])


def test_v1_update_still_read_and_applied():
    plan = gen.golden_plan()
    new = gen.new_state(plan)
    blob = update_from_state(plan, new, base_version=0, new_version=1).to_bytes(version=1)
    back = ModelUpdate.from_bytes(blob, verify=Verifier.unsigned())
    assert back.version == 1 and blob[4:6] == b"\x01\x00"
    assert np.array_equal(apply_update(back, plan)[2], new[2])
    assert update_hash(blob) == back.model_hash  # v1 identity: the content hash, as before


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

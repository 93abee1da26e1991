"""Plan blob: exact round trips (byte-identical re-encoding), hashing, signatures before parsing, writer refusals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.engine import ir
from device_agent.wire import (
    Signer,
    Verifier,
    WireError,
    WireFormatError,
    plan_from_bytes,
    plan_hash,
    plan_to_bytes,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
_spec = importlib.util.spec_from_file_location("wire_vectors_generate", VECTORS / "generate.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def _plans() -> list[ir.Plan]:
    plans = [gen.golden_plan()]
    try:
        from tests.fixtures.tiny import tiny_plan
    except ImportError:  # the engine examples are optional for this test
        return plans
    return plans + [tiny_plan(seed=1), tiny_plan(seed=2, ratio=0.0), tiny_plan(ratio=1.0, n_classes=3)]


def _assert_same(a: ir.Plan, b: ir.Plan) -> None:
    assert (a.name, a.input_id, a.label_id, a.logits_id, a.arena_bytes) == \
        (b.name, b.input_id, b.label_id, b.logits_id, b.arena_bytes)
    assert a.scheme == b.scheme
    assert len(a.tensors) == len(b.tensors) and len(a.ops) == len(b.ops)
    for x, y in zip(a.tensors, b.tensors):
        assert (x.id, x.name, tuple(x.shape), x.dtype, x.kind, x.zero_point, x.offset, x.personal) == \
            (y.id, y.name, tuple(y.shape), y.dtype, y.kind, y.zero_point, y.offset, y.personal)
        assert np.array_equal(np.asarray(x.scale, np.float32).reshape(-1), y.scale)
        assert (x.data is None) == (y.data is None)
        if x.data is not None:
            assert y.data.dtype == np.dtype(ir.DTYPE_NUMPY[x.dtype])
            assert np.array_equal(np.asarray(x.data).reshape(-1), y.data.reshape(-1))
    for p, q in zip(a.ops, b.ops):
        assert (p.type, p.inputs, p.outputs, p.name) == (q.type, q.inputs, q.outputs, q.name)
        for k, v in p.attrs.items():
            assert np.array_equal(np.asarray(v), np.asarray(q.attrs[k])), k


@pytest.mark.parametrize("i", range(len(_plans())))
def test_round_trip_is_exact_and_canonical(i):
    plan = _plans()[i]
    blob = plan_to_bytes(plan)
    back = plan_from_bytes(blob, verify=Verifier.unsigned())
    _assert_same(plan, back)
    assert plan_to_bytes(back) == blob
    assert len(blob) % 4 == 0


def test_data_sections_are_aligned_for_in_place_use():
    import struct

    blob = plan_to_bytes(gen.golden_plan())
    o = gen.plan_offsets(blob)
    for i in range(13):
        _, _, _, _, *_rest = struct.unpack_from("<BBBB4IiiIIII", blob, o["tensors"] + 44 * i)
        scales_off, data_off = _rest[-3], _rest[-2]
        assert scales_off % 4 == 0 and data_off % 4 == 0


def test_hash_ignores_signature_and_changes_with_content():
    plan = gen.golden_plan()
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    unsigned, signed = plan_to_bytes(plan), plan_to_bytes(plan, Signer.ed25519(key))
    assert plan_hash(unsigned) == plan_hash(signed) == plan_hash(plan)
    plan.tensors[2].data[0, 0, 0, 0] += 1
    assert plan_hash(plan) != plan_hash(unsigned)


def test_signed_plan_needs_the_right_key():
    plan = gen.golden_plan()
    k1 = Ed25519PrivateKey.from_private_bytes(bytes(32))
    k2 = Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)
    blob = plan_to_bytes(plan, Signer.ed25519(k1))
    plan_from_bytes(blob, verify=Verifier.ed25519(k1.public_key()))
    with pytest.raises(WireFormatError) as e:
        plan_from_bytes(blob, verify=Verifier.ed25519(k2.public_key()))
    assert e.value.code == WireError.BAD_SIGNATURE
    hm = plan_to_bytes(plan, Signer.hmac_sha256(b"k" * 32))
    with pytest.raises(WireFormatError) as e:
        plan_from_bytes(hm, verify=Verifier.hmac_sha256(b"x" * 32))
    assert e.value.code == WireError.BAD_SIGNATURE


def test_signature_is_checked_before_the_body():
    # Prepare: a body the parser would refuse (n_tensors = 2**32 - 1), CRC recomputed, signature stale
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    blob = gen.patch(plan_to_bytes(gen.golden_plan(), Signer.ed25519(key)), 16, "I", 0xFFFFFFFF)
    # Execute / Assert
    with pytest.raises(WireFormatError) as e:
        plan_from_bytes(blob, verify=Verifier.ed25519(key.public_key()))
    assert e.value.code == WireError.BAD_SIGNATURE
    with pytest.raises(WireFormatError) as e:
        plan_from_bytes(blob, verify=Verifier.skip())
    assert e.value.code == WireError.SIZE_OVERFLOW


def test_version_message_says_what_to_do():
    blob = gen.patch(plan_to_bytes(gen.golden_plan()), 4, "H", 4)
    with pytest.raises(WireFormatError, match=r"plan v3 expected, got v4: recompile with `tinyfleet compile`"):
        plan_from_bytes(blob, verify=Verifier.unsigned())


def test_reader_needs_an_explicit_policy():
    with pytest.raises(TypeError):
        plan_from_bytes(plan_to_bytes(gen.golden_plan()), verify=None)


@pytest.mark.parametrize("mutate, match", [
    (lambda p: setattr(p.tensors[2], "scale", np.array([0.1, float("nan"), 0.1], np.float32)), "BAD_SCALE"),
    (lambda p: setattr(p.tensors[2], "data", None), "without data"),
    (lambda p: setattr(p.tensors[4], "offset", 50), "OUT_OF_ARENA"),
    (lambda p: setattr(p.tensors[3], "id", 7), "id 7"),
    (lambda p: p.ops[0].inputs.append(1), "BAD_VALUE"),
    (lambda p: setattr(p.ops[1], "inputs", [99]), "BAD_INDEX"),
    (lambda p: p.scheme.weight_ratio.update({3: 0.3}), "multiple of 1/8"),
    (lambda p: setattr(p.tensors[3], "data", np.array([1, 2, 2**40])), "do not fit"),
])
def test_writer_refuses_what_the_reader_would(mutate, match):
    plan = gen.golden_plan()
    mutate(plan)
    with pytest.raises(ValueError, match=match):
        plan_to_bytes(plan)


def test_recipe_plan_round_trips_and_v1_is_refused():
    # Prepare: the golden plan with a recipe (plan v2 RECIPE section)
    from device_agent.engine.recipe import RecipePlan, plan_recipe

    rp = gen.golden_recipe_plan()
    # Execute
    blob = plan_to_bytes(rp)
    back = plan_from_bytes(blob, verify=Verifier.unsigned())
    plain = plan_from_bytes(plan_to_bytes(gen.golden_plan()), verify=Verifier.unsigned())
    v1 = gen.patch(blob, 4, "H", 1)
    # Assert: same recipe and slots, byte-identical re-encoding; no section -> a plain ir.Plan; v1 refused
    assert isinstance(back, RecipePlan) and back.recipe == rp.recipe and plan_to_bytes(back) == blob
    assert [(s.op_index, s.wbuf_off, s.bbuf_off, s.frac_off) for s in back.recipe.slots] == \
        [(4, -1, 0, -1), (8, 16, 40, 52)] and back.recipe.optimizer_bytes == 64
    assert type(plain) is ir.Plan and plan_recipe(plain) is None
    assert plan_hash(blob) != plan_hash(gen.golden_plan())
    with pytest.raises(WireFormatError, match=r"plan v3 expected, got v1: recompile") as e:
        plan_from_bytes(v1, verify=Verifier.unsigned())
    assert e.value.code == WireError.UNSUPPORTED_VERSION

"""Secure aggregation in memory: exact sums under dropouts, aborts below threshold, masked inputs look random."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.secagg import SecAggDevice
from device_agent.wire.secagg import (
    PRIME,
    Roster,
    SecAggError,
    SharesFor,
    UnmaskRequest,
    encode_input,
    shamir_combine,
    shamir_split,
)
from fleet import aggregate as agg
from fleet.security.secagg import SecAggAborted, SecAggServer, plan_groups, split_sums, to_signed
from tests.fixtures.tiny import tiny_plan

PLAN = tiny_plan()
SHARED = [t for t in PLAN.trainable if not t.personal]
D = sum(t.numel for t in SHARED)  # the plan's fixed support (700 coordinates)
SESSION = b"fleet=test plan=" + bytes(32)


def sparse_deltas(n: int, seed: int = 0):
    """Integer deltas on the tiny plan's support: int8-range weights, int32 biases, dense or top-k masks."""
    rng = np.random.default_rng(seed)
    is_bias = np.concatenate([np.full(t.numel, t.dtype.name == "INT32") for t in SHARED])
    values = np.where(is_bias, rng.integers(-5000, 5001, (n, D)), rng.integers(-254, 255, (n, D)))
    masks = np.ones((n, D), bool)
    masks[::2] = rng.random((len(masks[::2]), D)) < 0.3  # every other device sends top-k
    values = np.where(masks, values, 0)
    weights = rng.integers(1, 65, n)
    return values.astype(np.int64), masks, weights.astype(np.int64)


def run(n=10, threshold=6, drop_before_mask=(), drop_before_unmask=(), seed=0):
    """The whole flow for ``n`` devices; returns (server, devices, inputs) or raises what the server raises."""
    values, masks, weights = sparse_deltas(n, seed)
    ids = [f"d{i:02d}" for i in range(n)]
    inputs = {d: encode_input(values[i], masks[i], int(weights[i]), n) for i, d in enumerate(ids)}
    devs = {d: SecAggDevice(d) for d in ids}
    srv = SecAggServer(round_id=7, session=SESSION, threshold=threshold, length=2 * D)
    for d in ids:
        srv.receive(devs[d].advertise())
    roster = srv.roster()
    for d in ids:
        srv.receive(devs[d].share_keys(roster))
    routed = srv.route_shares()
    for d in ids:
        if d not in drop_before_mask:
            srv.receive(devs[d].masked_input(routed[d], inputs[d]))
    req = srv.unmask_request()
    for d in req.survivors:
        if d not in drop_before_unmask:
            srv.receive(devs[d].unmask(req))
    return srv, srv.result(), (ids, values, masks, weights, inputs)


@pytest.mark.parametrize("case", ["none", "3 drop before masking", "3 drop after masking", "both"])
def test_unmasked_sum_is_exact_and_equals_fleet_aggregate_sums(case):
    before = {"3 drop before masking": ("d01", "d04", "d08"), "both": ("d02",)}.get(case, ())
    after = {"3 drop after masking": ("d00", "d05", "d09"), "both": ("d03", "d07")}.get(case, ())

    _srv, total, (ids, values, masks, weights, inputs) = run(drop_before_mask=before, drop_before_unmask=after)

    counted = [i for i, d in enumerate(ids) if d not in before]  # masked inputs received: they all count
    exact = sum(inputs[ids[i]] for i in counted)
    assert total.dtype == np.uint32
    assert np.array_equal(total, (exact % 2**32).astype(np.uint32))
    num, den = split_sums(total)
    want_num, want_den = agg.weighted_sums(values[counted], masks[counted], weights[counted])
    assert np.array_equal(num, want_num) and np.array_equal(den, want_den)
    m = agg.mean_from_sums(num, den)
    ref = agg.fedavg(values[counted], masks[counted], weights[counted])
    assert np.array_equal(agg.to_int_delta(m), agg.to_int_delta(ref))


def test_below_threshold_aborts_with_clear_error():
    with pytest.raises(SecAggAborted, match=r"only 5 devices sent masked inputs, threshold 6"):
        run(drop_before_mask=("d00", "d01", "d02", "d03", "d04"))
    with pytest.raises(SecAggAborted, match=r"only 5 devices answered the unmask request, threshold 6"):
        run(drop_before_unmask=("d00", "d01", "d02", "d03", "d04"))
    srv = SecAggServer(1, SESSION, threshold=3, length=4)
    srv.receive(SecAggDevice("a").advertise())
    with pytest.raises(SecAggAborted, match="only 1 devices advertised keys"):
        srv.roster()


def test_masked_input_looks_uniform_and_unrelated_to_the_input():
    values, masks, weights = sparse_deltas(10)
    devs = {f"d{i}": SecAggDevice(f"d{i}") for i in range(10)}
    srv = SecAggServer(3, SESSION, threshold=6, length=2 * D)
    for d in devs.values():
        srv.receive(d.advertise())
    roster = srv.roster()
    for d in devs.values():
        srv.receive(d.share_keys(roster))
    routed = srv.route_shares()
    x = encode_input(values[0], masks[0], int(weights[0]), 10)  # a top-k device: ~70% zeros in the first half
    y = devs["d0"].masked_input(routed["d0"], x)

    assert (x == 0).mean() > 0.3 and (y.y == 0).mean() < 0.01
    counts = np.bincount(np.frombuffer(y.y.tobytes(), np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 350, chi2  # 255 degrees of freedom: p ~ 1e-4 at 350
    assert abs(np.corrcoef(x.astype(np.float64), y.y.astype(np.float64))[0, 1]) < 0.1


def test_devices_refuse_unmask_requests_that_would_reveal_an_input():
    values, masks, weights = sparse_deltas(7)
    devs = {f"d{i}": SecAggDevice(f"d{i}") for i in range(7)}
    srv = SecAggServer(3, SESSION, threshold=4, length=2 * D)
    for d in devs.values():
        srv.receive(d.advertise())
    roster = srv.roster()
    for d in devs.values():
        srv.receive(d.share_keys(roster))
    routed = srv.route_shares()
    for i, d in enumerate(devs.values()):
        d.masked_input(routed[d.id], encode_input(values[i], masks[i], int(weights[i]), 7))
    everyone = tuple(sorted(devs))

    with pytest.raises(SecAggError, match="both survivor and dropped"):
        devs["d0"].unmask(UnmaskRequest(everyone, ("d3",)))
    with pytest.raises(SecAggError, match="threshold"):
        devs["d0"].unmask(UnmaskRequest(("d0", "d1", "d2"), ("d3", "d4", "d5", "d6")))
    devs["d1"].unmask(UnmaskRequest(everyone, ()))
    with pytest.raises(SecAggError, match="stage"):  # one answer per round: no second, different request
        devs["d1"].unmask(UnmaskRequest(everyone[:-1], everyone[-1:]))


def test_devices_refuse_bad_rosters_and_forged_shares():
    devs = [SecAggDevice(f"d{i}") for i in range(4)]
    keys = tuple(d.advertise() for d in devs)
    with pytest.raises(SecAggError, match="threshold"):  # t <= n/2 would let the server unmask one device
        devs[0].share_keys(Roster(1, SESSION, 2, 8, 32, keys))
    with pytest.raises(SecAggError, match="this device's keys"):
        devs[0].share_keys(Roster(1, SESSION, 3, 8, 32, keys[1:] + (SecAggDevice("zz").advertise(),)))
    roster = Roster(1, SESSION, 3, 8, 32, keys)
    sk = [d.share_keys(roster) for d in devs]
    to0 = [s for m in sk[1:] for s in m.shares if s.receiver == "d0"]
    forged = [type(to0[0])(to0[0].sender, "d0", to0[0].ciphertext[:-1] + bytes([to0[0].ciphertext[-1] ^ 1]))]
    with pytest.raises(SecAggError, match="does not authenticate"):
        devs[0].masked_input(SharesFor("d0", ("d0", "d1", "d2", "d3"), tuple(forged + to0[1:])), np.zeros(8, int))


def test_inputs_that_could_overflow_are_refused():
    with pytest.raises(SecAggError, match="overflow"):
        encode_input(np.array([2**26]), np.array([True]), 64, group_size=10)
    assert encode_input(np.array([2**26]), np.array([True]), 64, group_size=10, bits=64)[0] == 2**32
    assert to_signed(np.array([2**32 - 5], np.uint32)).tolist() == [-5]


def test_shamir_threshold_and_groups():
    secret = bytes(range(32))
    shares = shamir_split(secret, list(range(1, 11)), 6)
    assert shamir_combine(dict(list(shares.items())[3:9]), 6, 32) == secret
    assert all(0 <= y < PRIME for y in shares.values())
    with pytest.raises(SecAggError):
        shamir_combine(dict(list(shares.items())[:5]), 6, 32)
    groups = plan_groups([f"d{i:04d}" for i in range(1000)], max_group=300)
    assert len(groups) == 4 and all(len(g) == 250 for g in groups) and len({d for g in groups for d in g}) == 1000

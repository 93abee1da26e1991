"""The faults harness's secure-aggregation judge (fleet/sim/faults.observe_secure) on recorded in-memory rounds: it
recomputes the committed sum from the traffic alone, finds nothing revealed in an honest round, and does find a
device whose seed and key were both revealed, and a masked input sent without its pairwise masks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from device_agent.wire.messages import Publish
from device_agent.wire.secagg import UnmaskResponse, context, encode_dense_input, prg
from device_agent.wire.secagg_frames import secagg_from_bytes, secagg_to_bytes
from fleet.sim.faults import observe_secure
from tests.pure.test_secagg_rounds import SecureFleet


class Recorded(SecureFleet):
    """A masked fleet whose secure-aggregation traffic (both directions) is recorded as the broker carries it."""

    def __init__(self, **kw):
        self.records: list[tuple[str, str, bytes]] = []
        super().__init__(**kw)

    def _keep(self, outs):
        for o in outs:
            if isinstance(o, Publish) and o.topic.endswith(("/secagg", "/secagg_relay")):
                self.records.append((o.topic.split("/")[-2], o.topic.rsplit("/", 1)[1], o.payload))

    def _route_coord(self, outs):
        self._keep(outs)
        super()._route_coord(outs)

    def _route_dev(self, dev, outs):
        self._keep(outs)
        super()._route_dev(dev, outs)


def _round(drop_after=None) -> Recorded:
    f = Recorded(drop_after=drop_after)
    f.boot()
    f.round()
    assert f.closed()[-1].committed
    return f


def _true_sum(f: Recorded, ids) -> np.ndarray:
    """What the coordinator must learn: the sum of the devices' encoded inputs mod 2^32 (from the devices)."""
    n = len(f.devices)
    xs = [encode_dense_input(f.devices[d].masked.values, f.devices[d].masked.weight, n) for d in ids]
    return (np.sum(xs, axis=0) % (1 << 32)).astype(np.uint32)


def test_honest_round_recomputed_exactly_and_nothing_revealed():
    f = _round({"d02": "ShareKeys"})
    revealed, sums = observe_secure(f.records)
    assert revealed == 0
    assert list(sums) == [1] and np.array_equal(sums[1], _true_sum(f, ("d00", "d01", "d03")))


def test_a_device_whose_seed_and_key_are_both_revealed_is_found():
    f = _round()
    # forge what a cheating coordinator would need: every survivor also answering with d01's key share
    records = []
    for dev, kind, payload in f.records:
        r, msg = secagg_from_bytes(payload)
        if isinstance(msg, UnmaskResponse):
            s_share = f.devices[dev].masked.device._received["d01"][0]
            msg = UnmaskResponse(msg.device_id, msg.self_mask_shares, {"d01": s_share})
            payload = secagg_to_bytes(r, msg)
        records.append((dev, kind, payload))
    assert observe_secure(records)[0] == 1


def test_a_masked_input_without_its_pairwise_masks_is_found():
    f = _round()
    records = []
    for dev, kind, payload in f.records:
        r, msg = secagg_from_bytes(payload)
        if dev == "d03" and type(msg).__name__ == "MaskedInput":
            m = f.devices[dev].masked
            roster = m.device.roster
            x = encode_dense_input(m.values, m.weight, len(roster.keys)).astype(np.uint32)
            y = x + prg(m.device._b, context(r, roster.session), x.size, 32)  # only the self mask
            payload = secagg_to_bytes(r, replace(msg, y=y.astype(np.uint32)))
        records.append((dev, kind, payload))
    revealed, sums = observe_secure(records)
    assert revealed == 1
    assert not np.array_equal(sums[1], _true_sum(f, tuple(f.devices)))  # and the recomputed sum no longer matches


def test_groups_are_recomputed_group_by_group():
    from fleet.security.secagg_config import SecureAggregationConfig
    from tests.pure.test_fleet_inmemory import config

    f = Recorded(n=5, cfg=config(goal=5, secure_aggregation=SecureAggregationConfig(stage_timeout=5.0)))
    f.coord.secure_group_size = 3  # groups d00 d02 d04 | d01 d03
    f.boot()
    f.round()
    assert f.closed()[-1].committed
    revealed, sums = observe_secure(f.records)
    assert revealed == 0 and isinstance(sums[1], tuple) and len(sums[1]) == 2
    total = (sum(t.astype(np.uint64) for t in sums[1]) % (1 << 32)).astype(np.uint32)
    assert np.array_equal(total, _true_sum(f, tuple(f.devices)))

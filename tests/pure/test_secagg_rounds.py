"""Masked rounds through the coordinator and real device protocols on an in-memory link (no broker).

The secure fleet must commit bit for bit the model a plain FedAvg fleet commits from the same devices' deltas,
recover from dropouts after key sharing, abort below threshold with the model unchanged, store no individual
update, refuse plain deltas, and abandon (never reveal) a masked round its coordinator restarted in.
"""

from __future__ import annotations

import numpy as np
import pytest

from device_agent import protocol as dp
from device_agent.wire.messages import Publish
from device_agent.wire.secagg_frames import secagg_from_bytes
from fleet import coordinator as co
from fleet.coordinator.secagg_round import secure_threshold
from fleet.security.secagg_config import SecureAggregationConfig
from fleet.store import Store
from tests.pure.test_fleet_inmemory import Fleet, config, state_bytes

N = 4


class SecureFleet(Fleet):
    """:class:`Fleet` whose devices may die right after sending one kind of secure-aggregation message."""

    def __init__(self, n=N, drop_after: dict[str, str] | None = None, cfg=None, **kw):
        self.drop_after = drop_after or {}
        self.sent: list[tuple[str, str, object]] = []  # (device, kind, decoded message) of every uplink
        cfg = cfg or config(goal=n, secure_aggregation=SecureAggregationConfig(stage_timeout=5.0))
        super().__init__(n=n, cfg=cfg, **kw)

    def _route_dev(self, dev, outs):
        super()._route_dev(dev, outs)
        did = dev.id.device_id
        for o in outs:
            if isinstance(o, Publish) and o.topic.endswith(("/secagg", "/delta")):
                msg = secagg_from_bytes(o.payload)[1] if o.topic.endswith("/secagg") else None
                self.sent.append((did, o.topic.rsplit("/", 1)[1], msg))
                if msg is not None and type(msg).__name__ == self.drop_after.get(did) and did in self.alive:
                    self.kill(did)


def plain_model(kill: tuple[str, ...] = ()) -> bytes:
    f = Fleet(n=N, cfg=config(goal=N))
    f.boot()
    f.round(kill=kill)
    assert f.closed()[-1].committed
    return state_bytes(f.coord.state)


@pytest.fixture(scope="module")
def plain_all() -> bytes:
    return plain_model()


def test_masked_round_commits_exactly_the_plain_fedavg(plain_all):
    f = SecureFleet()
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and closed.accepted == ("d00", "d01", "d02", "d03"), closed
    assert state_bytes(f.coord.state) == plain_all
    assert {k for _, k, _ in f.sent} == {"secagg"}  # no plain delta ever left a device
    assert f.store.deltas(1) == []  # the store holds no individual update, masked or not
    assert all(d.version == 2 and d.model_hash == f.coord.hash for d in f.devices.values())


def test_drop_after_masked_input_still_sums_its_input(plain_all):
    f = SecureFleet(drop_after={"d02": "MaskedInput"})
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and "d02" in closed.accepted
    assert state_bytes(f.coord.state) == plain_all  # its self mask was removed from the others' shares
    assert not any(d == "d02" and k == "secagg" and type(m).__name__ == "UnmaskResponse" for d, k, m in f.sent)


def test_drop_after_sharing_keys_recovers_its_pairwise_masks():
    f = SecureFleet(drop_after={"d01": "ShareKeys"})
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and closed.accepted == ("d00", "d02", "d03")
    assert state_bytes(f.coord.state) == plain_model(kill=("d01",))


def test_below_threshold_aborts_with_the_model_unchanged():
    assert secure_threshold(0.6, N, 2) == 3
    f = SecureFleet(drop_after={"d01": "AdvertiseKeys", "d02": "AdvertiseKeys"})
    f.boot()
    before = state_bytes(f.coord.state)
    f.round()
    (closed,) = f.closed()
    assert not closed.committed and "threshold 3" in closed.detail, closed
    assert state_bytes(f.coord.state) == before and f.coord.version == 1
    # the next round, with the two back, commits
    f.drop_after = {}
    for d in ("d01", "d02"):
        f.alive.add(d)
        f._route_dev(f.devices[d], f.devices[d].handle(dp.Start()))
    f.pump()
    f.round()
    assert f.closed()[-1].committed and len(f.closed()[-1].accepted) == N


def test_plain_delta_is_refused_in_a_masked_fleet():
    f = SecureFleet()
    f.boot()
    f.send(co.StartRound())
    out = f.send(co.Received("delta", "d00", b"TFDL" + bytes(60)))
    assert [type(o).__name__ for o in out] == ["Dropped"] and "securely" in out[0].detail


def test_coordinator_restart_mid_round_abandons_and_reveals_nothing(tmp_path):
    db = str(tmp_path / "c.db")
    f = SecureFleet(store=Store(db))
    f.boot()
    f.now += 10.0
    f.send(co.StartRound())
    f.pump(max_coord=N + 2)  # keys advertised, shares on their way
    f.queue.clear()  # whatever was in flight dies with the coordinator
    f.restart_coordinator(Store(db))
    f.pump()
    closed = f.closed()
    assert [c.committed for c in closed] == [False] and "restarted" in closed[0].detail
    assert f.coord.version == 1 and f.coord.store.deltas(1) == []
    assert not any(type(m).__name__ == "UnmaskResponse" for _, _, m in f.sent)
    f.round()  # a fresh masked round (fresh keys) commits
    assert f.closed()[-1].committed


def test_masked_inputs_look_nothing_like_the_deltas():
    f = SecureFleet()
    f.boot()
    f.round()
    ys = [m.y for _, _, m in f.sent if type(m).__name__ == "MaskedInput"]
    assert len(ys) == N
    for y in ys:  # a delta is mostly small integers; a masked input is uniform mod 2^32
        assert np.mean(y > (1 << 31)) == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("text, message", [
    ("secure_aggregation: {bits: 16}\n", "secure_aggregation.bits: expected 32 or 64"),
    ("secure_aggregation: {threshold: 0.4}\n", "threshold: must be a fraction in [0.5, 1]"),
    ("secure_aggregation: {resolution: 8}\n", "resolution: must be an integer in [16, 2^24]"),
    ("secure_aggregation: {resolution: 100000}\ndp: {clip: 1.0}\n", "use bits: 64"),
    ("secure_aggregation: {}\ndp: {clip: 1.0, noise_multiplier: 0}\n", "must be > 0 with secure_aggregation"),
    ("secure_aggregation: {}\nmode: async\n", "masked rounds are sync rounds"),
    ("secure_aggregation: {}\ntopk_permille: 20\n", "top-k uploads"),
])
def test_config_refuses_what_masked_rounds_cannot_do(tmp_path, text, message):
    from fleet.config import ConfigError
    from fleet.schema import load_fleet_config

    path = tmp_path / "f.yaml"
    path.write_text("name: t\nbroker: embedded\ndevices: 4\nrounds: 1\n" + text)
    with pytest.raises(ConfigError) as e:
        load_fleet_config(path)
    assert message in str(e.value)


def test_a_plain_masked_config_loads_and_reaches_the_coordinator(tmp_path):
    from fleet.schema import load_fleet_config

    path = tmp_path / "f.yaml"
    path.write_text("name: t\nbroker: embedded\ndevices: 4\nrounds: 1\nsecure_aggregation: {bits: 64}\n")
    cfg = load_fleet_config(path).coordinator_config()
    assert cfg.secure_aggregation.bits == 64 and cfg.secure_aggregation.threshold == 0.6


def test_64_bit_masked_round_commits_the_same_model(plain_all):
    f = SecureFleet(cfg=config(goal=N, secure_aggregation=SecureAggregationConfig(bits=64, stage_timeout=5.0)))
    f.boot()
    f.round()
    assert f.closed()[0].committed and state_bytes(f.coord.state) == plain_all
    assert all(m.y.dtype == np.uint64 for _, _, m in f.sent if type(m).__name__ == "MaskedInput")


def test_dense_input_refuses_a_sum_that_could_overflow_and_splits_back():
    from device_agent.wire.secagg import SecAggError, encode_dense_input
    from fleet.security.secagg import split_dense_sums

    with pytest.raises(SecAggError, match="overflow"):
        encode_dense_input(np.array([1 << 20]), 1000, 4, 32)
    xs = [encode_dense_input(np.array([3, -4, 0]), w, 3) for w in (1, 2, 5)]
    num, den = split_dense_sums(np.sum(xs, axis=0).astype(np.int64).astype(np.uint32))
    assert num.tolist() == [24, -32, 0] and den.tolist() == [8, 8, 8]


@pytest.mark.parametrize("cut", [2, N + 2, 2 * N + 3, 3 * N + 2])
def test_broker_reconnect_mid_round_resends_and_commits_the_same_sum(plain_all, cut):
    """A broker that loses what was in flight, then the same coordinator's Boot (CoordinatorLink does it on every
    reconnect): the open stage is re-sent, devices repeat their replies, the round commits the exact sum."""
    f = SecureFleet()
    f.boot()
    f.now += 10.0
    f.send(co.StartRound())
    f.pump(max_coord=cut)
    f.queue.clear()  # lost with the broker
    f._route_coord(f.coord.handle(co.Boot()))
    f.pump()
    (closed,) = f.closed()
    assert closed.committed and len(closed.accepted) == N, closed
    assert state_bytes(f.coord.state) == plain_all


def test_an_observer_of_everything_the_coordinator_sees_cannot_unmask_one_device():
    """Everything the coordinator receives, recorded: with every self-mask seed it legitimately reconstructs, a
    survivor's masked input minus its self mask is still hidden by pairwise masks, and it holds key shares of the
    dropout only."""
    from device_agent.wire.plan import plan_hash
    from device_agent.wire.secagg import context, encode_dense_input, prg, session_label, shamir_combine

    f = SecureFleet(drop_after={"d02": "ShareKeys"})
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and closed.accepted == ("d00", "d01", "d03")
    roster = sorted(d for d, _, m in f.sent if type(m).__name__ == "AdvertiseKeys")
    xs = {d: i + 1 for i, d in enumerate(roster)}
    answers = [m for _, _, m in f.sent if type(m).__name__ == "UnmaskResponse"]
    masked = {d: m.y for d, _, m in f.sent if type(m).__name__ == "MaskedInput"}
    ctx = context(1, session_label(plan_hash(f.devices["d00"].plan)))
    t = secure_threshold(0.6, N, 2)
    for d, y in masked.items():
        b = shamir_combine({xs[a.device_id]: a.self_mask_shares[d] for a in answers}, t, 32)  # the observer can
        left = y - prg(b, ctx, y.size, 32)
        m = f.devices[d].masked
        x = encode_dense_input(m.values, m.weight, len(roster)).astype(np.uint32)
        assert np.mean(left == x) < 0.01  # pairwise masks still hide it
        assert np.mean(left > (1 << 31)) == pytest.approx(0.5, abs=0.1)
    assert not any(d == "d02" for d in masked)
    assert all(not a.key_shares or set(a.key_shares) == {"d02"} for a in answers)  # key shares only of the dropout


# --- distributed DP: each device adds its Skellam share ------------------------------------------------------


@pytest.mark.parametrize("mu, d, order", [(3.0, 1, 2), (10.0, 2, 8), (50.0, 5, 32), (200.0, 5, 32),
                                          (1000.0, 5, 256), (5000.0, 20, 64)])
def test_skellam_rdp_bound_holds_against_the_exact_divergence(mu, d, order):
    """rdp_skellam (the accountant's) >= the exact Rényi divergence of Skellam(mu) shifted by d, in one dimension."""
    from scipy.special import logsumexp
    from scipy.stats import skellam

    from fleet.security.dp import rdp_skellam

    k = np.arange(-int(20 * mu + 50 * d + 400), int(20 * mu + 50 * d + 400))
    lp, lq = skellam.logpmf(k - d, mu, mu), skellam.logpmf(k, mu, mu)
    ok = np.isfinite(lp) & np.isfinite(lq)
    terms = order * lp[ok] + (1 - order) * lq[ok]
    assert max(terms[0], terms[-1]) < terms.max() - 40  # the sum is complete where the pmf is representable
    exact = logsumexp(terms) / (order - 1)
    bound = rdp_skellam(mu, d, d, order)
    assert 0.5 * bound < exact <= bound  # a bound, and not a loose one


def _dp_cfg(noise_multiplier: float, **sa):
    from fleet.security.dp import DPConfig

    return config(goal=N, secure_aggregation=SecureAggregationConfig(stage_timeout=5.0, **sa),
                  dp=DPConfig(clip=0.5, noise_multiplier=noise_multiplier))


def test_masked_dp_round_is_central_dp_plus_only_its_own_lattice_and_noise():
    """Almost no noise: the masked DP model is the central (noise-free) clipped mean within a unit; the devices
    sent noisy lattice points, never their deltas; the accountant spent one Skellam round."""
    from fleet.security.dp import DPConfig

    ref = Fleet(n=N, cfg=config(goal=N, dp=DPConfig(clip=0.5, noise_multiplier=0.0)))
    ref.boot()
    ref.round()
    f = SecureFleet(cfg=_dp_cfg(1e-4))
    f.boot()
    before = {k: v.astype(np.int64) for k, v in f.coord.state.items()}
    f.round()
    (closed,) = f.closed()
    assert closed.committed and closed.epsilon is not None and closed.epsilon > 0
    moved = sum(int((f.coord.state[k].astype(np.int64) != before[k]).sum()) for k in before)
    assert moved > 50  # the round did something
    for k in before:
        assert np.abs(f.coord.state[k].astype(np.int64) - ref.coord.state[k].astype(np.int64)).max() <= 1
    assert len(f.coord.accountant.rounds[0]) == 5  # (q, sigma, mu, l1, l2): a Skellam round


def test_masked_dp_epsilon_is_the_gaussian_one_plus_a_vanishing_term():
    from fleet.security.dp import RDPAccountant

    f = SecureFleet(cfg=_dp_cfg(1.0))
    f.boot()
    f.round()
    (closed,) = f.closed()
    gauss = RDPAccountant(1e-5)
    gauss.spend(1.0, 1.0)
    assert closed.committed and gauss.epsilon() <= closed.epsilon <= 1.02 * gauss.epsilon()
    # a restarted coordinator reads the same spent round back
    assert RDPAccountant.from_json(f.coord.accountant.to_json()).epsilon() == pytest.approx(closed.epsilon)


def test_shares_that_do_not_reconstruct_abort_the_round_not_the_coordinator():
    """Outside the honest-but-curious model (a device answers garbage shares): the round aborts, unchanged."""
    import dataclasses

    f = SecureFleet()
    f.boot()
    dev = f.devices["d01"]
    real = dev._secagg

    def corrupt(payload):
        out = real(payload)
        for i, o in enumerate(out):
            if isinstance(o, Publish) and o.topic.endswith("/secagg"):
                rid, msg = secagg_from_bytes(o.payload)
                if type(msg).__name__ == "UnmaskResponse":
                    from device_agent.wire.secagg_frames import secagg_to_bytes

                    bad = dataclasses.replace(msg, self_mask_shares={k: (v + 1) % (1 << 500)
                                                                     for k, v in msg.self_mask_shares.items()})
                    out[i] = Publish(o.topic, secagg_to_bytes(rid, bad))
        return out
    dev._secagg = corrupt
    f.round()
    (closed,) = f.closed()
    assert not closed.committed and f.coord.version == 1, closed


# --- groups: more selected devices than one secure-aggregation group holds ---------------------------------------


def test_groups_sum_to_the_plain_fedavg_and_a_failed_group_leaves_only_itself_out():
    """7 devices in groups of at most 3 (3 + 2 + 2, each with its own roster, shares and threshold): the committed
    model is the plain FedAvg of all 7; when one 2-device group loses a member after sharing keys (below its
    threshold 2) only that group leaves the round: the model is the plain FedAvg of the other 5."""
    n = 7
    f = SecureFleet(n=n, cfg=config(goal=n, secure_aggregation=SecureAggregationConfig(stage_timeout=5.0)))
    f.coord.secure_group_size = 3
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and len(closed.accepted) == n, closed
    sizes = sorted(len(m.shares) + 1 for _, _, m in f.sent if type(m).__name__ == "ShareKeys")
    assert sizes == [2, 2, 2, 2, 3, 3, 3]  # each device shared with its own group only
    ref = Fleet(n=n, cfg=config(goal=n))
    ref.boot()
    ref.round()
    assert state_bytes(f.coord.state) == state_bytes(ref.coord.state)

    g = SecureFleet(n=n, cfg=config(goal=n, secure_aggregation=SecureAggregationConfig(stage_timeout=5.0)),
                    drop_after={"d01": "ShareKeys"})  # groups: d00 d03 d06 | d01 d04 | d02 d05
    g.coord.secure_group_size = 3
    g.boot()
    g.round()
    (closed,) = g.closed()
    assert closed.committed and closed.accepted == ("d00", "d02", "d03", "d05", "d06"), closed
    ref = Fleet(n=n, cfg=config(goal=n))
    ref.boot()
    ref.round(kill=("d01", "d04"))
    assert state_bytes(g.coord.state) == state_bytes(ref.coord.state)


def test_a_board_that_refuses_its_masked_round_fails_it_and_the_round_goes_on():
    """device_agent/board_secagg.BoardDeviceProtocol: a board whose BEGIN is refused (here: a builder that raises as
    the board would) reports the round failed instead of ending its agent; the others' sum commits."""
    from device_agent.board_secagg import BoardDeviceProtocol
    from device_agent.wire.secagg import SecAggError

    def refused(*args, **kw):
        raise SecAggError("board BEGIN: ERR_FORMAT: the session is not this board's plan")

    f = SecureFleet()
    old = f.devices["d01"]
    f.devices["d01"] = BoardDeviceProtocol(old.id, old.plan, old.trainer, old.codec, old.buffer, seed=old.seed,
                                           masked_round=refused)
    f.boot()
    f.round()
    (closed,) = f.closed()
    assert closed.committed and closed.accepted == ("d00", "d02", "d03"), closed
    assert f.devices["d01"].last_failure[1] == "secagg_board"
    assert state_bytes(f.coord.state) == plain_model(kill=("d01",))

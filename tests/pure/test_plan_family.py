"""Mixed-memory fleets: nested plan families (compiler) and one coordinator training every member (in memory)."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import torch

from device_agent import protocol as dp
from device_agent.buffer import SampleBuffer
from device_agent.engine import ir
from device_agent.engine.trainer import Trainer
from device_agent.wire.delta import delta_from_bytes
from device_agent.wire.envelope import Verifier
from device_agent.wire.messages import Ack, MessageError, PlanIndex, Publish, Task, parse
from device_agent.wire.update import ModelUpdate
from fleet import aggregate as agg
from fleet import coordinator as co
from fleet.compiler.compile import BudgetError
from fleet.compiler.family import FamilyError, PlanFamily, build_family, check_nested, coverage, shrink
from fleet.compiler.models import TinyCNN
from fleet.compiler.torch_import import import_torch
from fleet.round import RoundConfig
from fleet.store import Store

FULL = ir.SparseScheme("full", 6, {i: 1.0 for i in range(6)})


@pytest.fixture(scope="module")
def graph() -> ir.Graph:
    torch.manual_seed(0)
    return import_torch(TinyCNN().eval(), torch.randn(64, 1, 28, 28))


@pytest.fixture(scope="module")
def family(graph) -> PlanFamily:
    return build_family(graph, FULL, [40_000, 50_000, 256_000], serialize=True)


def test_shrink_only_drops_coordinates():
    s = ir.SparseScheme("s", 4, {2: 0.25, 5: 1.0})
    steps = [s]
    while (nxt := shrink(steps[-1])) is not None:
        steps.append(nxt)
    for big, small in itertools.pairwise(steps):
        assert small.n_bias_update <= big.n_bias_update
        assert all(small.weight_ratio[i] <= big.weight_ratio.get(i, 0) for i in small.weight_ratio)
    assert steps[-1].n_bias_update == 0 and not steps[-1].weight_ratio  # ends at the classifier only


def test_family_members_fit_their_budgets_and_nest(family):
    assert [m.budget for m in family.members] == [40_000, 50_000, 256_000]
    for m in family.members:
        assert m.need <= m.budget
    for small, big in zip(family.members, family.members[1:]):
        cs, cb = coverage(small.plan), coverage(big.plan)
        assert set(cs) < set(cb) or any(cs[n] < cb[n] for n in cs)  # strictly smaller
        assert all(cs[n] <= cb[n] for n in cs)
    with pytest.raises(FamilyError, match="not nested"):
        check_nested(family.largest.plan, family.smallest.plan)
    # a coordinate is one tensor by name in every plan: the id map is total and keeps shapes
    big = {t.id: t for t in family.largest.plan.trainable}
    for m in family.members:
        for small_id, big_id in family.id_map(m).items():
            assert m.plan.tensors[small_id].name == big[big_id].name
            assert m.plan.tensors[small_id].shape == big[big_id].shape


def test_choose_gives_the_largest_plan_that_fits(family):
    s, mid, big = family.members
    assert family.choose(big.need) is big and family.choose(10**9) is big
    assert family.choose(big.need - 1) is mid and family.choose(s.need) is s
    assert family.choose(s.need - 1) is None


def test_budget_below_the_classifier_plan_is_refused(graph):
    with pytest.raises(BudgetError, match="classifier-only plan") as e:
        build_family(graph, FULL, [1000, 256_000], serialize=False)
    assert e.value.required > 1000


# --- one coordinator, three plans ---------------------------------------------------------------------------


class MixedFleet:
    """A broker stand-in (FIFO, retained topics) joining a family coordinator and devices of several plans."""

    def __init__(self, family: PlanFamily, srams: dict[str, int]):
        self.family, self.now = family, 0.0
        cfg = co.CoordinatorConfig(round=RoundConfig(goal=len(srams), quorum=0.5, deadline_s=60.0), lr=0.1,
                                   local_steps=4, batch_size=4)
        self.codec = co.FamilyCodec(family)
        self.coord = co.Coordinator(family.largest.plan, Store(), cfg, lambda: self.now, self.codec)
        self.queue: deque = deque()
        self.infos: list = []
        self.downlinks: list[tuple[str, bytes]] = []  # (topic, payload) published to one device
        self.uplinks: list[tuple[str, bytes]] = []
        self.devices: dict[str, dp.DeviceProtocol] = {}
        rng = np.random.default_rng(0)
        for i, (did, sram) in enumerate(sorted(srams.items())):
            m = family.choose(sram) or family.smallest  # an unfit device holds some plan; it is never asked
            x = rng.integers(-128, 128, size=(16, 1, 28, 28)).astype(np.int8)
            y = (x[:, 0, :14].astype(np.int64).sum(axis=(1, 2)) > 0).astype(np.int32)
            buf = SampleBuffer(16, x.shape[1:])
            buf.add(x, y)
            self.devices[did] = dp.DeviceProtocol(dp.Identity(did, "host", sram, 1_000_000), m.plan, Trainer(m.plan),
                                                  dp.WireDeviceCodec(m.plan, Verifier.unsigned()), buf, seed=i)

    def route_coord(self, outs):
        for o in outs:
            if not isinstance(o, Publish):
                self.infos.append(o)
                continue
            parts = o.topic.split("/")
            if parts[0] == "dev":
                self.downlinks.append((o.topic, o.payload))
                self.queue.append(("d", parts[1], dp.Received(parts[2], o.payload)))
            elif parts[0] == "model":
                for did in sorted(self.devices):
                    self.queue.append(("d", did, dp.Received("model", o.payload)))

    def pump(self):
        while self.queue:
            item = self.queue.popleft()
            if item[0] == "c":
                if item[1].kind == "delta":
                    self.uplinks.append((item[1].device_id, item[1].payload))
                self.route_coord(self.coord.handle(item[1]))
                continue
            for o in self.devices[item[1]].handle(item[2]):
                if isinstance(o, Publish):
                    _, did, kind = o.topic.split("/")
                    self.queue.append(("c", co.Received(kind, did, o.payload)))

    def boot(self):
        self.route_coord(self.coord.handle(co.Boot()))
        for d in self.devices.values():
            for o in d.handle(dp.Start()):
                _, did, kind = o.topic.split("/")
                self.queue.append(("c", co.Received(kind, did, o.payload)))
        self.pump()

    def round(self):
        self.now += 10.0
        self.route_coord(self.coord.handle(co.StartRound()))
        self.pump()
        self.now += 100.0
        self.route_coord(self.coord.handle(co.Tick()))
        self.pump()


@pytest.fixture(scope="module")
def mixed(family) -> MixedFleet:
    s, mid, _big = family.members
    f = MixedFleet(family, {"big0": 256_000, "big1": 300_000, "mid0": mid.need, "small0": s.need,
                            "small1": s.need + 10, "tiny0": s.need - 1})
    f.boot()
    f.old = {k: v.copy() for k, v in f.coord.state.items()}
    f.round()
    return f


def test_each_device_trains_the_largest_plan_that_fits(mixed, family):
    s, mid, _big = family.members
    h = mixed.codec.plan_hash
    want = {"big0": h, "big1": h, "mid0": mixed.codec.assign(mid.need), "small0": mixed.codec.assign(s.need),
            "small1": mixed.codec.assign(s.need)}
    tasks = {t.split("/")[1]: parse(p, Task) for t, p in mixed.downlinks if t.endswith("/task")}
    assert {d: t.plan_hash for d, t in tasks.items()} == want
    assert len(set(want.values())) == 3
    (closed,) = [i for i in mixed.infos if isinstance(i, co.RoundClosed)]
    assert closed.committed and set(closed.accepted) == set(want)


def test_the_retained_plan_index_picks_the_plan_the_coordinator_assigns(family):
    # Prepare: a fresh family coordinator
    codec = co.FamilyCodec(family)
    coord = co.Coordinator(family.largest.plan, Store(), co.CoordinatorConfig(), lambda: 0.0, codec)
    # Execute: it boots and publishes its plans
    outs = {o.topic: o for o in coord.handle(co.Boot()) if isinstance(o, Publish)}
    # Assert: one retained plan per member and an index a device reads to pick the same plan the coordinator assigns
    assert {t for t in outs if t.startswith("plan/")} == {"plan/index", *(f"plan/{h}" for h in codec.needs)}
    index = parse(outs["plan/index"].payload, PlanIndex)
    assert outs["plan/index"].retain and set(index.plan_hashes) == set(codec.needs)
    for sram in sorted({*(m.need for m in family.members), *(m.need - 1 for m in family.members), 10**6}):
        assert index.choose(sram) == codec.assign(sram), sram
    assert index.choose(family.smallest.need - 1) is None


def test_a_plan_index_refuses_mismatched_or_repeated_entries():
    with pytest.raises(MessageError, match="equally long"):
        parse(b'{"v":1,"type":"plans","plan_hashes":["ab","cd"],"sram":[1]}', PlanIndex)
    with pytest.raises(MessageError, match="without repeats"):
        parse(b'{"v":1,"type":"plans","plan_hashes":["ab","ab"],"sram":[1,2]}', PlanIndex)
    ok = PlanIndex(("ab", "cd"), (100, 200))
    assert parse(ok.to_json(), PlanIndex) == ok and ok.choose(150) == "ab" and ok.choose(99) is None


def test_a_device_below_the_smallest_plan_is_told_why(mixed, family):
    acks = [parse(p, Ack) for t, p in mixed.downlinks if t == "dev/tiny0/ack"]
    assert [a.reason for a in acks] == ["no_plan_fits"] and not acks[0].accepted
    assert f"needs {family.smallest.need} bytes" in acks[0].detail
    (unfit,) = [i for i in mixed.infos if isinstance(i, co.Unfit)]
    assert (unfit.device_id, unfit.need) == ("tiny0", family.smallest.need)
    assert not any(t.startswith("dev/tiny0/task") for t, _ in mixed.downlinks)


def test_each_coordinate_is_averaged_over_the_devices_that_trained_it(mixed, family):
    big = family.largest.plan
    shared = [t for t in big.trainable if not t.personal]
    rows = []
    for did, payload in mixed.uplinks:
        d = delta_from_bytes(payload)
        got = mixed.codec.decode_delta(payload, "x")
        rows.append((np.concatenate([got.values[t.id].ravel() for t in shared]),
                     np.concatenate([got.masks[t.id].ravel() for t in shared]), d.sample_count))
    vals, masks, w = (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                      np.array([r[2] for r in rows]))
    # coordinates the small plans do not train: covered by the large-plan devices only
    assert masks.any(axis=1).all() and (masks.sum(axis=0) < len(rows)).any()
    want = agg.to_int_delta(agg.fedavg(vals, masks, w))
    pos = 0
    for t in shared:
        new = agg.apply_int_delta(mixed.old[t.id], want[pos:pos + t.numel])
        assert np.array_equal(mixed.coord.state[t.id], new), t.name
        pos += t.numel


def test_a_model_update_carries_exactly_its_plans_tensors(mixed, family):
    for m in family.members[:-1]:
        h = mixed.codec.assign(m.need)
        upd = ModelUpdate.from_bytes(mixed.codec.encode_member_update(h, 1, 2, mixed.coord.state),
                                     verify=Verifier.unsigned(), plan=m.plan)
        assert sorted(upd.tensors) == sorted(t.id for t in m.plan.trainable if not t.personal)
    # the next round: each smaller-plan device gets its plan's FULL model with its task, trains on it (the base
    # hash of its own plan), and counts
    n = len(mixed.downlinks)
    mixed.round()
    models = {t.split("/")[1] for t, _ in mixed.downlinks[n:] if t.endswith("/model")}
    assert models == {"mid0", "small0", "small1"}
    closed = [i for i in mixed.infos if isinstance(i, co.RoundClosed)]
    assert closed[-1].committed and len(closed[-1].accepted) == 5 and closed[-1].version == 3


def test_mixed_fleet_config_is_checked_with_key_paths():
    from fleet.config import ConfigError, from_dict
    from fleet.sim.config import SimConfig

    ok = from_dict(SimConfig, {"devices": 3, "plan_budgets": ["28KB", "256KB"], "device_groups": [
        {"backend": "qemu", "machine": "netduinoplus2"}, {"backend": "python", "sram": "30KB", "count": 2}]}, "t")
    assert ok.plan_budgets == [28_000, 256_000] and ok.device_groups[1].sram == 30_000
    with pytest.raises(ConfigError) as e:
        from_dict(SimConfig, {"devices": 3, "mode": "async", "plan_budgets": ["28KB", "28KB"], "device_groups": [
            {"backend": "qemu", "machine": "pdp11"}, {"backend": "python", "count": 1}]}, "t")
    text = str(e.value)
    for want in ("plan_budgets: budgets must be distinct", "plan_budgets: nested plans run in sync rounds only",
                 "device_groups[0].machine: expected one of", "device_groups[1]", "give sram",
                 "device_groups: counts add up to 2, but devices is 3"):
        assert want in text, (want, text)
    with pytest.raises(ConfigError, match="device_groups: a mixed-memory fleet needs plan_budgets"):
        from_dict(SimConfig, {"devices": 1, "device_groups": [{"backend": "python", "sram": "30KB"}]}, "t")


def test_round_machine_judges_each_device_against_its_own_plan_and_base():
    from fleet import round as rnd

    m = rnd.RoundMachine(rnd.RoundConfig(goal=3, quorum=0.5, deadline_s=10.0), "big")
    m.handle(rnd.StartRound(1, 5, "H-big", 0.0, (("small", "H-small"),)))
    m.handle(rnd.Eligible(("a", "b", "c"), 0.0, (("b", "small"), ("c", "big"))))
    assert m.assigned == {"b": "small"}  # the round's own plan is the default

    def up(dev, plan, base, n=1):
        return rnd.Upload(dev, 1, plan, base, n, 8, f"{dev}{plan}{base}")

    assert m.judge(up("a", "small", "H-small"), 1.0) == rnd.Reject.WRONG_PLAN
    assert m.judge(up("b", "big", "H-big"), 1.0) == rnd.Reject.WRONG_PLAN
    assert m.judge(up("b", "small", "H-big"), 1.0) == rnd.Reject.STALE_BASE
    assert m.judge(up("b", "small", "H-small"), 1.0) is None
    assert m.judge(up("a", "big", "H-big"), 1.0) is None
    # a restarted coordinator restores both from the stored snapshot
    again = rnd.RoundMachine(m.config, "big")
    again.restore(m.snapshot(), {}, {})
    assert (again.bases, again.assigned) == ({"small": "H-small"}, {"b": "small"})


def test_compile_cli_writes_one_plan_per_member(tmp_path, capsys):
    import argparse
    import json

    from device_agent.wire.envelope import Verifier
    from device_agent.wire.plan import plan_from_bytes
    from fleet.compiler import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["fleet.compiler.models:TinyCNN", "--board", "configs/boards/stm32f746.yaml", "--scheme",
                         "full", "--budgets", "40KB,50KB,256KB", "-o", str(tmp_path), "--json"])
    assert cli.run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["budget_bytes"] for r in out["family"]] == [40_000, 50_000, 256_000]
    plans = [plan_from_bytes((tmp_path / f"plan-{b}.ttp").read_bytes(), verify=Verifier.skip())
             for b in (40_000, 50_000, 256_000)]
    for i in range(len(plans) - 1):
        check_nested(plans[i], plans[i + 1])
    args.budgets = "1KB,256KB"
    assert cli.run(args) == 1  # below the classifier-only plan: the budget exit code
    assert "below the classifier-only plan" in capsys.readouterr().err

"""Coordinator and devices through an in-memory link (no broker): real engine training on examples.tiny_plan."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np
import pytest

from device_agent import protocol as dp
from device_agent.buffer import SampleBuffer
from device_agent.engine.trainer import Trainer
from device_agent.wire.delta import delta_from_bytes, delta_support, delta_to_dense, encode_delta
from device_agent.wire.envelope import Verifier
from device_agent.wire.messages import Publish
from fleet import aggregate as agg
from fleet import coordinator as co
from fleet.round import Reject, RoundConfig
from fleet.store import Store
from tests.fixtures.tiny import tiny_dataset, tiny_plan

PLAN = tiny_plan()
TEST_X, TEST_Y = tiny_dataset(200, seed=1000)


def config(goal=10, **kw) -> co.CoordinatorConfig:
    return co.CoordinatorConfig(round=RoundConfig(goal=goal, quorum=0.5, deadline_s=60.0), lr=0.2, local_steps=8,
                                batch_size=8, **kw)


class Fleet:
    """A broker stand-in: FIFO delivery, retained topics, Last Will on kill, optional duplicated uplinks."""

    def __init__(self, n=10, store: Store | None = None, cfg: co.CoordinatorConfig | None = None,
                 dup_uplink=False, top_k=None):
        self.now = 0.0
        self.cfg = cfg or config(goal=n)
        self.store = store or Store()
        self.coord = self._coordinator()
        self.dup_uplink = dup_uplink
        self.queue: deque = deque()
        self.retained: dict[str, bytes] = {}
        self.infos: list = []  # the coordinator's informational outputs
        self.uplinks: list[tuple[str, bytes]] = []  # every delta payload the coordinator received
        self.devices: dict[str, dp.DeviceProtocol] = {}
        for i in range(n):
            did = f"d{i:02d}"
            x, y = tiny_dataset(48, seed=i)
            buf = SampleBuffer(64, x.shape[1:])
            buf.add(x, y)
            ident = dp.Identity(did, "stm32f746", 320_000, 1_000_000)
            self.devices[did] = dp.DeviceProtocol(ident, PLAN, Trainer(PLAN),
                                                  dp.WireDeviceCodec(PLAN, Verifier.unsigned(), top_k), buf, seed=i)
        self.alive = set(self.devices)

    def _coordinator(self) -> co.Coordinator:
        return co.Coordinator(PLAN, self.store, self.cfg, lambda: self.now, co.WireCodec(PLAN))

    def boot(self):
        self._route_coord(self.coord.handle(co.Boot()))
        for d in self.devices.values():
            self._route_dev(d, d.handle(dp.Start()))
        self.pump()

    def restart_coordinator(self, store: Store):
        """Drop the coordinator without closing anything; a new one resumes from ``store``."""
        self.store = store
        self.coord = self._coordinator()
        self._route_coord(self.coord.handle(co.Boot()))
        for topic, payload in sorted(self.retained.items()):  # the broker re-sends retained hello/status
            parts = topic.split("/")
            if parts[0] == "dev":
                self.queue.append(("c", co.Received(parts[2], parts[1], payload)))

    def kill(self, device_id: str):
        self.alive.discard(device_id)
        will = self.devices[device_id].last_will()
        self.retained[will.topic] = will.payload
        self.queue.append(("c", co.Received("status", device_id, will.payload)))

    def send(self, event) -> list:
        out = self.coord.handle(event)
        self._route_coord(out)
        return out

    def _route_coord(self, outs):
        for o in outs:
            if not isinstance(o, Publish):
                self.infos.append(o)
                continue
            if o.retain:
                self.retained[o.topic] = o.payload
            parts = o.topic.split("/")
            if parts[0] == "dev":
                self.queue.append(("d", parts[1], dp.Received(parts[2], o.payload)))
            elif parts[0] == "model":
                for did in sorted(self.devices):
                    self.queue.append(("d", did, dp.Received("model", o.payload)))

    def _route_dev(self, dev: dp.DeviceProtocol, outs):
        for o in outs:
            if not isinstance(o, Publish):
                continue
            if o.retain:
                self.retained[o.topic] = o.payload
            _, did, kind = o.topic.split("/")
            for _ in range(2 if self.dup_uplink else 1):
                self.queue.append(("c", co.Received(kind, did, o.payload)))

    def pump(self, max_coord: int | None = None):
        """Deliver until the queue is empty (or ``max_coord`` coordinator deliveries have happened)."""
        done = 0
        while self.queue and (max_coord is None or done < max_coord):
            item = self.queue.popleft()
            if item[0] == "c":
                if item[1].kind == "delta":
                    self.uplinks.append((item[1].device_id, item[1].payload))
                self._route_coord(self.coord.handle(item[1]))
                done += 1
            elif item[1] in self.alive:
                dev = self.devices[item[1]]
                self._route_dev(dev, dev.handle(item[2]))

    def round(self, kill: tuple[str, ...] = ()):
        self.now += 10.0
        self.send(co.StartRound())
        for d in kill:
            self.kill(d)
        self.pump()
        self.now += 100.0  # past any deadline
        self.send(co.Tick())
        self.pump()

    def accuracy(self) -> float:
        t = Trainer(PLAN)
        t.load_trainable(self.coord.state)
        return t.evaluate(TEST_X, TEST_Y)

    def closed(self) -> list[co.RoundClosed]:
        return [i for i in self.infos if isinstance(i, co.RoundClosed)]

    def verdicts(self) -> list[co.Verdict]:
        return [i for i in self.infos if isinstance(i, co.Verdict)]


def state_bytes(state: dict[int, np.ndarray]) -> bytes:
    return b"".join(state[k].tobytes() for k in sorted(state))


def run_three_rounds(**kw) -> Fleet:
    f = Fleet(**kw)
    f.boot()
    for _ in range(3):
        f.round()
    return f


@pytest.fixture(scope="module")
def baseline() -> Fleet:
    return run_three_rounds()


def test_ten_devices_three_rounds_accuracy_improves(baseline):
    f = baseline
    closed = f.closed()
    assert [c.committed for c in closed] == [True, True, True]
    assert [c.version for c in closed] == [2, 3, 4]
    assert all(len(c.accepted) == 10 for c in closed)
    t0 = Trainer(PLAN)
    before = t0.evaluate(TEST_X, TEST_Y)
    assert f.accuracy() > before + 0.1, (before, f.accuracy())
    # every device ends on the coordinator's model
    assert all(d.version == 4 and d.model_hash == f.coord.hash for d in f.devices.values())


def test_kill_30_percent_commits_with_exact_reference():
    f = Fleet()
    f.boot()
    old = {k: v.copy() for k, v in f.coord.state.items()}
    f.round(kill=("d01", "d04", "d07"))
    (closed,) = f.closed()
    assert closed.committed and len(closed.accepted) == 7
    # the float64 oracle over exactly the deltas the coordinator accepted
    ok = {v.device_id for v in f.verdicts() if v.reason == "ok"}
    assert ok == set(closed.accepted)
    rows = []
    for did, payload in f.uplinks:
        if did in ok:
            d = delta_from_bytes(payload)
            vals, masks = delta_to_dense(d, PLAN), delta_support(d, PLAN)
            ids = sorted(vals)
            rows.append((np.concatenate([vals[i].ravel() for i in ids]),
                         np.concatenate([masks[i].ravel() for i in ids]), d.sample_count))
    ref = agg.fedavg_reference(rows)
    step = np.where(ref.covered, np.floor(ref.value + 0.5), 0.0)
    pos = 0
    for tid in sorted(old):
        n = old[tid].size
        lo, hi = (-127, 127) if old[tid].dtype == np.int8 else (-(2**31), 2**31 - 1)
        want = np.clip(old[tid].astype(np.float64).ravel() + step[pos:pos + n], lo, hi).astype(old[tid].dtype)
        assert np.array_equal(f.coord.state[tid].ravel(), want), tid
        pos += n


def test_kill_80_percent_abandons_and_keeps_model():
    f = Fleet()
    f.boot()
    before, version = state_bytes(f.coord.state), f.coord.version
    f.round(kill=tuple(f"d{i:02d}" for i in range(2, 10)))
    (closed,) = f.closed()
    assert not closed.committed and "quorum" in closed.detail
    assert f.coord.version == version and state_bytes(f.coord.state) == before
    # the next round starts from the same base and works with the devices that came back
    for d in list(f.devices):
        f.alive.add(d)
        f._route_dev(f.devices[d], f.devices[d].handle(dp.Start()))
    f.pump()
    f.round()
    assert f.closed()[-1].committed and f.coord.version == version + 1


def test_every_uplink_twice_gives_identical_result(baseline):
    f = run_three_rounds(dup_uplink=True)
    assert state_bytes(f.coord.state) == state_bytes(baseline.coord.state)
    assert f.coord.hash == baseline.coord.hash
    assert any(v.reason == "duplicate" for v in f.verdicts())
    assert not any(v.code for v in f.verdicts())  # nothing rejected, nothing counted twice


def _delta(f: Fleet, device_id: str, *, round_id: int, base_hash: str, counter: int) -> bytes:
    old = {t.id: t.data for t in PLAN.trainable}
    new = {k: np.clip(v.astype(np.int64) + 1, -127, 127) for k, v in old.items()}
    return encode_delta(PLAN, old, new, device_id=device_id, round_id=round_id, base_hash=bytes.fromhex(base_hash),
                        counter=counter, sample_count=10).to_bytes()


def test_stale_and_replayed_deltas_are_rejected_with_reason():
    f = Fleet()
    f.boot()
    f.round()
    old_hash = f.store.version(1).hash
    f.now += 10.0
    f.send(co.StartRound())  # round 2 open, tasks queued but not delivered
    rid = f.coord.machine.round_id
    before = f.coord.machine.snapshot()
    cases = {
        Reject.STALE_BASE: _delta(f, "d00", round_id=rid, base_hash=old_hash, counter=99),
        Reject.REPLAYED_COUNTER: _delta(f, "d01", round_id=rid, base_hash=f.coord.hash, counter=1),
        Reject.WRONG_ROUND: _delta(f, "d02", round_id=rid + 5, base_hash=f.coord.hash, counter=99),
    }
    for reason, payload in cases.items():
        did = delta_from_bytes(payload).device_id
        out = f.send(co.Received("delta", did, payload))
        (v,) = [o for o in out if isinstance(o, co.Verdict)]
        assert v.code == reason, (reason, v)
        ack = next(o for o in out if isinstance(o, Publish))
        assert ack.topic == f"dev/{did}/ack" and reason.name.lower().encode() in ack.payload
    # a round-1 delta redelivered now is recognised as a duplicate, not counted again
    did, payload = f.uplinks[0]
    (v,) = [o for o in f.send(co.Received("delta", did, payload)) if isinstance(o, co.Verdict)]
    assert v.reason == "duplicate"
    assert f.coord.machine.snapshot() == before and not f.coord.machine.accepted


def _mutations(good: bytes) -> dict[str, bytes]:
    flip = bytearray(good)
    flip[40] ^= 0xFF
    magic = bytearray(good)
    magic[0:4] = b"XXXX"
    return {"empty": b"", "truncated": good[:-7], "trailing": good + b"\0", "crc": bytes(flip),
            "magic": bytes(magic), "garbage": b"\x01" * 64}


def test_malformed_payloads_rejected_state_unchanged():
    f = Fleet()
    f.boot()
    f.now += 10.0
    f.send(co.StartRound())
    good = _delta(f, "d00", round_id=f.coord.machine.round_id, base_hash=f.coord.hash, counter=1)
    before = (f.coord.machine.snapshot(), dict(f.coord.machine.counters), f.store.last_round())
    for name, bad in _mutations(good).items():
        out = f.send(co.Received("delta", "d00", bad))
        (v,) = [o for o in out if isinstance(o, co.Verdict)]
        assert v.code == Reject.MALFORMED and "WireError" in v.detail, name
    # wrong topic id, bad control messages
    (v,) = [o for o in f.send(co.Received("delta", "d05", good)) if isinstance(o, co.Verdict)]
    assert v.code == Reject.WRONG_DEVICE
    for kind, bad in [("hello", b"{"), ("hello", b'{"v":2,"type":"hello"}'), ("status", b"[]"),
                      ("status", (b'{"v":1,"type":"status","device_id":"d00","state":"sleepy","model_version":0,'
                                 b'"samples":0}'))]:
        (d,) = f.send(co.Received(kind, "d00", bad))
        assert isinstance(d, co.Dropped)
    assert (f.coord.machine.snapshot(), f.coord.machine.counters, f.store.last_round()) == before
    # and the good one still counts afterwards
    (v,) = [o for o in f.send(co.Received("delta", "d00", good)) if isinstance(o, co.Verdict)]
    assert v.reason == "ok"


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_coordinator_restart_mid_round_same_final_model(tmp_path, baseline, cut):
    path = tmp_path / "fleet.db"
    f = Fleet(store=Store(path))
    f.boot()
    f.round()
    f.now += 10.0
    f.send(co.StartRound())
    f.pump(max_coord=cut)  # round 2 partly collected
    f.restart_coordinator(Store(path))  # the old object is dropped without close()
    f.pump()
    f.now += 100.0
    f.send(co.Tick())
    f.pump()
    f.round()
    assert [c.version for c in f.closed() if c.committed][-1] == 4
    assert state_bytes(f.coord.state) == state_bytes(baseline.coord.state)


def test_personal_tensors_never_uploaded():
    plan = tiny_plan()
    personal = plan.trainable[-1]
    personal.personal = True
    ident = dp.Identity("p0", "b", 10**6, 10**6)
    x, y = tiny_dataset(16, seed=3)
    buf = SampleBuffer(16, x.shape[1:])
    buf.add(x, y)
    codec = co.WireCodec(plan)
    coord = co.Coordinator(plan, Store(), replace(config(goal=1)), lambda: 0.0, codec)
    dev = dp.DeviceProtocol(ident, plan, Trainer(plan), dp.WireDeviceCodec(plan, Verifier.unsigned()), buf)
    model = next(o for o in coord.handle(co.Boot()) if o.topic == "model/current")
    dev.handle(dp.Start())
    coord.handle(co.Received("hello", "p0", dev.handle(dp.Start())[0].payload))
    dev.handle(dp.Received("model", model.payload))
    (task,) = [o for o in coord.handle(co.StartRound()) if isinstance(o, Publish)]
    (delta,) = [o for o in dev.handle(dp.Received("task", task.payload)) if isinstance(o, Publish)]
    ids = [td.tensor_id for td in delta_from_bytes(delta.payload).tensors]
    assert personal.id not in ids and ids
    assert personal.id not in coord.state
    # the personal tensor did train on the device
    assert not np.array_equal(dev.trainer.trainable_state()[personal.id], personal.data)


# --- device-side units: control messages and the private sample buffer ------------------------------------------


def test_control_messages_roundtrip_and_strict_parsing():
    from device_agent.wire.messages import Hello, MessageError, MsgError, Task, parse, split_topic

    t = Task(3, "ab" * 32, 2, "cd" * 32, 0.05, 10, 8, 123.5)
    assert parse(t.to_json()) == t and parse(t.to_json(), Task) == t
    h = Hello("d01", "stm32f746", 320_000, 10**6, ("ab" * 32,), "fw 1")
    assert parse(h.to_json()) == h
    good = b'{"v":1,"type":"status","device_id":"d1","state":"online","model_version":1,"samples":2}'
    parse(good)
    bad = {
        MsgError.NOT_JSON: b'{"v":1,', MsgError.NOT_OBJECT: b"[1]", MsgError.BAD_VERSION: good.replace(b'"v":1', b'"v":2'),
        MsgError.UNKNOWN_TYPE: good.replace(b'"status"', b'"reboot"'),
        MsgError.MISSING_FIELD: good.replace(b',"samples":2', b""),
        MsgError.UNKNOWN_FIELD: good.replace(b"}", b',"x":1}'),
        MsgError.BAD_FIELD_TYPE: good.replace(b'"samples":2', b'"samples":true'),
        MsgError.BAD_VALUE: good.replace(b'"samples":2', b'"samples":-1'),
        MsgError.TOO_LARGE: b" " * 5000,
    }
    for code, payload in bad.items():
        with pytest.raises(MessageError) as e:
            parse(payload)
        assert e.value.code == code, code
    with pytest.raises(MessageError):
        parse(good, Task)  # a status on a task topic
    with pytest.raises(MessageError):
        parse(good.replace(b'"samples":2', b'"samples":2,"samples":3'))  # duplicate key
    assert split_topic("f", "tinyfleet/f/dev/d01/delta") == ("d01", "delta")
    assert split_topic("f", "tinyfleet/f/dev/a+b/delta") is None and split_topic("g", "tinyfleet/f/model/current") is None


def test_sample_buffer_bounded_fifo_and_reservoir():
    x = np.arange(20, dtype=np.int8).reshape(20, 1)
    y = np.arange(20) % 3
    fifo = SampleBuffer(5, (1,))
    fifo.add(x, y)
    assert len(fifo) == 5 and fifo.seen == 20
    bx, _ = fifo.batch(5, np.random.default_rng(0))
    assert sorted(bx.ravel().tolist()) == [15, 16, 17, 18, 19]  # the newest five
    res = SampleBuffer(5, (1,), policy="reservoir", seed=1)
    res.add(x, y)
    bx, _ = res.batch(5, np.random.default_rng(0))
    assert len(res) == 5 and len(set(bx.ravel().tolist())) == 5 and min(bx.ravel()) < 15  # not just the newest
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(fifo)
    with pytest.raises(ValueError):
        fifo.add(np.zeros((2, 2), np.int8), [0, 1])


def test_device_ignores_stale_tasks_and_updates():
    f = Fleet(n=1, cfg=config(goal=1))
    f.boot()
    dev = f.devices["d00"]
    model_v1 = f.retained["model/current"]
    f.round()
    assert dev.version == 2
    (note,) = dev.handle(dp.Received("model", model_v1))
    assert note.what == "stale_model" and dev.version == 2
    from device_agent.wire.messages import Task

    old = Task(1, f.coord.codec.plan_hash, 1, "00" * 32, 0.1, 1, 1, 0.0).to_json()
    again = dev.handle(dp.Received("task", old))  # the round it already trained: same delta bytes again
    assert [o.payload for o in again if isinstance(o, Publish)] == [dev.last_delta]
    stale = Task(9, f.coord.codec.plan_hash, 1, "00" * 32, 0.1, 1, 1, 0.0).to_json()
    assert dev.handle(dp.Received("task", stale))[0].what == "stale_task"
    other = Task(9, "ee" * 32, 2, f.coord.hash, 0.1, 1, 1, 0.0).to_json()
    assert dev.handle(dp.Received("task", other))[0].what == "wrong_plan"
    future = Task(9, f.coord.codec.plan_hash, 5, "00" * 32, 0.1, 1, 1, 0.0).to_json()
    assert dev.handle(dp.Received("task", future))[0].what == "wait_model" and dev.state == dp.DeviceState.WAIT_MODEL
    assert dev.handle(dp.Received("task", b"nope"))[0].what == "bad_task"


@pytest.mark.parametrize("kind, extra", [("median", {}), ("trimmed", {"trim": 0.2}), ("clipped", {"clip": 50.0})])
def test_robust_aggregators_commit_through_the_coordinator(kind, extra):
    f = Fleet(n=5, cfg=config(goal=5, aggregator=kind, **extra))
    f.boot()
    before = state_bytes(f.coord.state)
    f.round()
    assert f.closed()[-1].committed and state_bytes(f.coord.state) != before
    mean = agg.aggregate(kind, *f.coord.stacked(1), clip=f.cfg.clip, beta=f.cfg.trim)
    step, pos = agg.to_int_delta(mean), 0
    for t in sorted(PLAN.trainable, key=lambda t: t.id):  # version 1 = the plan's values
        want = agg.apply_int_delta(np.asarray(t.data).reshape(t.shape), step[pos:pos + t.numel])
        assert np.array_equal(f.coord.state[t.id], want), t.name
        pos += t.numel


# --- downlink: DIFF on model/current, FULL for a device that fell behind --------------------------------------


def _come_back(f: Fleet, did: str) -> list[Publish]:
    """Restart ``did`` (hello + status), deliver the retained model/current as a new subscription gets it, pump;
    the coordinator's publishes on ``dev/<did>/model``."""
    f.alive.add(did)
    f._route_dev(f.devices[did], f.devices[did].handle(dp.Start()))
    f.queue.append(("d", did, dp.Received("model", f.retained["model/current"])))
    sent: list = []
    while f.queue:
        item = f.queue.popleft()
        if item[0] == "c":
            out = f.coord.handle(item[1])
            sent += [o for o in out if isinstance(o, Publish) and o.topic == f"dev/{did}/model"]
            f._route_coord(out)
        elif item[1] in f.alive:
            f._route_dev(f.devices[item[1]], f.devices[item[1]].handle(item[2]))
    return sent


def test_device_that_missed_rounds_catches_up_via_full_and_diff_is_smaller():
    from device_agent.wire.envelope import Verifier as V
    from device_agent.wire.update import Form, ModelUpdate

    f = Fleet()
    f.boot()
    f.round()
    f.kill("d03")  # offline (Last Will): misses rounds 2 and 3 and their DIFFs
    f.pump()
    f.round()
    f.kill("d04")  # misses round 3 only
    f.pump()
    f.round()
    assert [c.committed for c in f.closed()] == [True] * 3 and f.coord.version == 4
    assert f.devices["d00"].version == 4 and f.devices["d03"].version == 2  # the others applied the DIFFs
    diff = ModelUpdate.from_bytes(f.retained["model/current"], verify=V.unsigned())
    assert diff.form == Form.DIFF and (diff.base_version, diff.new_version) == (3, 4)
    # d04 holds v3, the DIFF's base: the retained model/current is all it needs
    assert _come_back(f, "d04") == [] and f.devices["d04"].version == 4
    # d03 holds v2: the coordinator sends it the FULL form on dev/d03/model, once
    (sent,) = _come_back(f, "d03")
    full = ModelUpdate.from_bytes(sent.payload, verify=V.unsigned())
    assert full.form == Form.FULL and full.new_version == 4 and not sent.retain
    d03 = f.devices["d03"]
    assert d03.version == 4 and d03.model_hash == f.coord.hash
    assert state_bytes(d03.base) == state_bytes(f.coord.state)
    f.round()  # and both train in the next round
    assert {"d03", "d04"} <= set(f.closed()[-1].accepted)
    # bytes down per round: the DIFF is smaller than the FULL form of the same version
    assert len(f.retained["model/current"]) < len(f.coord._full_payload())


def test_model_current_is_the_same_diff_after_a_restart(tmp_path):
    path = tmp_path / "fleet.db"
    f = Fleet(n=4, store=Store(path))
    f.boot()
    f.round()
    before = f.retained["model/current"]
    again = co.Coordinator(PLAN, Store(path), f.cfg, lambda: f.now, co.WireCodec(PLAN))
    (model,) = [o for o in again.handle(co.Boot()) if isinstance(o, Publish) and o.topic == "model/current"]
    assert model.payload == before and again.model_base == 1


def test_a_device_at_the_diff_base_is_not_sent_the_full_form():
    f = Fleet(n=2, cfg=config(goal=2))
    f.boot()
    f.round()
    status = f.devices["d00"].status()  # v2 now; pretend an older v1 status was still in flight
    old = status.payload.replace(b'"model_version":2', b'"model_version":1')
    assert not [o for o in f.send(co.Received("status", "d00", old)) if isinstance(o, Publish)]
    none = old.replace(b'"model_version":1', b'"model_version":0')
    (full,) = [o for o in f.send(co.Received("status", "d00", none)) if isinstance(o, Publish)]
    assert full.topic == "dev/d00/model"
    assert not f.send(co.Received("status", "d00", none))  # once per version (until the device's next hello)


# --- task.topk_permille: the coordinator asks devices for top-k deltas -------------------------------------


def test_task_topk_permille_makes_devices_send_top_k():
    f = Fleet(n=4, cfg=config(goal=4, topk_permille=100))
    f.boot()
    f.round()
    assert f.closed()[-1].committed
    total = sum(t.numel for t in PLAN.trainable)
    for _, payload in f.uplinks:  # NOTE: a tiny tensor (a bias) may still go dense: top-k only when it is smaller
        sent = sum(int(m.sum()) for m in delta_support(delta_from_bytes(payload), PLAN).values())
        assert sent <= 0.2 * total, (sent, total)


# --- fleet.mqtt.CoordinatorLink: batches of queued events, acknowledged after their transaction ----------------


class _FakeEndpoint:
    def __init__(self):
        self.published: list = []

    def start(self, timeout=None):
        pass

    def stop(self, graceful=True):
        pass

    def publish(self, topic, payload, retain=False):
        self.published.append(topic)


class _FakeCoordinator:
    def __init__(self, log, fail):
        self.log, self.fail = log, fail

    def handle(self, event):
        return self.handle_many([event])

    def handle_many(self, events):
        events = list(events)
        self.log.append([type(e).__name__ for e in events])
        if any(getattr(e, "payload", b"") == b"boom" for e in events) and self.fail:
            self.fail.pop()
            raise RuntimeError("store failed")
        return [Publish(f"dev/{e.device_id}/ack", b"{}") for e in events if isinstance(e, co.Received)]


def test_coordinator_link_batches_queued_messages_and_acks_after_commit():
    from device_agent.mqtt import BrokerURL
    from fleet.mqtt import CoordinatorLink

    log: list = []
    fail = [True]
    link = CoordinatorLink(BrokerURL.parse("mqtt://127.0.0.1:1"), "t", lambda: _FakeCoordinator(log, fail),
                           tick=60.0)
    link.endpoint = _FakeEndpoint()
    acked: list = []
    # queued before the driver thread starts: all of them are there for the first drain
    for i in range(5):
        link._on_message(f"tinyfleet/t/dev/d{i}/delta", b"x", lambda i=i: acked.append(i))
    link.start()
    assert link.call(lambda c: True)
    assert log[0][:5] == ["Received"] * 5 and acked == [0, 1, 2, 3, 4]  # one batch, then acknowledged
    # a batch that fails once (a transient store error): rebuilt and booted, then the message is handled again
    # on its own, succeeds and is acknowledged after that commit; the failure is logged
    link.call(lambda c: link._q.put(("event", co.Received("delta", "d9", b"boom"), lambda: acked.append(9))))
    assert link.call(lambda c: True)
    assert acked[-1] == 9 and link.errors and "batch of 1" in link.errors[-1]
    assert log[-1] == ["Received"] and not fail
    link.stop()


def test_a_device_that_cannot_train_is_a_dropout_and_the_round_closes_before_its_deadline():
    # Prepare: d00 has no samples, so it answers its task with a failed status
    f = Fleet(n=4)
    f.devices["d00"].buffer = SampleBuffer(64, PLAN.tensors[PLAN.input_id].shape)
    f.boot()
    # Execute: a round, without ever reaching the deadline
    f.now += 10.0
    f.send(co.StartRound())
    f.pump()
    # Assert: the round closed early with the three others, and the coordinator said why d00 was left out
    (closed,) = f.closed()
    assert closed.committed and closed.accepted == ("d01", "d02", "d03")
    (failed,) = [i for i in f.infos if isinstance(i, co.DeviceFailed)]
    assert (failed.device_id, failed.round_id, failed.reason) == ("d00", 1, "no_samples")


def test_a_refused_delta_is_acked_with_the_wire_error_in_detail():
    # Prepare
    from device_agent.wire.messages import Ack, parse

    f = Fleet()
    f.boot()
    f.now += 10.0
    f.send(co.StartRound())
    # Execute
    out = f.send(co.Received("delta", "d00", b"TFDL" + bytes(40)))
    # Assert: the device can learn why: lowercase reason, the reader's error in detail
    (ack,) = [parse(o.payload, Ack) for o in out if isinstance(o, Publish)]
    assert ack.reason == "malformed" and not ack.accepted and "WireError" in ack.detail


def test_a_flooding_device_is_rate_limited_before_decoding_and_the_others_are_not():
    # Prepare
    f = Fleet(n=3)
    f.boot()
    burst = int(f.cfg.control_limit.burst)
    # Execute: a flood of (undecodable) hellos from d00 at one instant, then one valid hello from d01
    outs = [f.send(co.Received("hello", "d00", b"[" * 900)) for _ in range(burst + 20)]
    other = f.send(co.Received("hello", "d01", b"{"))
    # Assert: about a burst was judged (refused as bad JSON; boot's hello and status used a few tokens), the rest
    # refused unread; d01 unaffected
    details = [o[0].detail for o in outs]
    judged = next(i for i, d in enumerate(details) if d.startswith("rate limited"))
    assert burst - 5 <= judged <= burst
    assert all(d.startswith("rate limited") for d in details[judged:])
    assert "rate limited" not in other[0].detail

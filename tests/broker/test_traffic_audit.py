"""Privacy audit of a real simulated run: every payload that crosses the broker is recorded by a wildcard
subscriber, and no device's raw samples (int8 as trained, or float32 as sensed) may appear in any of them.
The same run uses central DP, so it also checks that epsilon is reported per round and grows."""

from __future__ import annotations

import threading
import time

import numpy as np
import paho.mqtt.client as paho

from fleet.security.dp import DPConfig
from fleet.sim.config import load_sim_config
from tests.conftest import ROOT

CHUNK = 48  # bytes of a window that must not appear anywhere (a random int8 chunk this long never recurs by chance)


class Sniffer:
    """A paho v5 client on ``#`` (the embedded broker is anonymous) that keeps every (topic, payload)."""

    def __init__(self, url):
        self.seen: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="audit", protocol=paho.MQTTv5)
        self.c.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.c.on_subscribe = lambda *_: self.ready.set()
        self.c.on_message = lambda c, u, m: self.seen.append((m.topic, bytes(m.payload)))
        self.c.connect(url.host, url.port)
        self.c.loop_start()
        assert self.ready.wait(10), "sniffer could not subscribe"

    def stop(self, timeout: float = 10.0):
        """Publish a marker through the broker and stop once it came back: everything published before it has
        been delivered to this subscriber (one broker, QoS 1, in-order per publisher-subscriber pair)."""
        marker = f"tinyfleet/audit-marker/{time.monotonic_ns()}"
        self.c.publish(marker, b"end", qos=1)
        deadline = time.monotonic() + timeout
        while not any(t == marker for t, _ in self.seen) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.c.loop_stop()
        self.c.disconnect()
        assert any(t == marker for t, _ in self.seen), "the audit marker never came back"
        self.seen = [(t, p) for t, p in self.seen if t != marker]


def leaks(payloads: list[bytes], windows: list[np.ndarray]) -> list[int]:
    """Indices of windows whose int8 bytes or float32 bytes occur in any payload."""
    blob = b"\x00".join(payloads)
    found = []
    for i, w in enumerate(windows):
        raw = np.ascontiguousarray(w).tobytes()
        pieces = [raw[o:o + CHUNK] for o in range(0, len(raw) - CHUNK + 1, len(raw) // 4 or 1)]
        if any(p in blob for p in pieces):
            found.append(i)
    return found


def test_no_raw_sample_crosses_the_broker_and_dp_epsilon_is_reported(broker, tmp_path):
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.plan import plan_from_bytes
    from fleet.scenarios.base import quantize
    from fleet.scenarios.watch import load_watch_scenario
    from fleet.sim.runner import _input_quant, run_simulation

    cfg = load_sim_config(ROOT / "configs/quickstart.yaml", broker=f"mqtt://{broker.url.host}:{broker.url.port}",
                          devices=4, rounds=2, local_steps=10)
    cfg.model.pretrain_epochs = 1
    cfg.dataset.max_train_per_device = 40
    cfg.personal = []
    cfg.dp = DPConfig(clip=2.0, noise_multiplier=1.0)
    sniffer = Sniffer(broker.url)
    try:
        res = run_simulation(cfg, tmp_path / "run", progress=False)
    finally:
        sniffer.stop()
    assert res.rounds == 2 and res.round_status == ["committed", "committed"], res.errors

    # Prepare: what each device holds privately, in the plan's input quantization (the plan is on the wire)
    kinds = {t.split("/")[-1] if "/dev/" in t else t.split("/")[2] for t, _ in sniffer.seen}
    assert {"hello", "status", "task", "delta", "ack", "model", "plan"} <= kinds, kinds
    (plan_blob,) = {p for t, p in sniffer.seen if "/plan/" in t}
    scale, zp = _input_quant(plan_from_bytes(plan_blob, verify=Verifier.skip()))
    d = cfg.dataset
    scenario = load_watch_scenario(cfg.devices, d.window, d.stride, tuple(d.proxy_subjects),
                                   d.max_train_per_device, cfg.seed)
    windows = [w for dd in scenario.devices for x in (dd.x_train, dd.x_test) for w in
               [*quantize(x, scale, zp), *x.astype(np.float32)]]
    assert len(windows) > 100

    # Execute + Assert: nothing private in any payload ...
    payloads = [p for _, p in sniffer.seen]
    assert sum(len(p) for t, p in sniffer.seen if t.endswith("/delta")) > 0
    assert leaks(payloads, windows) == []
    # ... and the audit does catch a payload that carries a sample (so it can fail)
    planted = payloads[0] + np.ascontiguousarray(windows[7]).tobytes()[:100] + payloads[-1]
    assert leaks([*payloads, planted], windows) == [7]

    # DP: epsilon per committed round, cumulative
    assert len(res.epsilon_per_round) == 2 and 0 < res.epsilon_per_round[0] < res.epsilon_per_round[1]
    assert res.aggregator == "dp"
    assert "DP epsilon (cumulative)" in (tmp_path / "run" / "index.html").read_text()


def personal_pieces(personal: dict, held: dict) -> list[bytes]:
    """Byte pieces of a device's personal model that differ from the model it holds from the fleet: each
    CHUNK-long piece (or the whole tensor when shorter) that has at least one value the shared model lacks."""
    out = []
    for tid, p in personal.items():
        g = held[tid]
        if np.array_equal(p, g):
            continue
        pb, gb = np.ascontiguousarray(p).tobytes(), np.ascontiguousarray(g).tobytes()
        n = min(CHUNK, len(pb))
        out += [pb[o:o + n] for o in range(0, len(pb) - n + 1, max(1, n // 2)) if pb[o:o + n] != gb[o:o + n]]
    return out


def test_personal_models_never_cross_the_broker(broker, tmp_path):
    # Prepare: devices personalize with Ditto; one device's SRAM affords only a smaller method (fallback)
    from fleet.sim.runner import run_simulation

    cfg = load_sim_config(ROOT / "configs/quickstart.yaml", broker=f"mqtt://{broker.url.host}:{broker.url.port}",
                          devices=5, rounds=2, local_steps=10)
    cfg.model.pretrain_epochs = 1
    cfg.dataset.max_train_per_device = 40
    cfg.personal, cfg.baselines, cfg.new_users = [], [], 1
    cfg.personalization.method, cfg.personalization.steps, cfg.personalization.lr = "ditto", 15, 0.1
    cfg.personalization.device_sram = [1_000_000, 1_000_000, 1_000_000, 7_100]  # bytes
    cfg.continual.prequential = False
    held: list = []

    def probe(agents):
        for a in agents:
            held.append((a.protocol.trainer.trainable_state(), a.protocol.personal_model()))

    sniffer = Sniffer(broker.url)
    try:
        res = run_simulation(cfg, tmp_path / "run", progress=False, probe=probe)
    finally:
        sniffer.stop()
    assert res.rounds == 2 and res.errors == [], res.errors
    # the plan takes 5760 B; Ditto and fine-tuning add the sparse set (1404 B: Ditto's reference is the stored
    # update), a head less: 7100 B affords only the head
    assert res.personal_methods == {"ditto": 3, "head": 1}

    # Execute: the personal values of every device (where they differ from the shared model)
    pieces = [p for shared, personal in held for p in personal_pieces(personal, shared)]
    assert len(pieces) > 10  # the devices did personalize

    # Assert: none of them is in any payload, and the check can fail (a planted piece is found)
    blob = b"\x00".join(p for _, p in sniffer.seen)
    assert not [p for p in pieces if p in blob]
    assert [p for p in pieces if p in blob + pieces[3]] == [pieces[3]] or pieces.count(pieces[3]) > 1
    assert "new_users_ditto" in res.accuracy_mean_per_device and len(held) == 4

"""``flwr run`` against a real ``flower-superlink``: the ready-made ServerApp (``fleet.flower_app:app``) drives
signed host devices over a real Mosquitto; a second run continues on the same devices without restarting them;
FedMedian's aggregate equals a numpy median of what the devices sent; the final model is saved and published."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, require, require_cmd

BIN = Path(sys.executable).parent
N_DEVICES = 3


class FlowerSetup:
    """Mosquitto, a SuperLink (deployment mode), a Flower app project using fleet.flower_app, the fleet key,
    and three host devices that verify it (``DeviceAgent`` + the engine trainer, as ``device-agent run``)."""

    def __init__(self, tmp: Path):
        from device_agent.buffer import SampleBuffer
        from device_agent.engine.trainer import Trainer
        from device_agent.mqtt import DeviceAgent
        from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
        from device_agent.wire.envelope import Verifier
        from device_agent.wire.plan import plan_to_bytes
        from fleet.serve import load_or_create_key
        from fleet.sim.broker import EmbeddedBroker, free_port, wait_for_port
        from tests.fixtures.tiny import tiny_dataset, tiny_plan

        self.tmp, self.started = tmp, []
        (tmp / "broker").mkdir()
        self.broker = EmbeddedBroker(workdir=tmp / "broker").start()
        self.started.append(self.broker.close)
        self.plan = plan = tiny_plan()
        (tmp / "plan.ttp").write_bytes(plan_to_bytes(plan, None))
        key = load_or_create_key(tmp / "fleet.key.pem")
        x, y = tiny_dataset(120, seed=1000)
        np.savez(tmp / "eval.npz", x=x, y=y)
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        self.app = tmp / "app"
        self.app.mkdir()
        (self.app / "pyproject.toml").write_text(APP_TOML.format(tmp=tmp, url=self.broker.url))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_HOME": str(self.home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open(tmp / "superlink.log", "w") as log:
            self.superlink = subprocess.Popen(
                [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess", "--port", str(port),
                 "--disable-runtime-dependency-installation", "--database", str(tmp / "superlink.db")],
                env=self.env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self.started.append(self._stop_superlink)
        assert wait_for_port("127.0.0.1", port, 30, self.superlink), (tmp / "superlink.log").read_text()[-2000:]
        # the devices: a run publishes the signed plan, devices built from the same plan verify every model
        self.sent: dict[int, dict[str, tuple[dict, bytes]]] = {}  # round -> device -> (base, delta payload)
        self.agents, self.protos = [], []
        for i in range(N_DEVICES):
            dx, dy = tiny_dataset(48, seed=i)
            buf = SampleBuffer(64, dx.shape[1:], np.int8, seed=i)
            buf.add(dx, dy)
            proto = DeviceProtocol(Identity(f"d{i}", "host", 1 << 20, 1 << 20), plan, Trainer(plan),
                                   WireDeviceCodec(plan, Verifier.ed25519(key.public_key())), buf, seed=i)
            self._record(proto)
            self.protos.append(proto)
            self.agents.append(DeviceAgent(self.broker.url, "e2e", proto, will_delay=0).start())
            self.started.append(self.agents[-1].stop)

    def _record(self, proto) -> None:
        inner = proto.handle

        def handle(ev):
            base = {k: v.copy() for k, v in proto.base.items()}
            before = proto.counter
            out = inner(ev)
            if proto.counter != before:
                self.sent.setdefault(proto.last_round, {})[proto.id.device_id] = (base, proto.last_delta)
            return out
        proto.handle = handle

    def _stop_superlink(self) -> None:
        os.killpg(self.superlink.pid, signal.SIGTERM)  # the SuperLink and the ServerApp processes it started
        try:
            self.superlink.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.superlink.pid, signal.SIGKILL)

    def close(self) -> None:
        for stop in reversed(self.started):
            stop()

    def flwr(self, *args: str, timeout: float = 60) -> dict:
        p = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], check=False, cwd=self.app, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)

    def run(self, *overrides: str, timeout: float = 90) -> tuple[str, str]:
        """``flwr run . e2e --run-config ...`` until the run finishes: (run id, final status)."""
        args = ["run", ".", "e2e"] + [a for o in overrides for a in ("--run-config", o)]
        run_id = str(self.flwr(*args)["run-id"])
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = self.flwr("ls", "e2e", "--run-id", run_id)["runs"][0]["status"]
            if status.startswith("finished"):
                return run_id, status
            time.sleep(0.5)
        pytest.fail(f"run {run_id} did not finish in {timeout} s: {self.log(run_id)[-3000:]}")

    def log(self, run_id: str) -> str:
        p = subprocess.run([str(BIN / "flwr"), "log", run_id, "e2e", "--show"], check=False, cwd=self.app, env=self.env,
                           capture_output=True, text=True, timeout=30)
        return p.stdout + p.stderr


APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyfleet-e2e"
version = "1.0.0"
dependencies = ["flwr==1.42.*", "tinyfleet"]

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "fleet.flower_app:app"
clientapp = "fleet.flower_app:client_app"

[tool.flwr.app.config]
plan = "{tmp}/plan.ttp"
key = "{tmp}/fleet.key.pem"
broker = "{url}"
fleet = "e2e"
strategy = "FedAvg"
num-rounds = 2
min-nodes = 3
lr = 0.2
local-steps = 8
batch-size = 8
round-timeout = 30
eval-data = "{tmp}/eval.npz"
final-model = "{tmp}/final.npz"
"""


@pytest.fixture
def setup(tmp_path):
    require_cmd("mosquitto")
    require((BIN / "flower-superlink").exists() and (BIN / "flwr").exists(), "flwr's CLIs not in the venv")
    s = FlowerSetup(tmp_path)
    try:
        yield s
    finally:
        s.close()


def held(s: FlowerSetup, want: tuple[int, str], timeout: float = 10.0) -> set[tuple[int, str]]:
    """The (version, model hash) pairs the devices hold, once all hold ``want`` or at ``timeout``."""
    end = time.monotonic() + timeout
    while {(p.version, p.model_hash) for p in s.protos} != {want} and time.monotonic() < end:
        time.sleep(0.05)
    return {(p.version, p.model_hash) for p in s.protos}


def saved(path: Path) -> tuple[int, str, dict[str, np.ndarray]]:
    with np.load(path) as z:
        return (int(z["tinyfleet-version"]), str(z["tinyfleet-model-hash"]),
                {k: z[k] for k in z.files if not k.startswith("tinyfleet-")})


def test_two_flwr_runs_on_the_same_signed_devices_fedmedian_equals_numpy(setup):
    from device_agent.wire.update import model_hash
    from fleet.coordinator import WireCodec
    from fleet.flower import shared_tensors

    s = setup
    shared = shared_tensors(s.plan)
    codec = WireCodec(s.plan)

    # run 1: FedAvg, 2 rounds; every model the devices took was signed with the fleet key (they verify)
    run1, status = s.run()
    assert status == "finished:completed", s.log(run1)[-3000:]
    v1, h1, arrays1 = saved(s.tmp / "final.npz")
    assert sorted(s.sent) == [1, 2] and all(len(s.sent[r]) == N_DEVICES for r in (1, 2))
    assert v1 == 3 and held(s, (v1, h1)) == {(v1, h1)}  # plan values v1, two aggregates; the final one reached every device
    state1 = {t.id: arrays1[t.name] for t in shared}
    assert model_hash(s.plan, state1, v1).hex() == h1
    assert "accuracy" in s.log(run1)

    # run 2, same devices, not restarted: FedMedian, one round; round ids and versions continue
    run2, status = s.run("strategy='FedMedian' num-rounds=1")
    assert status == "finished:completed", s.log(run2)[-3000:]
    v2, h2, arrays2 = saved(s.tmp / "final.npz")
    assert sorted(s.sent) == [1, 2, 3] and len(s.sent[3]) == N_DEVICES
    assert v2 == v1 + 1 and held(s, (v2, h2)) == {(v2, h2)}
    for base, _ in s.sent[3].values():  # the round trained on run 1's final model
        assert all(np.array_equal(base[t.id], state1[t.id]) for t in shared)

    # FedMedian against numpy: coordinate median of the devices' updated models, round half up, int range
    votes = []
    for base, payload in s.sent[3].values():
        d = codec.decode_delta(payload, hashlib.sha256(payload).hexdigest())
        votes.append({t.id: base[t.id].astype(np.float64) + np.where(d.masks[t.id], d.values[t.id], 0)
                      for t in shared})
    for t in shared:
        med = np.floor(np.median(np.stack([v[t.id] for v in votes]), axis=0) + 0.5)
        lo, hi = (-127, 127) if arrays2[t.name].dtype == np.int8 else (-(2**31), 2**31 - 1)
        np.testing.assert_array_equal(arrays2[t.name], np.clip(med, lo, hi).astype(arrays2[t.name].dtype))
    assert any(not np.array_equal(arrays2[t.name], arrays1[t.name]) for t in shared)

"""Flower side by side: the same scenario run by Flower (PyTorch fp32 clients, stock dense FedAvg) and by us.

One command: ``python benchmarks/flower_baseline.py [--config configs/sensor-watch.yaml] [--rounds R]
[--devices N] [--flower-lr 0.002] [--engine local|simulation] [--quick]``.

Same scenario for both, from one config: the watch IMU data split over the same devices
(``fleet.scenarios.watch.load_watch_scenario`` with the config's window, stride, proxy subjects and seed), the same
ImuCNN pretrained on the proxy subjects (``fleet.compiler.pipeline.pretrain``: the float model our plan is compiled
from), the same rounds, clients per round (the config's ``goal``) and local steps (batch 1).

- ours: ``tinyfleet simulate`` on the config (``run_simulation``: embedded Mosquitto, int8 sparse training on host
  devices, sparse int8 deltas). Bytes = the MQTT payload bytes the devices measured, per selected device per
  round; memory = the plan's arena + trainable bytes (``plan_sram``: what a board needs to train).
- Flower (``flwr`` 1.42): a ``ClientApp`` training the whole fp32 model with SGD, stock
  ``flwr.serverapp.strategy.FedAvg`` (``fraction_train`` = goal / devices, no client evaluation; the server
  evaluates the global model on every device's test slice). ``--engine local`` (default): the strategy drives
  the ClientApps in this process through a small ``flwr.serverapp.Grid`` (:class:`LocalGrid`) that serializes
  every instruction and reply with Flower's own protobuf serde (``message_to_proto``) and hands the ClientApp the
  deserialized copy. ``--engine simulation``: Flower's own simulation engine (``flwr.simulation.run_simulation``,
  Ray actors, one CPU each; needs the ``flower-simulation`` extra, which ``make setup`` installs), with the same
  ServerApp strategy and ClientApp; its node sampling draws other node ids, so its runs are not identical to the
  local engine's. Either way the bytes reported are the serialized messages' sizes. BatchNorm layers keep the pretrained statistics (eval mode) while training:
  batch-1 batch statistics would be per-sample. Client memory: a fresh process trains one client's round
  (``peak_rss``) and a tensor floor (parameters + gradients + autograd-saved tensors of one step).

Accuracy is pooled over every device's held-out windows, after the last round. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from flwr.serverapp import Grid

from benchmarks.common import ROOT, emit

# NOTE: the config's lr (0.05) is in our int8 update's units; fp32 SGD at batch 1 diverges with it (one client's
# 20 steps: accuracy 0.667 -> 0.110; 0.01 -> 0.436; 0.002 -> 0.620, measured on the 10-device split)
FLOWER_LR = 0.002


def load_config(args):
    from fleet.sim.config import load_sim_config

    over = {"devices": args.devices, "rounds": args.rounds, "local_steps": args.steps, "baselines": []}
    if args.quick:
        over.update(devices=args.devices or 8, rounds=args.rounds or 2, local_steps=args.steps or 10, goal=4,
                    deadline=60)
    return load_sim_config(args.config, **over)


def scenario_and_model(cfg):
    from fleet.compiler.pipeline import pretrain
    from fleet.scenarios.watch import load_watch_scenario

    d = cfg.dataset
    sc = load_watch_scenario(cfg.devices, d.window, d.stride, tuple(d.proxy_subjects), d.max_train_per_device,
                             cfg.seed)
    x_proxy, y_proxy = (sc.x_proxy, sc.y_proxy) if len(sc.y_proxy) else (sc.devices[0].x_train, sc.devices[0].y_train)
    return sc, pretrain(cfg, x_proxy, y_proxy, sc.num_classes)


def local_train(model, x: np.ndarray, y: np.ndarray, steps: int, lr: float, seed: list[int]):
    """``steps`` SGD steps of batch 1 on (x, y) (float windows (N, C, 1, W)); BatchNorm statistics frozen."""
    import torch

    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.eval()
    for _ in range(steps):
        i = int(rng.integers(len(y)))
        xb = torch.tensor(x[i:i + 1].reshape(1, x.shape[1], x.shape[-1]))  # a copy: Ray hands read-only arrays
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), torch.from_numpy(y[i:i + 1])).backward()
        opt.step()


class LocalGrid(Grid):
    """A ``flwr.serverapp.Grid`` that runs ``app`` (a ClientApp) for each instruction, in this process."""

    def __init__(self, app, n: int):
        from flwr.app import Context, RecordDict
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        self.app, self.replies, self.sizes = app, {}, {"down": [], "up": []}
        self.nodes = list(range(100, 100 + n))
        self.contexts = {nid: Context(1, nid, {"partition-id": i}, RecordDict(), {}) for i, nid in enumerate(self.nodes)}
        self._run = Run.create_empty(1)
        try:
            TaskIdentity.run_id  # noqa: B018
        except RuntimeError:
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from flwr.common.serde import message_from_proto, message_to_proto

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # NOTE: as Flower's own grids (no public setter)
            wire = message_to_proto(m).SerializeToString()
            self.sizes["down"].append(len(wire))
            from flwr.proto.message_pb2 import Message as ProtoMessage

            proto = ProtoMessage()
            proto.ParseFromString(wire)
            reply = self.app(message_from_proto(proto), self.contexts[m.metadata.dst_node_id])
            self.sizes["up"].append(len(message_to_proto(reply).SerializeToString()))
            self.replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def run_flower(cfg, sc, model0, lr: float, engine: str = "local") -> dict:
    import copy

    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        d = sc.devices[pid]
        model = copy.deepcopy(model0)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        rnd = int(msg.content["config"]["server-round"])
        local_train(model, d.x_train, d.y_train, cfg.local_steps, lr, [cfg.seed + pid, rnd])
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": d.n_train})}), reply_to=msg)

    x_test, y_test = sc.test_set()
    xt = torch.from_numpy(x_test.reshape(len(x_test), x_test.shape[1], x_test.shape[-1]))
    accs: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        m = copy.deepcopy(model0)
        m.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            acc = float((m.eval()(xt).argmax(1).numpy() == y_test).mean())
        accs.append(acc)
        return MetricRecord({"accuracy": acc})

    random.seed(cfg.seed)  # FedAvg samples nodes with `random`
    torch.manual_seed(cfg.seed)
    n, k = cfg.devices, cfg.goal_count
    strategy = FedAvg(fraction_train=k / n, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=n)
    sizes: dict[str, list[int]] = {"down": [], "up": []}
    t0 = time.monotonic()
    if engine == "local":
        grid = LocalGrid(app, n)
        sizes = grid.sizes
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model0.state_dict()), num_rounds=cfg.rounds,
                       evaluate_fn=evaluate)
        backend = "in-process LocalGrid driving a ClientApp (flwr serde; Ray not used)"
    else:
        _run_on_simulation_engine(app, strategy, ArrayRecord(model0.state_dict()), evaluate, cfg, sizes)
        backend = "flwr.simulation.run_simulation (Ray actors, 1 CPU each)"
    sec = time.monotonic() - t0
    params = sum(p.numel() for p in model0.parameters())
    return {"accuracy_initial": accs[0], "accuracy_per_round": accs[1:], "accuracy_final": accs[-1],
            "bytes_down_per_device_round": float(np.mean(sizes["down"])),
            "bytes_up_per_device_round": float(np.mean(sizes["up"])),
            "clients_per_round": len(sizes["up"]) / cfg.rounds, "parameters": params,
            "fp32_parameter_bytes": params * 4, "seconds": sec, "lr": lr, "engine": engine, "backend": backend}


def _run_on_simulation_engine(app, strategy, initial, evaluate, cfg, sizes: dict[str, list[int]]) -> None:
    """``strategy`` on Flower's simulation engine; the Grid it hands the ServerApp is wrapped to record the
    serialized size of every instruction and reply."""
    from flwr.app import Context
    from flwr.common.serde import message_to_proto
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    def size(m) -> int:
        return len(message_to_proto(m).SerializeToString())

    class MeasuredGrid(Grid):
        def __init__(self, inner: Grid):
            self.inner = inner

        def set_run(self, run_id: int) -> None:
            self.inner.set_run(run_id)

        @property
        def run(self):
            return self.inner.run

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

        def get_node_ids(self):
            return self.inner.get_node_ids()

        def push_messages(self, messages):
            messages = list(messages)
            sizes["down"] += [size(m) for m in messages]
            return self.inner.push_messages(messages)

        def pull_messages(self, message_ids):
            replies = list(self.inner.pull_messages(message_ids))
            sizes["up"] += [size(m) for m in replies if not m.has_error()]
            return replies

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            sizes["down"] += [size(m) for m in messages]
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
            sizes["up"] += [size(m) for m in replies if not m.has_error()]
            return replies

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid=MeasuredGrid(grid), initial_arrays=initial, num_rounds=cfg.rounds, evaluate_fn=evaluate)

    run_simulation(server_app=server, client_app=app, num_supernodes=cfg.devices,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if len(sizes["up"]) != cfg.rounds * cfg.goal_count:
        raise SystemExit(f"flower_baseline: the simulation engine returned {len(sizes['up'])} replies, "
                         f"{cfg.rounds} x {cfg.goal_count} expected (see Flower's log above)")


def client_memory(config: Path, devices: int, steps: int, lr: float) -> dict:
    """One Flower client's round in a fresh process: peak RSS, and the fp32 tensor floor of one step."""
    out = subprocess.run([sys.executable, __file__, "--child-mem", str(config), str(devices), str(steps), str(lr)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_mem(config: str, devices: int, steps: int, lr: float) -> None:
    import resource

    import torch

    from fleet.sim.config import load_sim_config

    torch.set_num_threads(1)
    cfg = load_sim_config(config, devices=devices, goal=1, baselines=[])  # goal: irrelevant here
    cfg.model.pretrain_epochs = 0  # NOTE: memory does not depend on the weights' values
    sc, model = scenario_and_model(cfg)
    d = sc.devices[0]
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        local_train(model, d.x_train, d.y_train, 1, lr, [0])
    local_train(model, d.x_train, d.y_train, steps, lr, [1])
    params = sum(p.numel() * 4 for p in model.parameters())
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "tensor_floor_bytes": 2 * params + sum(saved.values()), "param_bytes": params,
                      "saved_activation_bytes": sum(saved.values())}))


def run_ours(cfg) -> dict:
    from fleet.sim.runner import run_simulation

    t0 = time.monotonic()
    r = run_simulation(cfg, progress=False)
    if not r.rounds:
        raise SystemExit(f"flower_baseline: our run did not finish a round: {r.errors}")
    return {"accuracy_initial": r.accuracy_initial, "accuracy_per_round": r.accuracy_per_round,
            "accuracy_final": r.accuracy_per_round[-1],
            "accuracy_personalized_final": (r.accuracy_personalized_per_round or [None])[-1],
            "bytes_down_per_device_round": float(np.mean(r.payload_down_per_device_round)),
            "bytes_up_per_device_round": float(np.mean(r.payload_up_per_device_round)),
            "mqtt_bytes_down_per_device_round": float(np.mean(r.bytes_down_per_device_round)),
            "mqtt_bytes_up_per_device_round": float(np.mean(r.bytes_up_per_device_round)),
            "clients_per_round": float(np.mean(r.devices_per_round)), "client_memory_bytes": r.plan_sram_bytes,
            "round_status": r.round_status, "seconds": time.monotonic() - t0, "scheme": r.scheme,
            "errors": r.errors[:5]}


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--child-mem":
        _child_mem(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "sensor-watch.yaml")
    ap.add_argument("--devices", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int, help="local steps (batch 1) per client per round")
    ap.add_argument("--flower-lr", type=float, default=FLOWER_LR, help="SGD learning rate of the fp32 clients")
    ap.add_argument("--engine", choices=("local", "simulation"), default="local",
                    help="Flower side: in-process LocalGrid, or Flower's simulation engine (Ray)")
    ap.add_argument("--quick", action="store_true", help="8 devices, 2 rounds, 10 steps, 4 clients per round")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # NOTE: one core per client, as a simulated device; 2 shared cores thrash otherwise
    cfg = load_config(args)
    lr = args.flower_lr
    sc, model0 = scenario_and_model(cfg)
    flower = run_flower(cfg, sc, model0, lr, args.engine)
    flower.update(client_memory(args.config, cfg.devices, cfg.local_steps, lr))
    flower["client_memory_bytes"] = flower["tensor_floor_bytes"]
    ours = run_ours(cfg)
    result = {"config": str(args.config.name), "devices": cfg.devices, "rounds": cfg.rounds,
              "clients_per_round": cfg.goal_count, "local_steps": cfg.local_steps, "ours": ours, "flower": flower,
              "bytes_up_flower_over_ours": flower["bytes_up_per_device_round"] / ours["bytes_up_per_device_round"],
              "bytes_down_flower_over_ours":
                  flower["bytes_down_per_device_round"] / ours["bytes_down_per_device_round"],
              "client_memory_flower_over_ours": flower["client_memory_bytes"] / ours["client_memory_bytes"]}
    rows = [(name, f"{s['accuracy_initial']:.3f}", f"{s['accuracy_final']:.3f}",
             f"{s['bytes_up_per_device_round']:.0f}", f"{s['bytes_down_per_device_round']:.0f}",
             f"{s['client_memory_bytes'] / 1000:.1f}", f"{s['seconds']:.1f}")
            for name, s in (("tinyfleet int8 sparse", ours), ("flower fp32 FedAvg", flower))]
    emit(result, rows, ("system", "acc initial", "acc final", "up B/dev/round", "down B/dev/round",
                        "client mem KB", "seconds"))
    return 0 if all(s == "committed" for s in ours["round_status"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Mixed-memory fleets: what nested plans buy over leaving small devices out or shrinking everyone's plan.

One command: ``python benchmarks/mixed_fleet.py [--seeds 0,1,2] [--rounds 6] [--steps 50] [--lr 0.01]
[--srams 256000,33000,29000] [--quick]``.

The model, scheme and budgets are configs/fleet-mixed.yaml's (watch IMU scenario, ImuCNN, scheme ``full``,
``plan_budgets: [28KB, 32KB, 36KB, 256KB]``); the fleet is the scenario's 10 devices with SRAM cycling 256 KB /
33 KB / 29 KB (4 large, 3 mid, 3 small; ``--srams`` another cycle). Three arms, each on the same pretrained model, data and seed:

- ``mixed``: every device trains the largest nested plan that fits its SRAM (the family);
- ``drop_small``: one plan, the largest; the smaller devices are refused (``no_plan_fits``) and never train;
- ``smallest``: one plan, the family's smallest (what fits every device), for everyone.

Accuracy is the global model's (the arm's largest plan with the coordinator's state) on the scenario's held-out
test set, after every round; the final one is averaged over seeds with a 95% t interval, and so is the paired
per-seed difference of the mixed arm to each other arm (``mixed_minus_<arm>``: [mean, interval]). Devices are host engines
(``device_agent.engine.Trainer``) driven by the real coordinator (``fleet.coordinator``: FamilyCodec, round
machine, FedAvg) and the real device protocol through an in-memory link, without a broker: the plans are the same
ones ``tinyfleet simulate configs/fleet-mixed.yaml`` gives its QEMU boards and host devices (compiled once per
seed). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, quick, t_interval

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fleet-mixed.yaml"
SRAMS = (256_000, 33_000, 29_000)
ARMS = ("mixed", "drop_small", "smallest")


class Link:
    """FIFO delivery between one coordinator and its devices (what the broker does, minus the network)."""

    def __init__(self, coord, devices: dict):
        self.coord, self.devices, self.queue = coord, devices, deque()
        self.infos: list = []

    def to_devices(self, outs) -> None:
        from device_agent import protocol as dp
        from device_agent.wire.messages import Publish

        for o in outs:
            if not isinstance(o, Publish):
                self.infos.append(o)
                continue
            parts = o.topic.split("/")
            if parts[0] == "dev" and parts[1] in self.devices:
                self.queue.append((parts[1], dp.Received(parts[2], o.payload)))
            elif parts[0] == "model":
                self.queue.extend((d, dp.Received("model", o.payload)) for d in sorted(self.devices))

    def to_coord(self, outs) -> None:
        from device_agent.wire.messages import Publish
        from fleet import coordinator as co

        for o in outs:
            if isinstance(o, Publish):
                _, did, kind = o.topic.split("/")
                self.queue.append((None, co.Received(kind, did, o.payload)))

    def pump(self) -> None:
        while self.queue:
            dev, ev = self.queue.popleft()
            if dev is None:
                self.to_devices(self.coord.handle(ev))
            else:
                self.to_coord(self.devices[dev].handle(ev))


def run_arm(family, scenario, srams: list[int], args, seed: int, xq_test, y_test) -> dict:
    """One fleet of ``family`` for ``args.rounds`` rounds; accuracy per round and who trained what."""
    from device_agent import protocol as dp
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.envelope import Verifier
    from fleet import coordinator as co
    from fleet.round import RoundConfig
    from fleet.scenarios.base import quantize
    from fleet.store import Store

    plan = family.largest.plan
    t = plan.tensors[plan.input_id]
    scale, zp = float(np.ravel(t.scale)[0]), int(t.zero_point)
    now = [0.0]
    # NOTE: the goal is the devices that can train in this arm (a fleet leaving small devices out sets its goal
    # by the devices it keeps), so a round commits whenever at least half of them delivered
    goal = max(1, sum(family.choose(s) is not None for s in srams))
    cfg = co.CoordinatorConfig(round=RoundConfig(goal=goal, quorum=0.5, deadline_s=100.0, seed=seed),
                               lr=args.lr, local_steps=args.steps, batch_size=1)
    coord = co.Coordinator(plan, Store(), cfg, lambda: now[0], co.FamilyCodec(family))
    devices = {}
    for i, (dd, sram) in enumerate(zip(scenario.devices, srams)):
        m = family.choose(sram) or family.smallest  # an unfit device holds a plan it is never asked to train
        buf = SampleBuffer(max(1, dd.n_train), tuple(scenario.input_shape), np.int8, seed=seed * 1000 + i)
        if dd.n_train:
            buf.add(quantize(dd.x_train, scale, zp), dd.y_train.astype(np.int32))
        devices[dd.device_id] = dp.DeviceProtocol(dp.Identity(dd.device_id, "host", sram, 1_000_000), m.plan,
                                                  Trainer(m.plan), dp.WireDeviceCodec(m.plan, Verifier.unsigned()),
                                                  buf, seed=seed * 1000 + i)
    link = Link(coord, devices)
    link.to_devices(coord.handle(co.Boot()))
    for d in devices.values():
        link.to_coord(d.handle(dp.Start()))
    link.pump()
    evaluator = Trainer(plan)

    def accuracy() -> float:
        evaluator.load_trainable(coord.state)
        return float(evaluator.evaluate(xq_test, y_test))

    accs, trained = [], []
    for _ in range(args.rounds):
        now[0] += 1.0
        link.to_devices(coord.handle(co.StartRound()))
        link.pump()
        now[0] += 200.0
        link.to_devices(coord.handle(co.Tick()))
        link.pump()
        closed = [i for i in link.infos if isinstance(i, co.RoundClosed)][-1]
        trained.append(len(closed.accepted) if closed.committed else 0)
        accs.append(accuracy())
    unfit = sum(isinstance(i, co.Unfit) for i in link.infos)
    return {"accuracy": accs, "trained_per_round": trained, "refused": unfit,
            "plans": sorted({(family.choose(s).budget if family.choose(s) else 0) for s in srams})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=50, help="local steps (batch 1) per device per round")
    p.add_argument("--lr", type=float, default=None, help="default: the config's")
    p.add_argument("--srams", default=",".join(str(v) for v in SRAMS),
                   help="SRAM bytes per device, cycled over the scenario's devices (default 4 large, 3 mid, 3 small)")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 10 steps")
    args = p.parse_args()
    if quick():
        args.seeds, args.rounds, args.steps = "0", 2, 10

    from fleet.compiler.family import PlanFamily
    from fleet.compiler.pipeline import build_family
    from fleet.scenarios import load_scenario
    from fleet.scenarios.base import quantize
    from fleet.sim.config import load_sim_config

    seeds = [int(s) for s in args.seeds.split(",")]
    cycle = [int(v) for v in args.srams.split(",")]
    finals: dict[str, list[float]] = {a: [] for a in ARMS}
    per_seed: list[dict] = []
    t0 = time.monotonic()
    for seed in seeds:
        cfg = load_sim_config(CONFIG, devices=10, device_groups=[], seed=seed)
        args.lr = cfg.lr if args.lr is None else args.lr
        scenario = load_scenario(cfg)
        srams = [cycle[i % len(cycle)] for i in range(len(scenario.devices))]
        family = build_family(cfg, scenario)
        plan = family.largest.plan
        t = plan.tensors[plan.input_id]
        x_test, y_test = scenario.test_set()
        xq_test = quantize(x_test, float(np.ravel(t.scale)[0]), int(t.zero_point))
        y_test = y_test.astype(np.int32)
        arms = {"mixed": family, "drop_small": PlanFamily([family.largest]),
                "smallest": PlanFamily([family.smallest])}
        row = {"seed": seed, "needs": [m.need for m in family.members], "budgets": [m.budget for m in family.members]}
        for name, fam in arms.items():
            r = run_arm(fam, scenario, srams, args, seed, xq_test, y_test)
            row[name] = r
            finals[name].append(r["accuracy"][-1])
            print(f"seed {seed} {name:<10} acc/round {[round(a, 3) for a in r['accuracy']]} trained "
                  f"{r['trained_per_round']} refused {r['refused']}", file=sys.stderr)
        per_seed.append(row)
    result = {"benchmark": "mixed_fleet", "seeds": seeds, "rounds": args.rounds, "local_steps": args.steps,
              "lr": args.lr, "devices": 10, "srams": cycle, "seconds": round(time.monotonic() - t0, 1),
              "budgets": per_seed[0]["budgets"], "needs": per_seed[0]["needs"]}
    rows = []
    for name in ARMS:
        lo, hi = t_interval(finals[name])
        result[f"{name}_final_mean"] = round(float(np.mean(finals[name])), 4)
        result[f"{name}_final_ci95"] = [round(lo, 4), round(hi, 4)]
        result[f"{name}_final"] = [round(v, 4) for v in finals[name]]
        rows.append((name, f"{np.mean(finals[name]):.3f}", f"[{lo:.3f}, {hi:.3f}]",
                     " ".join(f"{v:.3f}" for v in finals[name])))
    for other in ARMS[1:]:  # NOTE: every arm runs on the same seeds, data and pretrained model: compare per seed
        diff = [a - b for a, b in zip(finals["mixed"], finals[other])]
        result[f"mixed_minus_{other}"] = [round(float(np.mean(diff)), 4), t_interval(diff)]
        rows.append((f"mixed - {other}", f"{np.mean(diff):+.3f}", "[{:+.3f}, {:+.3f}]".format(*t_interval(diff)),
                     " ".join(f"{v:+.3f}" for v in diff)))
    result["per_seed_accuracy"] = {name: [[round(a, 4) for a in r[name]["accuracy"]] for r in per_seed]
                                   for name in ARMS}
    emit(result, rows, ("arm", "final acc (mean)", "95% t interval", "per seed"))


if __name__ == "__main__":
    main()

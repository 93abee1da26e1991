"""An in-process replica of a `tinyfleet simulate` fleet run (no broker), to ask what limits the fleet model.

One command: ``python benchmarks/fleet_replica.py CONFIG [--seed S] [--rounds R] [--local-steps K] [--lr LR]
[--goal G] [--scheme full|JSON] [--pretrain E] [--server-lr A] [--momentum B] [--central-steps N] [--central-lr LR]
[--replay ditto,head]``; prints one JSON line.

The same scenario, plan, device buffers (seed + i) and per-round training streams ([seed + i, round]) as the
runner, batch 1, integer FedAvg weighted by sample count (fleet.aggregate: round half up, clamp). Not the runner:
the `goal` devices of a round are a seeded random draw of the fleet devices (new users held out), not the
coordinator's pick, so numbers match `simulate` in distribution, not bit for bit (session 11: the watch global
model 0.742 over seeds 0-2 vs the benchmark's 0.741). ``--server-lr`` / ``--momentum``: FedAvgM on the server
(float, diagnostic only: not a fleet option). ``--central-steps N``: pooled int8 training of the same plan on every
fleet device's samples (batch 1, i.i.d.), accuracy at 10 checkpoints. ``--replay``: personalization methods replayed
on the replica's global models with fleet/sim/personalize.py (the configured lrs, no lr grid), and new users.
Accuracy = mean per-device accuracy on the fleet devices' test slices (docs/personalization.md, "session 11").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_agent.buffer import SampleBuffer
from device_agent.engine.trainer import Trainer
from fleet import aggregate as agg
from fleet.compiler.pipeline import build_plan
from fleet.config import ConfigError
from fleet.scenarios import load_scenario
from fleet.sim.config import load_sim_config
from fleet.sim.runner import _device_slices_of, _input_quant


def _config(a: argparse.Namespace):
    cfg = load_sim_config(a.config)
    over = {"seed": a.seed, **{k: getattr(a, k) for k in ("rounds", "local_steps", "lr", "goal")
                                 if getattr(a, k) is not None}}
    cfg = replace(cfg, **over)
    m = cfg.model
    if a.scheme:
        m = replace(m, scheme=json.loads(a.scheme) if a.scheme.startswith("{") else a.scheme)
    if a.pretrain is not None:
        m = replace(m, pretrain_epochs=a.pretrain)
    return replace(cfg, model=m)


def _mean(per_device: dict) -> dict:
    return {k: round(float(np.mean([v for v in vs if v is not None])), 4) for k, vs in per_device.items()}


def main() -> None:
    """Run the replica and print its JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--goal", type=int)
    ap.add_argument("--scheme", help="full, or a scheme as JSON (default: the config's)")
    ap.add_argument("--pretrain", type=int, help="pretraining epochs (default: the config's)")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--central-steps", type=int, default=0, help="pooled int8 training steps (batch 1)")
    ap.add_argument("--central-lr", type=float)
    ap.add_argument("--replay", default="", help="personalization methods to replay, e.g. ditto,head")
    a = ap.parse_args()
    try:
        cfg, t0 = _config(a), time.time()
    except (ConfigError, json.JSONDecodeError) as e:  # NOTE: a bad config or --scheme: one message, no traceback
        ap.error(f"{a.config}: {e}" if isinstance(e, ConfigError) else f"--scheme: not JSON ({e})")
    sc = load_scenario(cfg)
    held = set(cfg.new_user_indices())
    devs = [d for i, d in enumerate(sc.devices) if i not in held]
    plan, _report, scheme = build_plan(cfg, sc)
    scale, zp = _input_quant(plan)
    tr = Trainer(plan)
    initial = {t.id: np.array(t.data, copy=True) for t in plan.trainable}
    ids = sorted(initial)
    sizes = [initial[i].size for i in ids]
    slices = _device_slices_of(devs, scale, zp)
    bufs = []
    for i, s in enumerate(slices):
        b = SampleBuffer(max(1, len(s.y_train)), tuple(sc.input_shape), np.int8, seed=cfg.seed + i)
        b.add(s.x_train, s.y_train)
        bufs.append(b)

    def accuracy(state: dict) -> float:
        tr.load_trainable(state)
        return float(np.mean([tr.evaluate(s.x_test, s.y_test) for s in slices if len(s.y_test)]))

    def flat(state: dict) -> np.ndarray:
        return np.concatenate([state[i].astype(np.int64).reshape(-1) for i in ids])

    out = {"config": str(a.config), "seed": cfg.seed, "scheme": scheme, "n_trainable": int(sum(sizes)),
           "rounds": cfg.rounds, "local_steps": cfg.local_steps, "lr": cfg.lr, "goal": cfg.goal_count,
           "server_lr": a.server_lr, "momentum": a.momentum, "pretrain": cfg.model.pretrain_epochs,
           "devices": len(devs), "initial": round(accuracy(initial), 4)}
    state, velocity = dict(initial), np.zeros(sum(sizes))
    pick, curve, globals_ = np.random.default_rng([cfg.seed, 99]), [], []
    for r in range(1, cfg.rounds + 1):
        base = flat(state)
        sums = agg.RunningSums(base.size)
        for i in pick.choice(len(devs), size=cfg.goal_count, replace=False):
            tr.load_trainable(state)
            rng = np.random.default_rng([cfg.seed + int(i), r])
            for _ in range(cfg.local_steps):
                tr.train_step(*bufs[i].batch(1, rng), cfg.lr)
            sums.add(flat(tr.trainable_state()) - base, np.ones(base.size, bool), len(bufs[i]))
        mean = sums.mean()
        if a.server_lr != 1.0 or a.momentum:
            velocity = a.momentum * velocity + mean.value
            mean = agg.Mean(a.server_lr * velocity, mean.covered)
        delta, pos, new = agg.to_int_delta(mean), 0, {}
        for i, n in zip(ids, sizes):
            new[i] = agg.apply_int_delta(state[i], delta[pos:pos + n])
            pos += n
        state = new
        curve.append(round(accuracy(state), 4))
        globals_.append(dict(state))
    out["global_curve"], out["global"] = curve, curve[-1] if curve else out["initial"]
    if a.replay and globals_:
        from fleet.sim import personalize as ps

        pc = cfg.personalization
        plain = ps.Plain(cfg.local_steps, cfg.lr, pc.steps, pc.lr or cfg.lr, pc.lam_q15, cfg.seed)
        methods = a.replay.split(",")
        out["replay"] = _mean(ps.compare_methods(plan, initial, globals_, slices, methods, plain))
        newcomers = _device_slices_of([d for i, d in enumerate(sc.devices) if i in held], scale, zp)
        if newcomers:
            out["new_users"] = _mean(ps.new_users(plan, initial, globals_[-1], newcomers, methods,
                                                  pc.new_user_steps, plain))
    if a.central_steps:
        x, y = np.concatenate([s.x_train for s in slices]), np.concatenate([s.y_train for s in slices])
        tr.load_trainable(initial)
        rng, every, central = np.random.default_rng([cfg.seed, 7]), max(1, a.central_steps // 10), []
        for step in range(1, a.central_steps + 1):
            j = int(rng.integers(len(y)))
            tr.train_step(x[j:j + 1], y[j:j + 1], a.central_lr or cfg.lr)
            if step % every == 0:  # NOTE: accuracy() loads the same values back: training goes on from them
                central.append(round(accuracy(tr.trainable_state()), 4))
        out["central_int8_curve"], out["central_int8_lr"] = central, a.central_lr or cfg.lr
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Personalization vs the global model vs training alone, per scenario, over seeds (issue 13).

One command: ``python benchmarks/personalization.py [--quick] [--seeds 3] [--scenarios sensor-watch,...]
[--devices N] [--rounds N]``; prints a table, then one JSON line.

Each (scenario, seed) is one ``tinyfleet simulate`` run of ``configs/<scenario>.yaml`` (host devices over the
embedded broker) with its ``personalization``, ``new_users`` and ``continual`` sections: every method is replayed
on that run's global models (fleet/sim/personalize.py). Per scenario and model (``global``, ``local``,
``centralized``, ``personalized`` = the devices' own method after fallback, each method, ``new_users_*``): the
mean over seeds of the mean per-device final accuracy, with a 95% Student-t interval. The target (DESIGN.md):
the best method >= both global and local-only beyond the interval; judged here on the paired per-seed
difference (best - global, best - local): met when the difference's 95% interval lies above 0. ``--quick``:
fewer devices, rounds and steps, 2 seeds (a smoke form; its numbers are not the README's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, t_interval

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("sensor-watch", "keyboard-shakespeare", "medical-heart")
METHODS = ("ditto", "finetune", "head", "bias")


def run_one(scenario: str, seed: int, args) -> dict:
    from fleet.sim.config import load_sim_config
    from fleet.sim.runner import run_simulation

    over = {"seed": seed}
    if args.devices:
        over["devices"] = args.devices
    if args.rounds:
        over["rounds"] = args.rounds
    cfg = load_sim_config(ROOT / "configs" / f"{scenario}.yaml", **over)
    if args.quick:
        cfg.devices, cfg.rounds = min(cfg.devices, 12), min(cfg.rounds, 4)
        cfg.goal = min(cfg.goal_count, 6)
        cfg.new_users = 2
        cfg.local_steps = min(cfg.local_steps, 20)
        cfg.personalization.steps = min(cfg.personalization.steps, 10)
        cfg.personalization.new_user_steps = min(cfg.personalization.new_user_steps, 20)
        cfg.dataset.max_train_per_device = min(cfg.dataset.max_train_per_device or 10**9, 120)
        cfg.model.pretrain_epochs = min(cfg.model.pretrain_epochs, 3)
        cfg.continual.drift = False
    if args.no_continual or seed >= args.continual_seeds:
        cfg.continual.prequential = False
    t0 = time.monotonic()
    res = run_simulation(cfg, None, progress=False)
    if res.errors or res.rounds < cfg.rounds:
        raise SystemExit(f"{scenario} seed {seed}: run incomplete ({res.rounds} rounds): {res.errors[:3]}")
    out = {"means": dict(res.accuracy_mean_per_device), "seconds": round(time.monotonic() - t0, 1),
           "methods_used": res.personal_methods}
    runs = res.continual.get("runs", [])
    out["continual"] = {
        f"{r['policy']}{'+drift' if r.get('drift_round') else ''}": {
            "mean_prequential": {k: round(float(np.mean([a for a in c if a is not None])), 4)
                                 for k, c in r["prequential"].items()},
            **({"forgetting": r["forgetting"], "recovery_rounds": r["recovery_rounds"]} if r.get("drift_round")
               else {})} for r in runs}
    return out


def summarize(per_seed: list[dict]) -> dict:
    keys = sorted({k for s in per_seed for k in s["means"]})
    acc = {k: {"mean": round(float(np.mean(v)), 4), "ci95": t_interval(v), "n": len(v)}
           for k in keys for v in [[s["means"][k] for s in per_seed if k in s["means"]]] if v}
    out: dict = {"accuracy_mean_per_device": acc}
    personal = [m for m in (*METHODS, "personalized") if m in acc]
    if personal:
        best = max(personal, key=lambda m: acc[m]["mean"])
        out["best"] = best
        for base in ("global", "local"):
            if base in acc:
                d = [s["means"][best] - s["means"][base] for s in per_seed]
                out[f"best_minus_{base}"] = {"mean": round(float(np.mean(d)), 4), "ci95": t_interval(d)}
        out["target_met"] = all(out.get(f"best_minus_{b}", {"ci95": [0, 0]})["ci95"][0] > 0
                                for b in ("global", "local"))
    nu = [m for m in METHODS if f"new_users_{m}" in acc]
    if nu:
        best_nu = max(nu, key=lambda m: acc[f"new_users_{m}"]["mean"])
        out["new_users_best"] = best_nu
        for base in ("global", "local"):
            d = [s["means"][f"new_users_{best_nu}"] - s["means"][f"new_users_{base}"] for s in per_seed
                 if f"new_users_{base}" in s["means"]]
            if d:
                out[f"new_users_best_minus_{base}"] = {"mean": round(float(np.mean(d)), 4), "ci95": t_interval(d)}
    out["continual"] = [s["continual"] for s in per_seed if s["continual"]]
    out["methods_used"] = per_seed[0]["methods_used"]
    out["seconds"] = [s["seconds"] for s in per_seed]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small fleets, 2 seeds (smoke form)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 2)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--devices", type=int, default=None, help="override every config's device count")
    ap.add_argument("--rounds", type=int, default=None, help="override every config's rounds")
    ap.add_argument("--no-continual", action="store_true", help="skip the prequential replays")
    ap.add_argument("--continual-seeds", type=int, default=1,
                    help="run the prequential replays (fifo, reservoir, drift) for the first N seeds only")
    args = ap.parse_args()
    seeds = args.seeds or (2 if args.quick else 3)
    result: dict = {"benchmark": "personalization", "quick": args.quick, "seeds": list(range(seeds)),
                    "devices": args.devices, "rounds": args.rounds, "scenarios": {}}
    rows = []
    for sc in args.scenarios.split(","):
        per_seed = []
        for seed in range(seeds):
            per_seed.append(run_one(sc, seed, args))
            print(f"# {sc} seed {seed}: {per_seed[-1]['means']} ({per_seed[-1]['seconds']} s)", file=sys.stderr)
        s = summarize(per_seed)
        result["scenarios"][sc] = s
        for k, v in s["accuracy_mean_per_device"].items():
            rows.append((sc, k, f"{v['mean']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", v["n"]))
    emit(result, rows, ("scenario", "model", "mean per-device acc", "95% t-interval", "seeds"))


if __name__ == "__main__":
    main()

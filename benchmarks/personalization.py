"""Personalization vs the global model vs training alone, per scenario, over seeds (issue 13).

One command: ``python benchmarks/personalization.py [--quick] [--seeds 3 | --seeds-list 0,2]
[--scenarios sensor-watch,...] [--methods ditto,...] [--lr-grid 1,3] [--validation per_label] [--validation-gap 1]
[--out-json FILE] [--devices N] [--rounds N]``; prints a table, then one JSON line. Seeds can run in separate
processes (one ``--seeds-list`` each, one ``--out-json`` each); ``--merge a.json,b.json`` then summarizes their
seeds together without running anything.

Each (scenario, seed) is one ``tinyfleet simulate`` run of ``configs/<scenario>.yaml`` (host devices over the
embedded broker) with its ``personalization``, ``new_users`` and ``continual`` sections: every method is replayed
on that run's global models (fleet/sim/personalize.py), local-only and every method with the lr chosen by the same
rule on device-held validation data (the runner's ``personalization.lr_grid``, set from ``--lr-grid``), and
``select`` (host-only: each device's own pick of global / local-only / a method by that validation data). Per scenario and model (``global``,
``local``, each method, ``new_users_*``; ``personalized`` = the devices' own live method and ``centralized`` from
the run): the mean over seeds of the mean per-device final accuracy, with a 95% Student-t interval. The target
(issue 13): the best replayed method >= both global and local-only beyond the interval, judged on the paired
difference per device and seed (n = devices x seeds; the per-seed paired interval, n = seeds, is reported beside
it). ``--quick``: fewer devices, rounds and steps, 2 seeds (a smoke form; its numbers are not the README's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, t_interval

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("sensor-watch", "keyboard-shakespeare", "medical-heart")
METHODS = ("ditto", "finetune", "head", "bias", "select")  # select: host-only


def _capture() -> tuple[dict, object]:
    """Record the per-device numbers of fleet/sim/personalize's replays as the runner calls them (the runner
    itself applies the lr rule and the per-device selection): its last ``compare_methods`` call is the replay on
    the test slices (the earlier ones are the lr rule's validation replays), its first ``new_users`` call the new
    users' test replay and its second their validation replay (what their "select" chooses from)."""
    from fleet.sim import personalize as ps

    got: dict = {"compare": [], "new": []}
    orig_compare, orig_new = ps.compare_methods, ps.new_users

    def compare(*a, **k):
        got["compare"].append(orig_compare(*a, **k))
        return got["compare"][-1]

    def new(*a, **k):
        got["new"].append(orig_new(*a, **k))
        return got["new"][-1]

    ps.compare_methods, ps.new_users = compare, new

    def restore() -> None:
        ps.compare_methods, ps.new_users = orig_compare, orig_new

    return got, restore


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
    if args.methods:
        cfg.personalization.compare = args.methods.split(",")
    if args.no_continual or seed >= args.continual_seeds:
        cfg.continual.prequential = False
    cfg.personalization.lr_grid = [float(g) for g in args.lr_grid.split(",")] if args.lr_grid else []
    if args.validation:
        cfg.personalization.validation = args.validation
    if args.validation_gap is not None:
        cfg.personalization.validation_gap = args.validation_gap
    got, restore = _capture()
    t0 = time.monotonic()
    try:
        res = run_simulation(cfg, None, progress=False)
    finally:
        restore()
    if res.errors or res.rounds < cfg.rounds:
        raise SystemExit(f"{scenario} seed {seed}: run incomplete ({res.rounds} rounds): {res.errors[:3]}")
    # per device (fleet devices, then new users): the replays' numbers, every model by the same code and lr rule;
    # the run's own "personalized" (the devices' live method) and "centralized" beside them
    from fleet.sim import personalize as ps

    per_device = dict(got["compare"][-1]) if got["compare"] else {}
    if per_device and any("select_choice" in r for r in res.per_device):  # the chosen model's unrounded accuracy
        per_device["select"] = ps.selected_accuracy([r.get("select_choice") for r in res.per_device], per_device)
    for k in ("personalized", "centralized"):
        if any(f"accuracy_{k}" in r for r in res.per_device):
            per_device[k] = [r.get(f"accuracy_{k}") for r in res.per_device]
    if got["new"]:
        new = dict(got["new"][0])
        if len(got["new"]) > 1:  # the runner's new-user selection, per user (it keeps only the mean)
            new["select"] = ps.selected_accuracy(ps.select_per_device(got["new"][1]), got["new"][0])
        per_device.update({f"new_users_{k}": v for k, v in new.items()})
    means = {k: round(float(np.mean(a)), 4) for k, v in per_device.items() for a in [[x for x in v if x is not None]]
             if a}
    out = {"means": means, "per_device": per_device, "run_means": dict(res.accuracy_mean_per_device),
           "seconds": round(time.monotonic() - t0, 1), "methods_used": res.personal_methods,
           "devices_per_round": res.devices_per_round,
           "devices": [{k: r[k] for k in ("device_id", "subject", "n_train", "n_test")} for r in res.per_device]}
    out["lr"] = dict(res.personal_lr)
    out["seed"], out["validation"] = seed, cfg.personalization.validation
    out["validation_gap"] = cfg.personalization.validation_gap
    # the lr rule's validation replays, one per grid entry (per model and device): what the lr and select chose from
    out["validation_replays"] = got["compare"][:-1]
    out["select_choices"] = dict(res.select_choices)
    runs = res.continual.get("runs", [])
    out["continual"] = {
        f"{r['policy']}{'+drift' if r.get('drift_round') else ''}": {
            "mean_prequential": {k: round(float(np.mean([a for a in c if a is not None])), 4)
                                 for k, c in r["prequential"].items()},
            **({"forgetting": r["forgetting"], "recovery_rounds": r["recovery_rounds"]} if r.get("drift_round")
               else {})} for r in runs}
    return out


def _paired(per_seed: list[dict], a: str, b: str) -> dict:
    """``a - b`` paired two ways: per seed (difference of per-device means; n = seeds) and per device and seed
    (n = devices x seeds; devices of one seed share the fleet model, so they are not fully independent)."""
    seeds = [s["means"][a] - s["means"][b] for s in per_seed if a in s["means"] and b in s["means"]]
    pairs = [x - y for s in per_seed for x, y in zip(s["per_device"].get(a, []), s["per_device"].get(b, []))
             if x is not None and y is not None]
    return {"mean": round(float(np.mean(seeds)), 4), "ci95_seeds": t_interval(seeds),
            "ci95_device_seed": t_interval(pairs), "n_device_seed": len(pairs),
            "devices_better": sum(d > 0 for d in pairs), "devices_worse": sum(d < 0 for d in pairs)}


def summarize(per_seed: list[dict]) -> dict:
    keys = sorted({k for s in per_seed for k in s["means"]})
    acc = {k: {"mean": round(float(np.mean(v)), 4), "ci95": t_interval(v), "n": len(v)}
           for k in keys for v in [[s["means"][k] for s in per_seed if k in s["means"]]] if v}
    out: dict = {"accuracy_mean_per_device": acc}
    personal = [m for m in METHODS if m in acc]  # NOTE: the replayed methods (one lr rule); "personalized" beside
    if personal:
        best = max(personal, key=lambda m: acc[m]["mean"])
        out["best"] = best
        for base in ("global", "local"):
            if base in acc:
                out[f"best_minus_{base}"] = _paired(per_seed, best, base)
        # NOTE: the target is judged on the device x seed interval (the population is users); the per-seed one
        # (n = 3, t = 4.3) is reported beside it
        out["target_met"] = all(out.get(f"best_minus_{b}", {"ci95_device_seed": [0, 0]})["ci95_device_seed"][0] > 0
                                for b in ("global", "local"))
        out["target_met_seed_interval"] = all(
            out.get(f"best_minus_{b}", {"ci95_seeds": [0, 0]})["ci95_seeds"][0] > 0 for b in ("global", "local"))
    if "select" in acc:  # the device-side selection (host-only) against both baselines, whether or not it is best
        for base in ("global", "local"):
            if base in acc:
                out[f"select_minus_{base}"] = _paired(per_seed, "select", base)
        out["select_choices"] = [s.get("select_choices", {}) for s in per_seed]
    nu = [m for m in METHODS if f"new_users_{m}" in acc]
    if nu:
        best_nu = max(nu, key=lambda m: acc[f"new_users_{m}"]["mean"])
        out["new_users_best"] = best_nu
        for base in ("global", "local"):
            if f"new_users_{base}" in acc:
                out[f"new_users_best_minus_{base}"] = _paired(per_seed, f"new_users_{best_nu}", f"new_users_{base}")
    out["seeds_run"] = [s.get("seed") for s in per_seed]
    out["validation"] = sorted({s.get("validation", "stored") for s in per_seed})  # before session 10: stored
    out["lr"] = [s["lr"] for s in per_seed if "lr" in s]
    out["continual"] = [s["continual"] for s in per_seed if s["continual"]]
    out["methods_used"] = per_seed[0]["methods_used"]
    out["seconds"] = [s["seconds"] for s in per_seed]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small fleets, 2 seeds (smoke form)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 2)")
    ap.add_argument("--seeds-list", default=None, help="these seeds instead, e.g. 0,2 (one process per seed)")
    ap.add_argument("--validation", default=None, choices=("last", "per_label", "stored"),
                    help="override the configs' personalization.validation (which samples a device holds back)")
    ap.add_argument("--validation-gap", type=int, default=None,
                    help="override personalization.validation_gap (samples dropped before each held-back tail)")
    ap.add_argument("--merge", default=None,
                    help="summarize these --out-json files' seeds together (comma-separated); runs nothing")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--devices", type=int, default=None, help="override every config's device count")
    ap.add_argument("--rounds", type=int, default=None, help="override every config's rounds")
    ap.add_argument("--no-continual", action="store_true", help="skip the prequential replays")
    ap.add_argument("--methods", default=None, help="personalization methods to replay (default: the config's compare)")
    ap.add_argument("--lr-grid", default="1,3",
                    help="lr multipliers for the lr rule (fleet/sim/personalize.py:tune_lr), the same for local-only "
                         "and every method; '' for the configured lrs")
    ap.add_argument("--out-json", default=None, help="also write every seed's per-device numbers to this file")
    ap.add_argument("--continual-seeds", type=int, default=1,
                    help="run the prequential replays (fifo, reservoir, drift) for the first N seeds only")
    args = ap.parse_args()
    if args.seeds_list:
        seeds = [int(s) for s in args.seeds_list.split(",")]
    else:
        seeds = list(range(args.seeds or (2 if args.quick else 3)))
    result: dict = {"benchmark": "personalization", "quick": args.quick, "seeds": seeds,
                    "devices": args.devices, "rounds": args.rounds, "lr_grid": args.lr_grid, "scenarios": {}}
    raw: dict = {}
    rows = []
    if args.merge:
        for f in args.merge.split(","):
            for sc, per_seed in json.loads(Path(f).read_text()).items():
                raw.setdefault(sc, []).extend(per_seed)
        result["merged"] = args.merge.split(",")
        result["seeds"] = {sc: [s.get("seed") for s in v] for sc, v in raw.items()}
    for sc in raw if args.merge else args.scenarios.split(","):
        per_seed = raw[sc] if args.merge else []
        for seed in [] if args.merge else seeds:
            per_seed.append(run_one(sc, seed, args))
            raw[sc] = per_seed
            if args.out_json:  # after every seed: a long run that is cut short keeps what it measured
                Path(args.out_json).write_text(json.dumps(raw))
            print(f"# {sc} seed {seed}: {per_seed[-1]['means']} lr {per_seed[-1].get('lr')} "
                  f"select {per_seed[-1].get('select_choices')} ({per_seed[-1]['seconds']} s)",
                  file=sys.stderr, flush=True)
        s = summarize(per_seed)
        result["scenarios"][sc] = s
        for k, v in s["accuracy_mean_per_device"].items():
            rows.append((sc, k, f"{v['mean']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", v["n"]))
    emit(result, rows, ("scenario", "model", "mean per-device acc", "95% t-interval", "seeds"))


if __name__ == "__main__":
    main()

"""``tinyfleet eval CONFIG --store S --data test.npz``: score every model version a coordinator stored.

For a fleet run with ``tinyfleet serve``: the plan is the one ``serve`` publishes (``--plan FILE`` or built from
the config, with the config's ``personal`` tensors marked), checked against the plan the store was bound to;
each stored version's shared tensors are loaded into the reference engine and the ``.npz`` test set (``x``,
``y``; the form ``device-agent --data`` takes, checked the same way) is scored. Personal tensors keep the plan's
values: this is the *global* model's accuracy, what a new device starts from. It reads the store and never
writes it (run it while ``serve`` runs). Prints one row per version and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the fleet YAML the store was served with")
    p.add_argument("--store", type=Path, required=True, help="the SQLite store of `tinyfleet serve`")
    p.add_argument("--data", type=Path, required=True, help=".npz with arrays x (inputs) and y (labels)")
    p.add_argument("--plan", type=Path, help="the --plan given to serve (default: built from the config)")
    p.add_argument("--versions", default="all", help="all | latest | comma-separated version numbers")
    p.add_argument("--json", action="store_true", help="print only the JSON line")


def run(args: argparse.Namespace) -> int:
    try:
        result = evaluate(args)
    except EvalError as e:
        print(f"tinyfleet eval: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print("version  round  accuracy  samples")
        for r in result["versions"]:
            print(f"{r['version']:>7}  {r['round_id']:>5}  {r['accuracy']:.4f}    {r['samples']}")
    print(json.dumps(result, sort_keys=True))
    return 0


class EvalError(Exception):
    """What the user must fix, in one line."""


def evaluate(args: argparse.Namespace) -> dict:
    import sqlite3

    from device_agent.cli import CliError, load_samples
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.plan import plan_hash
    from fleet.config import ConfigError
    from fleet.coordinator.core import unpack_state
    from fleet.schema import load_fleet_config
    from fleet.serve import _plan
    from fleet.store import Store, StoreError

    for flag, path in (("--store", args.store), ("--data", args.data)):
        if not path.is_file():  # NOTE: before building the plan, which may pretrain a model
            raise EvalError(f"{flag} {path}: no such file")
    try:
        cfg = load_fleet_config(args.config)
        plan = _plan(cfg, args.plan)
    except (ConfigError, ValueError, OSError) as e:
        raise EvalError(str(e)) from None
    try:
        store = Store(args.store, readonly=True)
        bound = store.meta("plan_hash")
    except (sqlite3.Error, StoreError) as e:
        raise EvalError(f"--store {args.store}: {e}") from None
    ph = plan_hash(plan).hex()
    if bound is not None and bound != ph:
        raise EvalError(f"--store {args.store} holds models of plan {bound[:16]}, this config's plan is {ph[:16]} "
                        "(give the same config and --plan that serve was given)")
    try:
        x, y, _ = load_samples(args.data, plan)
    except CliError as e:
        raise EvalError(str(e)) from None
    wanted = _versions(args.versions, store)
    shared = [t for t in plan.trainable if not t.personal]
    trainer = Trainer(plan)
    rows = []
    for v in wanted:
        row = store.version(v)
        if row is None:
            raise EvalError(f"--versions: the store has no version {v} (latest: {_latest(store)})")
        trainer.load_trainable(unpack_state(shared, row.state))
        rows.append({"version": v, "round_id": row.round_id, "accuracy": round(trainer.evaluate(x, y), 4),
                     "samples": len(y)})
    store.close()
    return {"fleet": cfg.name, "plan_hash": ph, "versions": rows}


def _latest(store) -> int:
    row = store.latest_version()
    return 0 if row is None else row.version


def _versions(spec: str, store) -> list[int]:
    latest = _latest(store)
    if latest == 0:
        raise EvalError("the store holds no model yet (has serve started?)")
    if spec == "all":
        return list(range(1, latest + 1))
    if spec == "latest":
        return [latest]
    try:
        out = [int(v) for v in spec.split(",")]
    except ValueError:
        raise EvalError(f"--versions: expected all, latest or numbers like 1,5,9, got {spec!r}") from None
    if any(v < 1 for v in out):
        raise EvalError(f"--versions: versions start at 1, got {spec!r}")
    return out

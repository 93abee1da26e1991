"""``tinyfleet simulate CONFIG``: broker + coordinator + N host devices on this machine, one JSON line last.

Progress bars go to stderr (rich); stdout carries only the optional summary table and, last, one JSON object
(``rounds``, ``accuracy_per_round``, ``bytes_up_per_device_round``, ``bytes_down_per_device_round``,
``devices_dropped``, ...). Ctrl-C stops devices, coordinator and broker in order and still prints the JSON of
the rounds that finished (exit code 130). This module parses arguments and prints; the work is in runner.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fleet.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="simulation YAML, e.g. configs/quickstart.yaml")
    p.add_argument("--devices", type=int, help="override the number of host devices")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--broker", help="override the broker: 'embedded' or mqtt://[user:pass@]host:port")
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout (no table)")
    p.add_argument("--out", type=Path, help="run directory: metrics.json, store, broker log (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dashboard", metavar="[HOST:]PORT",
                   help="serve a live read-only dashboard during the run (default host 127.0.0.1; others need a token)")
    p.add_argument("--dashboard-token", help="access token for the dashboard (default: generated off loopback)")


def run(args: argparse.Namespace) -> int:
    from fleet.dashboard.server import parse_bind
    from fleet.sim.broker import BrokerError
    from fleet.sim.config import load_sim_config
    from fleet.sim.errors import SimulationError
    from fleet.sim.runner import run_simulation

    try:
        cfg = load_sim_config(args.config, devices=args.devices, rounds=args.rounds, broker=args.broker)
        dashboard = (parse_bind(args.dashboard), args.dashboard_token) if args.dashboard else None
    except (ConfigError, ValueError) as e:
        print(f"tinyfleet simulate: {e}", file=sys.stderr)
        return 2
    try:
        result = run_simulation(cfg, out_dir=args.out, progress=not args.quiet, dashboard=dashboard)
    except (BrokerError, SimulationError, ConnectionError) as e:
        print(f"tinyfleet simulate: {e} (check `broker:` in the config or --broker)"
              if isinstance(e, ConnectionError) else f"tinyfleet simulate: {e}", file=sys.stderr)
        return 1
    if not args.json:
        _table(result.to_dict())
    sys.stdout.flush()
    print(json.dumps(result.to_dict(), sort_keys=True))
    return 130 if result.interrupted else 0


def _table(r: dict) -> None:
    print(f"{'round':>5}  {'accuracy':>8}  {'devices':>7}  {'bytes up/dev':>12}  {'bytes down/dev':>14}  status")
    for i, acc in enumerate(r["accuracy_per_round"]):
        print(f"{i + 1:>5}  {acc:>8.3f}  {r['devices_per_round'][i]:>7}  {r['bytes_up_per_device_round'][i]:>12.0f}  "
              f"{r['bytes_down_per_device_round'][i]:>14.0f}  {r['round_status'][i]}")

"""`tinyfleet` command line: one subcommand per job; each lives in the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "compile": ("fleet.compiler.cli", "compile a model into an int8 training plan (.ttp)"),
    "quantize-data": ("fleet.compiler.quantize_data", "float .npz samples -> int8 with a plan's input quantization"),
    "simulate": ("fleet.sim.cli", "run a whole fleet on this machine: broker + coordinator + devices"),
    "serve": ("fleet.serve", "run the coordinator against an MQTT broker"),
    "eval": ("fleet.evaluate", "score every model version a `serve` store holds on a test .npz"),
    "report": ("fleet.sim.report", "write index.html + plots for a simulate or serve run directory"),
    "broker-config": ("fleet.security.broker_config", "write a Mosquitto config: per-device users, ACL, TLS"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    args_list = sys.argv[1:] if argv is None else argv
    wanted = args_list[0] if args_list else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module that runs (torch is slow to import)
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name == module:
                    parser.error(f"'{name}' is not available in this build ({module} missing)")
                raise
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(args_list)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

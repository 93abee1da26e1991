"""``tinyfleet compile``: a model (MIT .pkl or torch ``module:Class``) + board -> plan.ttp and one JSON report.

It only parses arguments, loads inputs and calls :func:`fleet.compiler.compile.compile_plan`; it refuses to
guess shapes it cannot know (a torch model needs ``--input-shape``) and reports an infeasible budget with the
smallest one that would fit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np

from device_agent.engine import ir
from fleet.config import BoardConfig, ConfigError, load, parse_size

from .compile import BudgetError, check_budget, compile_full
from .scheme import VARIANTS, all_schemes, named_scheme, search_scheme
from .training import SchemeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``compile`` options on ``p``."""
    p.add_argument("model", help="an MIT int8 .pkl, or a torch model spec 'package.module:Class' (e.g. "
                                 "fleet.compiler.models:TinyCNN)")
    p.add_argument("--board", required=True, help="board YAML, e.g. configs/boards/stm32f746.yaml")
    p.add_argument("--budget", help="SRAM budget for the plan (256KB, 320KiB, bytes); default the board's")
    p.add_argument("--scheme", default="auto", help=f"{'|'.join(VARIANTS)}|auto|<model>:<rung>|<rung> "
                                                   "(auto: search with --proxy, else the largest named scheme "
                                                   "that fits)")
    p.add_argument("--classes", type=int, help="replace the classifier by a fresh K-way head")
    p.add_argument("--input-size", type=int, default=None, help="MIT models: input resolution (the .pkl's)")
    p.add_argument("--input-shape", help="torch models: per-sample input shape, e.g. 6,128 or 1,28,28")
    p.add_argument("--calib", help="torch models: .npy/.npz (key x) float calibration batch; default N(0,1)")
    p.add_argument("--proxy", help="scheme search data: .npz with x (int8, quantized like the input) and y")
    p.add_argument("--no-fuse", action="store_true", help="do not fuse frozen expansion+depthwise (PWDW)")
    p.add_argument("-o", "--output", help="write the plan blob (.ttp) here")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a short summary)")
    p.add_argument("--seed", type=int, default=0)


def _load_array(path: str, key: str) -> np.ndarray:
    data = np.load(path)
    if isinstance(data, np.ndarray):
        return data
    if key not in data:
        raise ValueError(f"{path}: expected an array named {key!r}, found {sorted(data.files)}")
    return data[key]


def load_graph(args: argparse.Namespace) -> ir.Graph:
    """The forward graph named by ``args.model`` (with a fresh head when ``--classes`` is given)."""
    spec = args.model
    if spec.endswith(".pkl"):
        from .mit_import import import_mit, load_mit

        if not Path(spec).exists():
            raise ValueError(f"model file not found: {spec}")
        if args.input_size is not None:
            have = int(load_mit(spec)["first_conv"].get("in_shape", 128))
            if have != args.input_size:
                raise ValueError(f"{spec} was exported at {have}x{have}; --input-size {args.input_size} is not "
                                 f"supported (omit it or pass {have})")
        graph = import_mit(spec)
    elif ":" in spec:
        import torch

        from .torch_import import import_torch

        mod, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load torch model {spec!r}: {e}") from None
        model = factory().eval()
        if args.calib:
            calib = _load_array(args.calib, "x")
        else:
            shape = args.input_shape or getattr(model, "input_shape", None)
            if shape is None:
                raise ValueError(f"{spec}: pass --input-shape (per sample, e.g. 6,128 or 1,28,28) or --calib")
            dims = tuple(int(d) for d in str(shape).replace("x", ",").strip("()").split(",") if d.strip())
            calib = torch.randn(256, *dims, generator=torch.Generator().manual_seed(args.seed))
        graph = import_torch(model, calib, name=type(model).__name__)
    else:
        raise ValueError(f"MODEL must be a .pkl file or 'package.module:Class', got {spec!r}")
    if args.classes is not None:
        from .quantize import new_classifier

        graph = new_classifier(graph, args.classes, seed=args.seed)
    return graph


def _auto_named(graph: ir.Graph, budget: int) -> tuple[ir.SparseScheme, object]:
    """Without proxy data: the named scheme with the most trainable bytes that fits (cheapest: 'last')."""
    cands = [named_scheme(graph, v) for v in VARIANTS] + list(all_schemes().get(graph.name, {}).values())
    compiled = []
    for s in cands:
        try:
            compiled.append((s, compile_full(graph, s, serialize=False)))
        except SchemeError:
            continue
    fits = [(s, c) for s, c in compiled if c.report.peak_sram_bytes <= budget]
    if not fits:
        s, c = min(compiled, key=lambda sc: sc[1].report.peak_sram_bytes)
        r = c.report.peak_sram_bytes
        raise BudgetError(f"no scheme fits {budget} bytes; the cheapest ({s.name!r}) needs {r} bytes: the "
                          f"smallest feasible budget is {r} bytes ({r / 1000:.1f} KB)", r)
    return max(fits, key=lambda sc: (sc[1].report.trainable_bytes, -sc[1].report.peak_sram_bytes))


def run(args: argparse.Namespace) -> int:
    """Compile, write ``-o``, print the report; exit 0, or 1 (budget) / 2 (bad input) with a message on stderr."""
    try:
        board = load(BoardConfig, args.board)
        budget = parse_size(args.budget) if args.budget else board.training_budget
        graph = load_graph(args)
        if args.scheme == "auto" and args.proxy:
            px, py = _load_array(args.proxy, "x"), _load_array(args.proxy, "y")
            scheme = search_scheme(graph, budget, px, py, seed=args.seed).scheme
        elif args.scheme == "auto":
            scheme = _auto_named(graph, budget)[0]
        else:
            scheme = named_scheme(graph, args.scheme)
        c = compile_full(graph, scheme, fuse=not args.no_fuse)
        check_budget(c.report, budget, scheme.name)
    except BudgetError as e:
        print(f"tinyfleet compile: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": "budget", "message": str(e), "required_bytes": e.required}))
        return 1
    except (ConfigError, SchemeError, ValueError, OSError) as e:
        print(f"tinyfleet compile: {e}", file=sys.stderr)
        return 2
    digest = ""
    if c.blob is not None:
        from device_agent.wire.plan import plan_hash

        digest = plan_hash(c.blob).hex()
        if args.output:
            Path(args.output).write_bytes(c.blob)
    elif args.output:
        print("tinyfleet compile: the plan writer (device_agent.wire.plan) is unavailable", file=sys.stderr)
        return 2
    out = {"model": graph.name, "board": board.name, "budget_bytes": budget, "scheme": scheme.name,
           "n_bias_update": scheme.n_bias_update, "weight_ratio": {str(k): v for k, v in scheme.weight_ratio.items()},
           "plan_hash": digest, "output": args.output, **c.report.as_dict()}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        r = c.report
        print(f"{graph.name} / {scheme.name}: peak SRAM {r.peak_sram_bytes / 1000:.1f} KB (arena "
              f"{r.arena_bytes / 1000:.1f} + trainable {r.trainable_bytes / 1000:.1f} + runtime "
              f"{r.runtime_bytes / 1000:.1f}) of {budget / 1000:.1f} KB; flash {r.flash_bytes / 1000:.1f} KB; "
              f"{r.num_ops} ops" + (f"; wrote {args.output}" if args.output else ""))
    return 0

"""``tinyfleet compile``: a model (MIT .pkl or torch ``module:Class``) + board -> plan.ttp and one JSON report.

It only parses arguments, loads inputs and calls :func:`fleet.compiler.compile.compile_plan`; it refuses to
guess shapes it cannot know (a torch model needs ``--input-shape``, which must agree with ``--calib``) and reports
an infeasible budget with the smallest one that would fit. A torch ``module:Class`` is imported with the working
directory on the path; the report prints the input quantization devices apply to float samples. Every error is one line on stderr naming the cause (exit 2; an infeasible budget
exits 1), never a traceback (``TINYFLEET_DEBUG=1`` shows it for an unexpected one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np

from device_agent.engine import ir
from device_agent.engine.recipe import Recipe, plan_recipe
from fleet.compiler.personal import method_costs
from fleet.config import BoardConfig, ConfigError, load, parse_size

from .compile import BudgetError, check_budget, compile_fitting, compile_full
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
    p.add_argument("--weights", help="torch models: state dict to load (torch.save(model.state_dict(), path))")
    p.add_argument("--calib", help="torch models: .npy/.npz (key x) float calibration batch; default N(0,1)")
    p.add_argument("--proxy", help="scheme search data: .npz with x and y; x float (quantized here with the "
                                   "model's input quantization) or int8 already quantized like the input")
    p.add_argument("--no-fuse", action="store_true", help="do not fuse frozen expansion+depthwise (PWDW)")
    p.add_argument("--patch", choices=("auto", "always", "never"), default="auto",
                   help="run the frozen first stage tile by tile (PATCH ops: far less arena, more instructions): "
                        "auto = only when the whole-stage plan exceeds the budget (default)")
    p.add_argument("--budgets", help="a nested plan family for a mixed-memory fleet, e.g. 28KB,64KB,256KB: the scheme "
                                     "under the largest budget, shrunk where a smaller one needs "
                                     "(fleet/compiler/family.py); -o is then a directory of plan-<budget>.ttp")
    p.add_argument("-o", "--output", help="write the plan blob (.ttp) here")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a short summary)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("training recipe (docs/engine.md; the plan carries it, its state counts in SRAM)")
    g.add_argument("--accum-steps", type=int, default=1, help="samples per applied update at batch 1 (1..65535)")
    g.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum in [0, 1), Q15 on the device")
    g.add_argument("--residual-bits", type=int, default=0,
                   help="sub-LSB weight residual bits: 0 (stochastic rounding), 8 or 16")
    g.add_argument("--warmup", type=int, default=0, help="update steps of linear lr warm-up")
    g.add_argument("--total-steps", type=int, default=0,
                   help="update steps at which the cosine schedule ends (0: constant lr after warm-up)")
    g.add_argument("--lr-floor", type=float, default=0.0, help="cosine floor as a fraction of the peak lr, [0, 1]")


class UsageError(ValueError):
    """Bad input named by the user (a file, a flag, a model): one line for stderr, exit 2."""


_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)


def _load_array(path: str, key: str, what: str) -> np.ndarray:
    """Array ``key`` of the .npz at ``path`` (a .npy is the array itself); ``what`` names the flag."""
    if not Path(path).is_file():
        raise UsageError(f"{what} {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data
        with data:
            if key not in data.files:
                raise UsageError(f"{what} {path}: expected an array named {key!r}, found {sorted(data.files)}")
            return data[key]
    except UsageError:
        raise
    except _UNREADABLE as e:
        raise UsageError(f"{what} {path}: not a readable .npy/.npz ({type(e).__name__}: {e})") from None


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in str(text).replace("x", ",").strip("()").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise UsageError(f"--input-shape {text!r}: expected positive integers per sample, e.g. 6,128 or 1,28,28")
    return dims


def _torch_factory(spec: str):
    """The class (or factory) ``module:Class`` names, imported with the working directory first on the path."""
    from .models import OwnModelError, import_class

    try:
        return import_class(spec, Path.cwd())
    except OwnModelError as e:
        raise UsageError(f"torch model: {e}") from None


def input_quant(graph: ir.Graph) -> dict:
    """What a device does to a float sample: ``q = clip(round(x / scale) + zero_point, -128, 127)``."""
    t = graph.tensors[graph.input_id]
    if t.dtype != ir.DType.INT8:
        return {"shape": list(t.shape), "dtype": t.dtype.name.lower(), "scale": None, "zero_point": None}
    return {"shape": list(t.shape), "dtype": "int8", "scale": float(np.ravel(t.scale)[0]),
            "zero_point": int(t.zero_point)}


def _check_proxy(graph: ir.Graph, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Proxy data the scheme search can train on: ``(N >= 2, *input shape)``, labels in ``[0, K)``; returns x as
    int8 (float x is quantized with the model's input quantization, as a device would)."""
    shape = tuple(graph.tensors[graph.input_id].shape)
    k = graph.tensors[graph.output_id].shape[0]
    want = f"(N, {', '.join(map(str, shape))})"
    if x.dtype.kind == "f" and x.ndim >= 2 and x.shape[1:] != shape and int(np.prod(x.shape[1:])) == int(np.prod(shape)):
        x = x.reshape(len(x), *shape)  # NOTE: the model's own layout, e.g. (N, 6, 128) for the IR's (6, 1, 128)
    if x.dtype.kind == "f" and x.shape[1:] == shape:
        if not np.isfinite(x).all():
            raise UsageError("--proxy: x holds NaN or Inf")
        q = input_quant(graph)
        x = np.clip(np.round(x.astype(np.float64) / q["scale"]) + q["zero_point"], -128, 127).astype(np.int8)
    if x.dtype != np.int8 or x.shape[1:] != shape:
        raise UsageError(f"--proxy: x must be float or int8 {want} (int8: quantized like the model's input); "
                         f"got {x.dtype} {x.shape}")
    if len(x) < 2:
        raise UsageError(f"--proxy: at least 2 samples needed (half train, half score), got {len(x)}")
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        raise UsageError(f"--proxy: y must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise UsageError(f"--proxy: labels y must be class indices in [0, {k}), got range [{int(y.min())}, "
                         f"{int(y.max())}]")
    return x


def load_graph(args: argparse.Namespace) -> ir.Graph:
    """The forward graph named by ``args.model`` (with a fresh head when ``--classes`` is given)."""
    spec = args.model
    if spec.endswith(".pkl"):
        from .mit_import import import_mit, load_mit

        if not Path(spec).is_file():
            raise UsageError(f"model file not found: {spec}")
        try:
            cfg = load_mit(spec)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001  NOTE: torch.load of a damaged file raises many kinds
            raise UsageError(f"{spec}: not a readable MIT model .pkl ({type(e).__name__}: {e})") from None
        if args.input_size is not None:
            have = int(cfg["first_conv"].get("in_shape", 128))
            if have != args.input_size:
                raise ValueError(f"{spec} was exported at {have}x{have}; --input-size {args.input_size} is not "
                                 f"supported (omit it or pass {have})")
        graph = import_mit(spec)
    elif ":" in spec:
        import torch

        from .torch_import import import_torch

        factory = _torch_factory(spec)
        try:
            model = factory().eval()
        except Exception as e:  # noqa: BLE001  NOTE: the user's constructor; say how it failed
            raise UsageError(f"{spec}: building the model raised {type(e).__name__}: {e}") from None
        if args.weights:
            from .models import OwnModelError, load_weights

            try:
                load_weights(model, args.weights)
            except OwnModelError as e:
                raise UsageError(f"--weights {e}") from None
        if args.calib:
            calib = _load_array(args.calib, "x", "--calib")
            if calib.dtype.kind != "f" or calib.ndim < 2 or not np.isfinite(calib).all():
                raise UsageError(f"--calib {args.calib}: expected a finite float batch (N, *input shape), got "
                                 f"{calib.dtype} {calib.shape}")
            if args.input_shape and tuple(calib.shape[1:]) != _input_shape(args.input_shape):
                raise UsageError(f"--input-shape {args.input_shape} conflicts with --calib {args.calib}, whose "
                                 f"samples are {tuple(calib.shape[1:])}: give one, or make them agree")
        else:
            shape = args.input_shape or getattr(model, "input_shape", None)
            if shape is None:
                raise UsageError(f"{spec}: pass --input-shape (per sample, e.g. 6,128 or 1,28,28) or --calib")
            calib = torch.randn(256, *_input_shape(shape), generator=torch.Generator().manual_seed(args.seed))
        try:
            graph = import_torch(model, calib, name=type(model).__name__)
        except (RuntimeError, TypeError, IndexError) as e:  # the forward pass on the calibration batch failed
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{spec}: running the model on a calibration batch of shape {tuple(calib.shape)} "
                             f"failed ({first}): check --input-shape / --calib") from None
    else:
        raise ValueError(f"MODEL must be a .pkl file or 'package.module:Class', got {spec!r}")
    if args.classes is not None:
        from .quantize import new_classifier

        if args.classes < 2:
            raise UsageError(f"--classes must be >= 2, got {args.classes}")
        graph = new_classifier(graph, args.classes, seed=args.seed)
    return graph


def _auto_named(graph: ir.Graph, budget: int, recipe: Recipe | None = None) -> tuple[ir.SparseScheme, object]:
    """Without proxy data: the named scheme with the most trainable bytes that fits (cheapest: 'last')."""
    cands = [named_scheme(graph, v) for v in VARIANTS] + list(all_schemes().get(graph.name, {}).values())
    compiled = []
    for s in cands:
        try:
            compiled.append((s, compile_full(graph, s, serialize=False, recipe=recipe)))
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
    """Compile, write ``-o``, print the report; exit 0, or 1 (budget) / 2 (bad input) with one line on stderr."""
    try:
        return _run(args)
    except BudgetError as e:
        print(f"tinyfleet compile: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": "budget", "message": str(e), "required_bytes": e.required}))
        return 1
    except (ConfigError, SchemeError, ValueError, OSError) as e:
        print(f"tinyfleet compile: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("TINYFLEET_DEBUG"):
            raise
        print(f"tinyfleet compile: unexpected {type(e).__name__}: {_one_line(e)} (TINYFLEET_DEBUG=1 shows where)",
              file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = " / ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or text}"
    return text or type(e).__name__


_RECIPE_OPTS = {"accum_steps": "--accum-steps", "momentum": "--momentum", "frac_bits": "--residual-bits",
                "warmup": "--warmup", "warmup/total": "--warmup/--total-steps", "lr_min_q15": "--lr-floor"}


def recipe_from_args(args: argparse.Namespace) -> Recipe | None:
    """The recipe the options ask for (None: the default step); errors name the options."""
    floor = args.lr_floor
    if not (math.isfinite(floor) and 0.0 <= floor <= 1.0):
        raise UsageError(f"--lr-floor: must be a fraction in [0, 1], got {floor}")
    if not math.isfinite(args.momentum):
        raise UsageError(f"--momentum: must be in [0, 1), got {args.momentum}")
    try:
        r = Recipe(accum_steps=args.accum_steps, momentum=args.momentum, frac_bits=args.residual_bits,
                   warmup=args.warmup, total=args.total_steps, lr_min_q15=round(floor * 32768))
    except ValueError as e:
        msgs = str(e).split("; ")
        for field, opt in sorted(_RECIPE_OPTS.items(), key=lambda kv: -len(kv[0])):
            msgs = [m.replace(f"{field}:", f"{opt}:", 1) if m.startswith(f"{field}:") else m for m in msgs]
        raise UsageError("; ".join(msgs)) from None
    return r if r.active else None


def _recipe_json(plan: ir.Plan) -> dict | None:
    pr = plan_recipe(plan)
    if pr is None:
        return None
    r = pr.recipe
    return {"accum_steps": r.accum_steps, "momentum": r.momentum, "beta_q15": r.beta_q15,
            "residual_bits": r.frac_bits, "warmup": r.warmup, "total_steps": r.total, "lr_min_q15": r.lr_min_q15,
            "optimizer_bytes": pr.optimizer_bytes}


def _run(args: argparse.Namespace) -> int:
    board = load(BoardConfig, args.board)
    try:
        budget = parse_size(args.budget) if args.budget else board.training_budget
    except ValueError as e:
        raise UsageError(f"--budget: {e}") from None
    recipe = recipe_from_args(args)
    budgets = _budgets(args.budgets) if args.budgets else None
    budget = max(budgets) if budgets else budget
    graph = load_graph(args)
    if args.scheme == "auto" and args.proxy:
        px, py = _load_array(args.proxy, "x", "--proxy"), _load_array(args.proxy, "y", "--proxy")
        px = _check_proxy(graph, px, py)
        scheme = search_scheme(graph, budget, px, py, seed=args.seed, recipe=recipe).scheme
    elif args.scheme == "auto":
        scheme = _auto_named(graph, budget, recipe)[0]
    else:
        scheme = named_scheme(graph, args.scheme)
    if budgets:
        return _family(args, board.name, graph, scheme, budgets, recipe)
    c = compile_fitting(graph, scheme, budget, {"auto": None, "always": True, "never": False}[args.patch],
                        fuse=not args.no_fuse, recipe=recipe)
    check_budget(c.report, budget, scheme.name)
    digest = ""
    if c.blob is not None:
        from device_agent.wire.plan import plan_hash

        digest = plan_hash(c.blob).hex()
    if args.output:
        if c.blob is None:
            raise UsageError("the plan writer (device_agent.wire.plan) is unavailable")
        try:
            Path(args.output).write_bytes(c.blob)
        except OSError as e:
            raise UsageError(f"-o {args.output}: cannot write ({e.strerror or e})") from None
    out = {"model": graph.name, "board": board.name, "budget_bytes": budget, "scheme": scheme.name,
           "n_bias_update": scheme.n_bias_update, "weight_ratio": {str(k): v for k, v in scheme.weight_ratio.items()},
           "plan_hash": digest, "output": args.output, "recipe": _recipe_json(c.plan),
           "personalization_bytes": method_costs(c.plan), "input": input_quant(graph), **c.report.as_dict()}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        r = c.report
        print(f"{graph.name} / {scheme.name}: peak SRAM {r.peak_sram_bytes / 1000:.1f} KB (arena "
              f"{r.arena_bytes / 1000:.1f} + trainable {r.trainable_bytes / 1000:.1f} + optimizer "
              f"{r.optimizer_bytes / 1000:.1f} + runtime "
              f"{r.runtime_bytes / 1000:.1f}) of {budget / 1000:.1f} KB; flash {r.flash_bytes / 1000:.1f} KB; "
              f"{r.num_ops} ops" + (f"; wrote {args.output}" if args.output else ""))
        q = out["input"]
        if q["scale"] is not None:
            zp = q["zero_point"]
            print(f"input {tuple(q['shape'])} int8: q = clip(round(x / {q['scale']:.6g}) {'-' if zp < 0 else '+'} "
                  f"{abs(zp)}, -128, 127) (scale {q['scale']!r}, zero point {zp}; `tinyfleet quantize-data` "
                  "converts float .npz files)")
    return 0


def _budgets(text: str) -> list[int]:
    try:
        out = [parse_size(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise UsageError(f"--budgets: {e}") from None
    if not out or min(out) <= 0 or len(set(out)) != len(out):
        raise UsageError(f"--budgets: expected distinct sizes > 0, e.g. 28KB,64KB,256KB, got {text!r}")
    return out


def _family(args: argparse.Namespace, board: str, graph: ir.Graph, scheme: ir.SparseScheme, budgets: list[int],
            recipe: Recipe | None) -> int:
    """``--budgets``: the nested family, one plan per distinct plan, written as ``<-o>/plan-<budget>.ttp``."""
    from device_agent.wire.plan import plan_hash, plan_to_bytes

    from .family import build_family

    fam = build_family(graph, scheme, budgets, patch={"auto": None, "always": True, "never": False}[args.patch],
                       fuse=not args.no_fuse, recipe=recipe)
    out_dir = Path(args.output) if args.output else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"-o {out_dir}: cannot create the directory ({e.strerror or e})") from None
    rows = []
    for m in fam.members:
        blob = plan_to_bytes(m.plan)
        path = out_dir / f"plan-{m.budget}.ttp" if out_dir is not None else None
        if path is not None:
            path.write_bytes(blob)
        rows.append({"budget_bytes": m.budget, "need_bytes": m.need, "scheme": m.scheme.name,
                     "n_bias_update": m.scheme.n_bias_update,
                     "weight_ratio": {str(k): v for k, v in m.scheme.weight_ratio.items()},
                     "plan_hash": plan_hash(blob).hex(), "output": str(path) if path else None,
                     **m.report.as_dict()})
    if args.json:
        print(json.dumps({"model": graph.name, "board": board, "budgets": budgets, "family": rows}, sort_keys=True))
    else:
        for r in rows:
            print(f"{graph.name} / {r['scheme']}: budget {r['budget_bytes'] / 1000:.1f} KB, needs "
                  f"{r['need_bytes'] / 1000:.1f} KB, plan {r['plan_hash'][:16]}" + (f" -> {r['output']}" if r["output"] else ""))
    return 0

"""Per-layer diagnosis of the int8 training step against its fp32 twin (same weights, same samples, same scheme).

One command: ``python benchmarks/diagnose_int8.py [--quick] [--n-train 2000] [--steps 0,100,400] [--lr 0.01]``.
For the Fashion / MbV2-w0.35 ``99kb`` task (frozen prefix cached, as ``accuracy_qas.py``) it trains the int8
plan with the engine's plain step at batch 1 and, at each checkpoint, takes ``--probe`` validation samples and
compares per trained layer:

- ``norm_w`` / ``norm_b``: |int8 update| / |fp32 update| (1 = same step size);
- ``cos_w`` / ``cos_b``: cosine between the int8 engine's exact pre-rounding update (``acc * M * 2**E``, in LSB)
  and the fp32 twin's QAS update ``lr dL/dW / s_w`` (``lr dL/dB / (s_x s_w)``), summed over the probe samples;
- ``upd_lsb``: median |update| of one sample in LSB over trained weights, ``w_rms``: rms |w| in LSB;
- ``zero_rtn``: fraction of trained weights whose one-sample update rounds to 0 under round-to-nearest
  (|u| < 0.5 LSB); ``sr_moves``: expected fraction that stochastic rounding moves (mean of min(|u|, 1));
- ``sat_w``: trained weights at +-127; ``sat_b``: biases beyond +-2**30;
- head: logits' int8 range used (max |q|), their real scale, and the fp32 twin's logit std.

Last stdout line: JSON ``{"<step>": {"<layer>": {...}}}``. Exact full command: ``python benchmarks/diagnose_int8.py
--n-train 2000 --steps 0,100,400,2000``.

``--mode twin`` (docs/engine.md "Diagnosis at 10k"): the fp32 twin of the trained tail, on the int8 prefix's
outputs, trained with the study's recipe (batch 16, momentum, warm-up + cosine) with the int8 step's constraints
added one at a time - ``clipw`` (weights projected onto +-127 s_w after each step), ``actq`` (activations
fake-quantized to their int8 scale and clamp, straight-through on linear clamps as ``range_ste``), ``wq``
(forward on round(w / s_w)), ``gq`` (every activation gradient rounded to int8 with a per-sample power-of-two
scale, as ``dyn_requant``), ``bround`` (each applied bias step rounded to whole bias LSBs) - and ``all``; the
int8 engine itself runs with ``--int8`` (native engine when built). Last line ``{"<variant>": {"val_curve",
"test"}}``. ``--mode grads``: after ``--batches`` recipe updates, every error-gradient tensor of one step of
the engine against the twin's real gradient at the same weights (per-sample cosine, norm ratio, mean offset in
units of the fp32 rms, and the fraction of elements the twin has nonzero that the int8 gradient zeroes; the
half-up vs half-to-even comparison in docs/engine.md ran at commit 73d2873^, where ``--grad-rounding`` still
selected the old rounding).
Command used: ``python benchmarks/diagnose_int8.py --mode twin --n-train 3000 --lr 0.003 --int8``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks import accuracy_qas as AQ
from benchmarks.ablation import graph_to_torch, split_graph
from benchmarks.common import emit
from device_agent.engine import ir
from device_agent.engine.conv import ConvGeom, conv_weight_acc
from device_agent.engine.trainer import Trainer
from device_agent.engine.update import channel_mask, lr_mant_exp


def engine_updates(trainer: Trainer, x: np.ndarray, y: np.ndarray, lr: float) -> dict[int, dict]:
    """Per update op: exact real-valued per-sample updates (N, ...) in LSB of the weight and bias, pre-rounding."""
    snap = trainer.trainable_state()
    step = trainer.step
    tr = trainer.trace_step(x, y, lr)
    trainer.load_trainable(snap)  # NOTE: probing must not train
    trainer.step = step
    lr_m, lr_e = lr_mant_exp(lr)
    out = {}
    for op in trainer.plan.ops:
        if op.type != ir.OpType.CONV2D_UPDATE:
            continue
        gid, xid, wid, bid = op.inputs
        a = op.attrs
        g, e = tr.values[gid], tr.exps[gid].astype(np.float64)
        k = int(a["k"])
        geom = ConvGeom.from_attrs(a)
        w = snap[wid]
        res = {"wid": wid, "bid": bid, "k": k}
        mw = (np.int64(lr_m) * a["qas_w_m"].astype(np.int64) + (1 << 14)) >> 15
        mb = (np.int64(lr_m) * a["qas_b_m"].astype(np.int64) + (1 << 14)) >> 15
        scale = np.exp2(e[:, None] + lr_e + 15)  # (N, 1)
        if a["update_weight"] and k > 0:
            xs = tr.values[xid]
            xc = np.zeros((len(x), w.shape[1] * geom.groups, *xs.shape[2:]), np.int64)
            xc[:, :k] = xs[:, :k].astype(np.int64) - trainer.tensors[xid].zero_point
            acc = conv_weight_acc(g, xc, w.shape, geom).astype(np.float64)
            f = (mw * np.exp2(a["qas_w_e"].astype(np.float64)))[None, :] * scale
            res["dw"] = acc * f[:, :, None, None, None]
            res["mask"] = np.broadcast_to(channel_mask(w.shape, geom.groups, k)[:, :, None, None], w.shape)
        if a["update_bias"]:
            acc = g.astype(np.float64).sum(axis=(2, 3))
            res["db"] = acc * (mb * np.exp2(a["qas_b_e"].astype(np.float64)))[None, :] * scale
        out[op.outputs[0] if op.outputs else wid] = res
    return out


def twin_updates(tail: ir.Graph, trainer: Trainer, feats: np.ndarray, y: np.ndarray, lr: float) -> tuple[dict, dict]:
    """fp32 twin of the tail with the trainer's current weights: QAS-equivalent updates in LSB per weight id."""
    g = copy.deepcopy(tail)
    by_name = {t.name: t for t in g.tensors}
    for tid, v in trainer.params.items():
        by_name[trainer.tensors[tid].name].data = v
    model = graph_to_torch(g)
    t_in = g.tensors[g.input_id]
    xr = torch.from_numpy(float(t_in.scale[0]) * (feats.astype(np.float32) - t_in.zero_point))
    per_w, per_b, logits = {}, {}, []
    ids = {t.name: t.id for t in trainer.plan.tensors}  # NOTE: plan ids may differ from the graph's
    for n in range(len(y)):
        model.zero_grad()
        out = model(xr[n:n + 1])
        logits.append(out.detach().numpy()[0])
        torch.nn.functional.cross_entropy(out, torch.tensor([int(y[n])])).backward()
        for i, op in enumerate(g.ops):
            if op.type != ir.OpType.CONV2D:
                continue
            wid, bid = ids[g.tensors[op.inputs[1]].name], ids[g.tensors[op.inputs[2]].name]
            sw = g.tensors[op.inputs[1]].scale.astype(np.float64)
            sx = float(g.tensors[op.inputs[0]].scale[0])
            gw = model.params[f"w{i}"].grad.numpy().astype(np.float64)
            gb = model.params[f"b{i}"].grad.numpy().astype(np.float64)
            per_w.setdefault(wid, []).append(lr * gw / sw[:, None, None, None])
            per_b.setdefault(bid, []).append(lr * gb / (sx * sw))
    return {k: np.stack(v) for k, v in per_w.items()} | {k: np.stack(v) for k, v in per_b.items()}, \
        {"logit_std": float(np.std(logits))}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float((a * b).sum() / (na * nb)) if na > 0 and nb > 0 else float("nan")


def norm_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """|a| / |b| (the int8 update's size relative to the fp32 twin's)."""
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a) / nb) if nb > 0 else float("nan")


def probe(task, tail, trainer: Trainer, feats: np.ndarray, y: np.ndarray, lr: float) -> dict:
    eng = engine_updates(trainer, feats, y, lr)
    twin, extra = twin_updates(tail, trainer, feats, y, lr)
    rows = {}
    for res in eng.values():
        wid, bid = res["wid"], res["bid"]
        name = trainer.tensors[wid].name.removesuffix(".w").removesuffix(".weight")
        r: dict[str, float] = {}
        if "dw" in res:
            m = res["mask"]
            u1 = np.abs(res["dw"][:, m])  # one-sample updates of trained weights (N, n_trained)
            wv = trainer.params[wid][m].astype(np.float64)
            r.update(cos_w=cosine(res["dw"].sum(0)[m], twin[wid].sum(0)[m]),
                     norm_w=norm_ratio(res["dw"].sum(0)[m], twin[wid].sum(0)[m]),
                     upd_lsb=float(np.median(u1)), w_rms=float(np.sqrt((wv ** 2).mean())),
                     zero_rtn=float((u1 < 0.5).mean()), sr_moves=float(np.minimum(u1, 1).mean()),
                     sat_w=int((np.abs(wv) >= 127).sum()), n_w=int(m.sum()))
        if "db" in res:
            r["cos_b"] = cosine(res["db"].sum(0), twin[bid].sum(0))
            r["norm_b"] = norm_ratio(res["db"].sum(0), twin[bid].sum(0))
            r["sat_b"] = int((np.abs(trainer.params[bid].astype(np.int64)) >= 1 << 30).sum())
            r["upd_b_lsb"] = float(np.median(np.abs(res["db"])))
        rows[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    lg = trainer.logits(feats).reshape(len(y), -1).astype(np.int64)
    s_y = float(trainer.tensors[trainer.plan.logits_id].scale[0])
    rows["head"] = {"logit_max_abs_q": int(np.abs(lg).max()), "logit_sat": int((np.abs(lg) >= 127).sum()),
                    "s_y": s_y, "int8_logit_std": round(float(lg.std() * s_y), 4),
                    "fp32_logit_std": round(extra["logit_std"], 4)}
    return rows


# ---------------------------------------------------------------------------------- the fp32 twin, constrained

VARIANTS = {"base": {}, "clipw": {"clipw": True}, "actq": {"actq": True}, "wq": {"wq": True}, "gq": {"gq": True},
            "bround": {"bround": True},
            "all": {"clipw": True, "actq": True, "wq": True, "gq": True, "bround": True}}


class _GradQ(torch.autograd.Function):
    """Identity forward; backward rounds the gradient to int8 with a per-sample power-of-two scale (dyn_requant)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        m = g.abs().flatten(1).max(1).values.clamp_min(1e-30)
        sc = torch.pow(2.0, torch.ceil(torch.log2(m / 127.0))).reshape(-1, *([1] * (g.dim() - 1)))
        return torch.floor(g / sc + 0.5) * sc


def constrained_twin(graph: ir.Graph, actq: bool = False, wq: bool = False, gq: bool = False, keep: bool = False):
    """(module, forward) of ``graph`` in float with optional int8 constraints; ``keep``: forward also returns every
    activation (pre-clamp values under ``("pre", id)``) with ``retain_grad`` for gradient comparisons."""
    from torch.nn import functional as F

    model = graph_to_torch(graph)
    t = graph.tensors

    def fwd(x):
        env = {graph.input_id: x}
        for i, op in enumerate(graph.ops):
            a = op.attrs
            if op.type == ir.OpType.CONV2D:
                w = model.params[f"w{i}"]
                if wq:
                    sw = torch.tensor(t[op.inputs[1]].scale.astype(np.float32)).reshape(-1, 1, 1, 1)
                    w = w + (torch.clamp(torch.round(w / sw), -127, 127) * sw - w).detach()
                y = F.conv2d(env[op.inputs[0]], w, model.params[f"b{i}"], (int(a["stride_h"]), int(a["stride_w"])),
                             (int(a["pad_h"]), int(a["pad_w"])), 1, int(a["groups"]))
            elif op.type == ir.OpType.ADD:
                y = env[op.inputs[0]] + env[op.inputs[1]]
            elif op.type == ir.OpType.AVGPOOL:
                y = env[op.inputs[0]].mean(dim=(2, 3), keepdim=True)
            elif op.type == ir.OpType.RESHAPE:
                env[op.outputs[0]] = env[op.inputs[0]].reshape(-1, *t[op.outputs[0]].shape)
                continue
            else:
                y = env[op.inputs[0]]
            if keep:
                y.retain_grad()
                env[("pre", op.outputs[0])] = y
            yt = t[op.outputs[0]]
            sy, zy = float(yt.scale[0]), yt.zero_point
            lo, hi = int(a.get("act_min", -128)), int(a.get("act_max", 127))
            if lo >= zy:  # a ReLU in the real domain: the exact mask, as the plan's
                y = torch.clamp(y, sy * (lo - zy), sy * (hi - zy))
            if actq:  # NOTE: straight-through on the rounding and on linear clamps (range_ste)
                q = torch.clamp(torch.round(y / sy) + zy, lo, hi)
                y = y + ((q - zy) * sy - y).detach()
            if gq:
                y = _GradQ.apply(y)
            if keep:
                y.retain_grad()
            env[op.outputs[0]] = y
        out = env[graph.output_id].flatten(1)
        return (out, env) if keep else out

    return model, fwd


def train_twin(task, setup: AQ.Setup, feats: dict, lr: float, seed: int = 0, clipw: bool = False,
               actq: bool = False, wq: bool = False, gq: bool = False, bround: bool = False) -> dict:
    """The study's fp32 sparse run on ``feats`` (real inputs of the tail) with the chosen int8 constraints."""
    from torch.nn import functional as F

    from device_agent.engine.recipe import lr_factor_q15

    g, sch, _ = AQ._tail(task, task.sparse)
    torch.manual_seed(seed)
    model, fwd = constrained_twin(g, actq, wq, gq)
    params, masks = AQ.torch_scheme_params(model, g, sch)
    for p, m in masks.items():
        p.register_hook(lambda gr, m=m: gr * m)
    lim, lsb = {}, {}
    for i, op in enumerate(g.ops):
        if op.type == ir.OpType.CONV2D:
            sw = g.tensors[op.inputs[1]].scale.astype(np.float64)
            lim[f"w{i}"] = torch.tensor(127 * sw, dtype=torch.float32).reshape(-1, 1, 1, 1)
            lsb[f"b{i}"] = torch.tensor(float(g.tensors[op.inputs[0]].scale[0]) * sw, dtype=torch.float32)
    ytr = torch.from_numpy(task.y["train"].astype(np.int64))
    rec = setup.recipe(len(ytr))
    opt = torch.optim.SGD(params, lr=lr, momentum=setup.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_factor_q15(u, rec) / 32768)

    def acc(split):
        with torch.no_grad():
            out = torch.cat([fwd(feats[split][i:i + 256]) for i in range(0, len(task.y[split]), 256)])
        return round(float((out.argmax(1).numpy() == task.y[split]).mean()), 4)

    curve = []
    for ep in range(setup.epochs):
        for idx in AQ.order(len(ytr), setup.batch, ep, seed):
            loss = F.cross_entropy(fwd(feats["train"][idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            old = {k: model.params[k].detach().clone() for k in lsb if bround and model.params[k].requires_grad}
            opt.step()
            sched.step()
            with torch.no_grad():
                for k, o in old.items():
                    model.params[k].copy_(o + torch.floor((model.params[k] - o) / lsb[k] + 0.5) * lsb[k])
                for k, m in lim.items():
                    if clipw and model.params[k].requires_grad:
                        model.params[k].copy_(torch.maximum(torch.minimum(model.params[k], m), -m))
        curve.append(acc("val"))
    return {"val_curve": curve, "test": acc("test")}


def real_feats(task, cut: int, qf: dict) -> dict:
    """The tail's real-valued inputs from the int8 prefix outputs (what the engine sees, dequantized)."""
    t = task.graph.tensors[cut]
    return {k: torch.from_numpy(float(t.scale[0]) * (v.astype(np.float32) - t.zero_point)) for k, v in qf.items()}


def grad_compare(task, plan: ir.Plan, trainer: Trainer, x: np.ndarray, y: np.ndarray) -> dict:
    """Every error gradient of one engine step against the twin's at the trainer's current weights."""
    from torch.nn import functional as F

    _, tail = split_graph(task.graph, AQ._tail(task, task.sparse)[2])
    g = copy.deepcopy(tail)
    by_name = {t.name: t for t in g.tensors}
    for tid, v in trainer.params.items():
        by_name[trainer.tensors[tid].name].data = v
    _, fwd = constrained_twin(g, keep=True)
    plain = Trainer(plan)
    plain.load_trainable(trainer.trainable_state())
    tr = plain.trace_step(x, y, 1e-9)
    t_in = g.tensors[g.input_id]
    xr = torch.from_numpy(float(t_in.scale[0]) * (x.astype(np.float32) - t_in.zero_point))
    out, env = fwd(xr)
    F.cross_entropy(out, torch.from_numpy(y.astype(np.int64)), reduction="sum").backward()
    masked = {op.outputs[0] for op in plan.ops if len(op.outputs) == 2 and plan.tensors[op.outputs[1]].dtype == ir.DType.MASK}
    gid = {t.name: t.id for t in g.tensors}
    summed = {t.name.rsplit(".", 1)[0] for t in plan.tensors if t.name.endswith(".gsum")}
    rows = {}
    for pt in plan.tensors:
        base = pt.name.rsplit(".", 1)[0]
        if pt.kind != ir.Kind.GRADIENT or pt.id not in tr.values or base not in gid:
            continue
        if base in summed and not pt.name.endswith(".gsum"):  # NOTE: one branch of a sum, not the gradient
            continue
        fid = next((t.id for t in plan.tensors if t.name == base), None)
        ref = env[("pre", gid[base])] if fid in masked else env[gid[base]]  # NOTE: masks are applied in place
        if ref.grad is None:
            continue
        n = len(y)
        a = (tr.values[pt.id].astype(np.float64).reshape(n, -1) * np.exp2(tr.exps[pt.id].astype(np.float64))[:, None])
        b = ref.grad.numpy().astype(np.float64).reshape(n, -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        ok = nb > 0
        if not ok.any():
            continue
        rms = np.sqrt((b[ok] ** 2).mean())
        rows[pt.name] = {"cos": round(float(np.mean((a * b).sum(1)[ok] / (na[ok] * nb[ok] + 1e-300))), 4),
                         "norm": round(float(np.median(na[ok] / nb[ok])), 4),
                         "offset": round(float((a[ok] - b[ok]).mean() / rms), 4),
                         "zeroed": round(float(((a == 0) & (b != 0)).sum() / max(1, (b != 0).sum())), 4)}
    return rows


def cached_features(task, cut: int, cache: str | None) -> dict:
    """Int8 prefix outputs per split (``features``), kept in ``cache``/feat<n_train>.npz when given."""
    path = Path(cache) / f"feat{len(task.y['train'])}.npz" if cache else None
    if path is not None and path.exists():
        z = np.load(path)
        out = {k: z[k] for k in z.files}
    else:
        out = {s: AQ.features(task, cut, s) for s in ("train", "val", "test")}
        if path is not None:
            np.savez(path, **out)
    for k, v in out.items():
        task.cache[("feat", cut, k)] = v
    return out


def main_twin(args) -> None:
    """``--mode twin``: constrained fp32 twins (and optionally the int8 engine) at one learning rate."""
    task, _ = AQ.fashion_task(False, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    _, cut = AQ.int8_plan(task, task.sparse)
    qf = cached_features(task, cut, args.feature_cache)
    feats = real_feats(task, cut, qf)
    setup = AQ.Setup(batch=args.batch, epochs=args.epochs, engine=args.engine)
    result = {}
    for v in args.variants.split(","):
        result[v] = train_twin(task, setup, feats, args.lr, args.seed, **VARIANTS[v])
        print(f"twin {v}: {result[v]}", file=sys.stderr, flush=True)
    if args.int8:
        result["int8"] = AQ.run_int8(task, setup, task.sparse, args.lr, args.seed)
        print(f"int8: {result['int8']}", file=sys.stderr, flush=True)
    emit(result, [(k, v["val_curve"], v["test"]) for k, v in result.items()], ("variant", "val curve", "test"))


def main_grads(args) -> None:
    """``--mode grads``: recipe updates on the engine, then one step's error gradients against the twin's."""
    task, _ = AQ.fashion_task(False, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    plan, cut = AQ.int8_plan(task, task.sparse)
    qf = cached_features(task, cut, args.feature_cache)
    trainer = Trainer(plan, recipe=AQ.Setup(batch=args.batch, epochs=args.epochs).recipe(args.n_train))
    for idx in AQ.order(args.n_train, args.batch, 0, args.seed)[:args.batches]:
        trainer.train_step(qf["train"][idx], task.y["train"][idx], args.lr)
    rows = grad_compare(task, plan, trainer, qf["val"][:args.probe], task.y["val"][:args.probe])
    emit(rows, [(k, *(f"{a}={b}" for a, b in r.items())) for k, r in rows.items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="probe", choices=("probe", "twin", "grads"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="0,100,400,2000")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--int8", action="store_true", help="twin mode: also the int8 engine with the recipe")
    ap.add_argument("--engine", default="python", choices=("python", "native"))
    ap.add_argument("--batches", type=int, default=100, help="grads mode: recipe updates before the comparison")
    ap.add_argument("--feature-cache", default=None, help="directory to keep the int8 prefix outputs in")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.epochs, args.batches = 64, 32, 32, 1, 2
        args.steps, args.probe, args.variants = "0,5", 8, "base,all"
    if args.mode == "twin":
        return main_twin(args)
    if args.mode == "grads":
        return main_grads(args)
    n_tr = 100 if args.quick else args.n_train
    task, _ = AQ.fashion_task(False, n_train=n_tr, n_val=max(args.probe, 64), n_test=16)
    plan, cut = AQ.int8_plan(task, task.sparse)
    _, tail = split_graph(task.graph, cut)
    feats = {s: AQ.features(task, cut, s) for s in ("train", "val")}
    steps = sorted(int(s) for s in args.steps.split(",") if int(s) <= (20 if args.quick else 10**9))
    trainer = Trainer(plan)
    xv, yv = feats["val"][:args.probe], task.y["val"][:args.probe]
    ytr = task.y["train"]
    order = np.concatenate([np.concatenate(AQ.order(len(ytr), 1, ep, 0)) for ep in range(max(steps) // len(ytr) + 1)])
    result, done = {}, 0
    for s in steps:
        while done < s:
            i = order[done:done + 1]
            trainer.train_step(feats["train"][i], ytr[i], args.lr)
            done += 1
        result[str(s)] = probe(task, tail, trainer, xv, yv, args.lr)
        print(f"step {s}: " + "; ".join(f"{k} {v}" for k, v in result[str(s)].items()), file=sys.stderr, flush=True)
    rows = [(s, layer, *(f"{k}={v}" for k, v in r.items())) for s, per in result.items() for layer, r in per.items()]
    width = max(len(r) for r in rows)
    emit(result, [r + ("",) * (width - len(r)) for r in rows])


if __name__ == "__main__":
    main()

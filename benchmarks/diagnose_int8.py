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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--steps", default="0,100,400,2000")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--probe", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
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

"""Bytes per device per round: TinyFleet's sparse int8 delta + model update vs Flower's dense fp32 FedAvg.

One command: ``python benchmarks/wire_bytes.py [--devices N] [--rounds R] [--steps S] [--topk-permille P]``.
A small fleet really trains, round after round, and every byte counted is a real blob:

- workload: ImuCNN on the smartwatch IMU set (seglearn ``load_watch``; subjects 1-2 pretrain it as in
  configs/quickstart.yaml; the other subjects are the devices' private windows), ``ImuCNN:quarter`` scheme;
  MbV2-w0.35 (the paper's ``99kb`` rung) on Fashion-MNIST images (nearest-neighbour 128x128, 3 channels) when
  ../shared/models and the Debian dataset are present. ``--devices`` devices per round, each ``--steps`` local
  steps (batch 1) at the quickstart's lr 0.05 from the round's model; the coordinator's FedAvg
  (``fleet.aggregate``) makes the next version.
- ours, up: the v2 delta, top-``P``‰ per tensor with error feedback (the device agent's path), mean over devices
  and rounds; ``up_all``: every coordinate (DENSE / FILLED records). down: the Ed25519-signed v2 DIFF model
  update from the round's base to the new version; ``down_full``: the FULL form a joining device fetches.
  ``*_v1``: the same every-coordinate delta and full update in the v1 layouts (the numbers before v2).
- Flower, up: the FedAvg train reply, ``RecordDict({"arrays": ArrayRecord(full model), "metrics":
  MetricRecord({"num-examples": n})})`` serialized with ``flwr.common.serde.recorddict_to_proto(...)
  .SerializeToString()``; down: the train instruction ``RecordDict({"arrays": ..., "config": ConfigRecord})``.
  The full model is the torch ``state_dict()`` for ImuCNN (fp32, BN buffers included, as a Flower user sends
  it) and, for MbV2-w0.35 (no torch module here), every weight and bias of the int8 graph as fp32 arrays.

Payload bytes only on both sides (no MQTT / gRPC framing). For ImuCNN also the devices' test accuracy after
the rounds: every coordinate vs top-k + error feedback vs top-k alone. Last line: one JSON object;
``ratio = (up + down) / (flower_up + flower_down)`` (target <= 1/50).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import MODELS, emit


def flower_bytes(arrays: dict[str, np.ndarray], n_examples: int) -> tuple[int, int]:
    """(reply bytes, instruction bytes) of Flower's FedAvg messages for these fp32 arrays."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    rec = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})
    reply = RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": n_examples})})
    ins = RecordDict({"arrays": rec, "config": ConfigRecord({"lr": 0.05, "local-steps": 20, "server-round": 1})})
    return (len(recorddict_to_proto(reply).SerializeToString()), len(recorddict_to_proto(ins).SerializeToString()))




def fleet_rounds(plan, data: list[tuple[np.ndarray, np.ndarray]], *, rounds: int, steps: int, lr: float,
                 permille: int | None, feedback: bool = True, seed: int = 0, unsent: str = "zero") -> dict:
    """Train ``rounds`` rounds of every device in ``data`` (int8 inputs, labels); measure every blob.

    ``unsent``: how FedAvg counts a coordinate a top-k delta left out: ``zero`` a zero vote (the coordinator's
    rule, ``delta_to_flat``: its value waits in the device's residual), ``keep`` not a vote (the mean over the
    devices that sent it, ``delta_support``; the rule before 2026-12-07, kept as an ablation).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.engine.trainer import Trainer
    from device_agent.protocol import topk_counts
    from device_agent.wire.delta import delta_support, delta_to_dense, encode_delta, residual_after
    from device_agent.wire.envelope import Signer
    from device_agent.wire.plan import plan_hash
    from device_agent.wire.update import model_hash, update_from_state, update_from_states
    from fleet import aggregate as agg

    shared = [t for t in plan.trainable if not t.personal]
    ph = plan_hash(plan)
    signer = Signer.ed25519(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    trainer = Trainer(plan)
    state = {t.id: trainer.trainable_state()[t.id] for t in shared}
    top_k = topk_counts(plan, permille)
    residual: list[dict | None] = [None] * len(data)
    rng = np.random.default_rng(seed)
    m: dict[str, list[float]] = {k: [] for k in ("up", "up_all", "up_v1", "down", "down_full", "down_v1",
                                                  "changed_down", "sent_up")}
    t0 = time.perf_counter()
    for r in range(1, rounds + 1):
        base_hash = model_hash(plan, state, r, plan_hash=ph)
        vals, masks, weights = [], [], []
        for i, (x, y) in enumerate(data):
            trainer.load_trainable(state)
            for _ in range(steps):
                j = int(rng.integers(len(y)))
                trainer.train_step(x[j:j + 1], y[j:j + 1].astype(np.int32), lr)
            new = {t.id: trainer.trainable_state()[t.id] for t in shared}
            hdr = {"device_id": f"dev-{i:04d}", "round_id": r, "base_hash": base_hash, "counter": r,
                   "sample_count": len(y), "plan_hash": ph}
            res = residual[i] if feedback else None
            d = encode_delta(plan, state, new, top_k=top_k, residual=res, **hdr)
            if feedback and top_k is not None:
                residual[i] = residual_after(d, plan, state, new, res)
            every = encode_delta(plan, state, new, **hdr)
            m["up"].append(len(d.to_bytes()))
            m["up_all"].append(len(every.to_bytes()))
            m["up_v1"].append(len(every.to_bytes(version=1)))
            sup = delta_support(d, plan, plan_hash=ph)
            m["sent_up"].append(sum(int(v.sum()) for v in sup.values()))
            if unsent == "zero":  # as delta_to_flat: every coordinate of a tensor with a record
                sup = {t: np.full_like(v, t in {td.tensor_id for td in d.tensors}) for t, v in sup.items()}
            dv = delta_to_dense(d, plan, plan_hash=ph)
            vals.append(np.concatenate([dv[t.id].reshape(-1) for t in shared]))
            masks.append(np.concatenate([sup[t.id].reshape(-1) for t in shared]))
            weights.append(len(y))
        mean = agg.aggregate("fedavg", np.stack(vals), np.stack(masks), np.array(weights, np.int64))
        step, new_state, pos = agg.to_int_delta(mean), {}, 0
        for t in shared:
            new_state[t.id] = agg.apply_int_delta(state[t.id], step[pos:pos + t.numel])
            pos += t.numel
        diff = update_from_states(plan, state, new_state, base_version=r, new_version=r + 1, plan_hash=ph)
        full = update_from_state(plan, new_state, base_version=r, new_version=r + 1, plan_hash=ph)
        m["down"].append(len(diff.to_bytes(signer)))
        m["down_full"].append(len(full.to_bytes(signer)))
        m["down_v1"].append(len(full.to_bytes(signer, version=1)))
        m["changed_down"].append(sum(int(np.count_nonzero(new_state[t.id] != state[t.id])) for t in shared))
        state = new_state
    out: dict = {k: round(float(np.mean(v)), 1) for k, v in m.items()}
    out.update(train_s=round(time.perf_counter() - t0, 1), trainable_params=sum(t.numel for t in shared),
               rounds=rounds, devices=len(data), local_steps=steps, lr=lr, topk_permille=permille, state=state)
    return out


def _accuracy(plan, state: dict | None, x: np.ndarray, y: np.ndarray) -> float:
    from device_agent.engine.trainer import Trainer

    t = Trainer(plan)
    if state is not None:
        t.load_trainable(state)
    return round(t.evaluate(x, y.astype(np.int32)), 4)


def imu_setup(devices: int) -> tuple:
    """The quickstart's ImuCNN plan, ``devices`` devices' int8 training data, the pooled test set, the torch model."""
    import torch

    from fleet.compiler.compile import compile_plan
    from fleet.compiler.pipeline import float_batch, pretrain
    from fleet.compiler.scheme import named_scheme
    from fleet.compiler.torch_import import import_torch
    from fleet.scenarios.base import quantize
    from fleet.scenarios.watch import load_watch_scenario
    from fleet.sim.config import load_sim_config

    cfg = load_sim_config(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")
    sc = load_watch_scenario(devices, cfg.dataset.window, cfg.dataset.stride, tuple(cfg.dataset.proxy_subjects),
                             seed=cfg.seed)
    model = pretrain(cfg, sc.x_proxy, sc.y_proxy, sc.num_classes)
    calib = sc.x_proxy[np.random.default_rng(0).permutation(len(sc.x_proxy))[:512]]
    graph = import_torch(model, torch.from_numpy(float_batch(calib)), name="ImuCNN")
    plan, _ = compile_plan(graph, named_scheme(graph, "quarter", "ImuCNN"))
    t_in = plan.tensors[plan.input_id]
    scale, zp = float(np.ravel(t_in.scale)[0]), int(t_in.zero_point)
    data = [(quantize(d.x_train, scale, zp), d.y_train) for d in sc.devices]
    x_te = np.concatenate([quantize(d.x_test, scale, zp) for d in sc.devices])
    y_te = np.concatenate([d.y_test for d in sc.devices])
    return plan, data, x_te, y_te, model, cfg.lr


def imu_cnn(args) -> dict:
    plan, data, x_te, y_te, model, lr = imu_setup(args.devices)
    kw = {"rounds": args.rounds, "steps": args.steps, "lr": lr}
    r = fleet_rounds(plan, data, permille=args.topk_permille, **kw)
    acc = {"before_rounds": _accuracy(plan, None, x_te, y_te), "topk_ef": _accuracy(plan, r.pop("state"), x_te, y_te)}
    if not args.no_accuracy:
        acc["every_coordinate"] = _accuracy(plan, fleet_rounds(plan, data, permille=None, **kw)["state"], x_te, y_te)
        acc["topk_no_ef"] = _accuracy(plan, fleet_rounds(plan, data, permille=args.topk_permille, feedback=False,
                                                         **kw)["state"], x_te, y_te)
    r["test_accuracy"] = acc
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    r["flower_up"], r["flower_down"] = flower_bytes(sd, args.steps)
    r["model_params"] = int(sum(v.size for v in sd.values()))
    r["scheme"], r["data"] = "ImuCNN:quarter", "seglearn watch, quickstart split"
    return r


def mbv2(args) -> dict | None:
    from benchmarks.common import FASHION, load_fashion_mnist

    path = MODELS / "mbv2-w0.35.pkl"
    if args.mbv2_devices < 1:
        return None
    if not path.exists() or not FASHION.exists():
        print(f"skip mbv2-w0.35: {path} or {FASHION} absent", file=sys.stderr)
        return None
    from device_agent.engine import ir
    from fleet.compiler.compile import compile_plan
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import named_scheme

    graph = new_classifier(import_mit(path), 10)
    plan, _ = compile_plan(graph, named_scheme(graph, "mbv2-w0.35:99kb"))
    t_in = plan.tensors[plan.input_id]
    n = args.mbv2_devices
    x, y = load_fashion_mnist("train", limit=16 * n)
    side = np.arange(t_in.shape[-1]) * 28 // t_in.shape[-1]
    img = x[:, side][:, :, side].astype(np.float32) / 255.0  # nearest neighbour up to the model's resolution
    scale, zp = float(np.ravel(t_in.scale)[0]), int(t_in.zero_point)
    q = np.clip(np.round(img / scale) + zp, -128, 127).astype(np.int8)
    q = np.repeat(q[:, None], t_in.shape[0], axis=1)
    data = [(q[i::n], y[i::n]) for i in range(n)]
    r = fleet_rounds(plan, data, rounds=args.mbv2_rounds, steps=args.mbv2_steps, lr=0.05, permille=args.topk_permille)
    r.pop("state")
    dense = {t.name: np.zeros(t.shape, np.float32) for t in plan.tensors
             if t.kind in (ir.Kind.CONST, ir.Kind.TRAINABLE) and t.name.endswith((".w", ".b", "weight", "bias"))}
    r["flower_up"], r["flower_down"] = flower_bytes(dense, args.mbv2_steps)
    r["model_params"] = int(sum(v.size for v in dense.values()))
    r["scheme"], r["data"] = "mbv2-w0.35:99kb", "fashion-mnist, nearest 128x128x3"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8, help="ImuCNN devices, each trains every round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="local steps (batch 1) per device per round (quickstart)")
    ap.add_argument("--topk-permille", type=int, default=20, help="k = ceil(numel * P / 1000) per tensor")
    ap.add_argument("--mbv2-devices", type=int, default=4, help="0: ImuCNN only")
    ap.add_argument("--mbv2-rounds", type=int, default=2)
    ap.add_argument("--mbv2-steps", type=int, default=3, help="steps for MbV2 (numpy engine, 128x128: slow)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the two extra ImuCNN runs for accuracy")
    args = ap.parse_args()
    results = {"imu_cnn": imu_cnn(args)}
    m = mbv2(args)
    if m is not None:
        results["mbv2_w035"] = m
    rows, out = [], {}
    for name, r in results.items():
        flower = r["flower_up"] + r["flower_down"]
        r.update(ours_bytes=r["up"] + r["down"], flower_dense_bytes=flower, ratio=(r["up"] + r["down"]) / flower,
                 ratio_up=r["up"] / r["flower_up"], ratio_down=r["down"] / r["flower_down"],
                 ratio_v1=(r["up_v1"] + r["down_v1"]) / flower)
        out[name] = r
        rows.append((name, r["scheme"], r["trainable_params"], r["up"], r["down"], r["down_full"], r["up_v1"],
                     r["down_v1"], r["flower_up"], r["flower_down"], f"1/{1 / r['ratio']:.0f}",
                     f"1/{1 / r['ratio_v1']:.0f}"))
    head = results["imu_cnn"]
    out.update(ours_bytes=head["ours_bytes"], flower_dense_bytes=head["flower_dense_bytes"], ratio=head["ratio"],
               worst_ratio=max(r["ratio"] for r in out.values() if isinstance(r, dict)), target_ratio=1 / 50)
    emit(out, rows, ("model", "scheme", "trainable", "up", "down", "down full", "up v1", "down v1", "flower up",
                     "flower down", "ratio", "ratio v1"))


if __name__ == "__main__":
    main()

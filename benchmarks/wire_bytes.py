"""Bytes per device per round: TinyFleet's sparse int8 delta + model update vs Flower's dense fp32 FedAvg.

One command: ``python benchmarks/wire_bytes.py [--steps N] [--topk-permille P]``. Per model, in one run:

- ours, up: the real delta blob (``device_agent.wire.delta``) after ``--steps`` real local training steps of the
  engine's Trainer on the compiled sparse plan (dense records; ``ours_topk_*`` also with top-k);
  down: the Ed25519-signed model update blob carrying the new values of the shared trainable tensors.
- Flower, up: the FedAvg train reply, ``RecordDict({"arrays": ArrayRecord(full model), "metrics":
  MetricRecord({"num-examples": n})})`` serialized with ``flwr.common.serde.recorddict_to_proto(...)
  .SerializeToString()``; down: the train instruction ``RecordDict({"arrays": ..., "config": ConfigRecord})``.
  The full model is the torch ``state_dict()`` for ImuCNN (fp32, BN buffers included, as a Flower user sends
  it) and, for MbV2-w0.35 (no torch module here), every weight and bias of the int8 graph as fp32 arrays.

Payload bytes only on both sides (no MQTT / gRPC framing). ImuCNN uses the ``ImuCNN:quarter`` scheme
(configs/schemes/torch-models.yaml: biases of the last 3 convs, conv 4 weights, 1/4 of conv 5's input channels,
classifier), MbV2-w0.35 the paper's ``99kb`` rung. MbV2 is skipped when ../shared/models is absent.
Last line: one JSON object; ``ratio = ours_bytes / flower_dense_bytes`` (target <= 1/50).
"""

from __future__ import annotations

import argparse
import math
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


def ours_bytes(plan, steps: int, topk_permille: int, seed: int = 0) -> dict:
    """Train ``steps`` real steps from the plan's values, then measure the delta and the next model update."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.engine.trainer import Trainer
    from device_agent.wire.delta import encode_delta
    from device_agent.wire.envelope import Signer
    from device_agent.wire.plan import plan_hash
    from device_agent.wire.update import update_from_state

    rng = np.random.default_rng(seed)
    t_in = plan.tensors[plan.input_id]
    k = plan.tensors[plan.logits_id].shape[0]
    trainer = Trainer(plan)
    old = trainer.trainable_state()
    t0 = time.perf_counter()
    for _ in range(steps):
        x = rng.integers(-128, 128, (1, *t_in.shape)).astype(np.int8)
        trainer.train_step(x, rng.integers(0, k, 1).astype(np.int32), 0.05)
    train_s = time.perf_counter() - t0
    new = trainer.trainable_state()
    ph = plan_hash(plan)
    common = {"device_id": "dev-0001", "round_id": 7, "base_hash": b"\x11" * 32, "counter": 42, "sample_count": steps,
                  "plan_hash": ph}
    shared = [t for t in plan.trainable if not t.personal]
    delta = encode_delta(plan, old, new, **common).to_bytes()
    top_k = {t.id: max(1, math.ceil(t.numel * topk_permille / 1000)) for t in shared}
    delta_topk = encode_delta(plan, old, new, top_k=top_k, **common).to_bytes()
    signer = Signer.ed25519(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    update = update_from_state(plan, new, base_version=6, new_version=7, plan_hash=ph).to_bytes(signer)
    changed = sum(int(np.count_nonzero(new[t.id] != old[t.id])) for t in shared)
    return {"up": len(delta), "up_topk": len(delta_topk), "down": len(update), "train_s": train_s,
            "trainable_params": sum(t.numel for t in shared), "changed_params": changed}


def imu_cnn(steps: int, topk: int) -> dict:
    import torch

    from fleet.compiler.compile import compile_plan
    from fleet.compiler.models import ImuCNN
    from fleet.compiler.scheme import named_scheme
    from fleet.compiler.torch_import import import_torch

    torch.manual_seed(0)
    model = ImuCNN().eval()
    graph = import_torch(model, torch.randn(256, 6, 128, generator=torch.Generator().manual_seed(0)), name="ImuCNN")
    plan, _ = compile_plan(graph, named_scheme(graph, "quarter", "ImuCNN"))
    r = ours_bytes(plan, steps, topk)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    r["flower_up"], r["flower_down"] = flower_bytes(sd, steps)
    r["model_params"] = int(sum(v.size for v in sd.values()))
    r["scheme"] = "ImuCNN:quarter"
    return r


def mbv2(steps: int, topk: int) -> dict | None:
    path = MODELS / "mbv2-w0.35.pkl"
    if not path.exists():
        print(f"skip mbv2-w0.35: {path} absent", file=sys.stderr)
        return None
    from device_agent.engine import ir
    from fleet.compiler.compile import compile_plan
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import named_scheme

    graph = new_classifier(import_mit(path), 10)
    plan, _ = compile_plan(graph, named_scheme(graph, "mbv2-w0.35:99kb"))
    r = ours_bytes(plan, steps, topk)
    dense = {t.name: np.zeros(t.shape, np.float32) for t in plan.tensors
             if t.kind in (ir.Kind.CONST, ir.Kind.TRAINABLE) and t.name.endswith((".w", ".b", "weight", "bias"))}
    r["flower_up"], r["flower_down"] = flower_bytes(dense, steps)
    r["model_params"] = int(sum(v.size for v in dense.values()))
    r["scheme"] = "mbv2-w0.35:99kb"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="local training steps (batch 1) before the delta")
    ap.add_argument("--mbv2-steps", type=int, default=2, help="steps for MbV2 (numpy engine, 128x128: slow)")
    ap.add_argument("--topk-permille", type=int, default=100, help="k per tensor for the top-k variant")
    args = ap.parse_args()
    results = {"imu_cnn": imu_cnn(args.steps, args.topk_permille)}
    m = mbv2(args.mbv2_steps, args.topk_permille)
    if m is not None:
        results["mbv2_w035"] = m
    rows, out = [], {}
    for name, r in results.items():
        ours, flower = r["up"] + r["down"], r["flower_up"] + r["flower_down"]
        r.update(ours_bytes=ours, flower_dense_bytes=flower, ratio=ours / flower, ratio_up=r["up"] / r["flower_up"],
                 ours_topk_bytes=r["up_topk"] + r["down"], ratio_topk=(r["up_topk"] + r["down"]) / flower,
                 train_s=round(r["train_s"], 2))
        out[name] = r
        rows.append((name, r["scheme"], r["model_params"], r["trainable_params"], r["up"], r["down"], r["up_topk"],
                     r["flower_up"], r["flower_down"], f"1/{1 / r['ratio']:.0f}", f"1/{1 / r['ratio_topk']:.0f}"))
    head = results["imu_cnn"]
    out.update(ours_bytes=head["ours_bytes"], flower_dense_bytes=head["flower_dense_bytes"], ratio=head["ratio"],
               worst_ratio=max(r["ratio"] for r in out.values() if isinstance(r, dict)), target_ratio=1 / 50)
    emit(out, rows, ("model", "scheme", "params", "trainable", "ours up", "ours down", "ours up top-k",
                     "flower up", "flower down", "ratio", "ratio top-k"))


if __name__ == "__main__":
    main()

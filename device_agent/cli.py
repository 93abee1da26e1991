"""``device-agent run --broker URL --id ID --data FILE.npz``: one host device of a fleet, until Ctrl-C.

The device fetches the retained, signed plan (``plan/<hash>``), loads its private samples into a bounded
buffer, says hello and then trains whenever the coordinator sends it a task. ``--data`` is an ``.npz`` with
``x`` (N, *plan input shape; int8, or float quantized here with the plan's input scale) and ``y`` (N,) labels.
It never imports the coordinator (``fleet``); it only speaks MQTT.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("run", help="run one host device against a broker"))
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port or mqtts://...")
    p.add_argument("--id", required=True, help="device id (letters, digits, . _ -; at most 64)")
    p.add_argument("--data", required=True, type=Path, help=".npz with x and y (the device's private samples)")
    p.add_argument("--fleet", default="tinyfleet", help="fleet name (topics under tinyfleet/<fleet>/)")
    p.add_argument("--pubkey", type=Path, help="fleet Ed25519 public key (PEM) that signs plans and updates")
    p.add_argument("--insecure-unsigned", action="store_true", help="accept only unsigned blobs (tests only)")
    p.add_argument("--plan", type=Path, help="plan blob file instead of fetching plan/<hash> from the broker")
    p.add_argument("--board", default="host")
    p.add_argument("--sram", type=int, default=320 * 1024, help="bytes of SRAM announced in hello")
    p.add_argument("--flash", type=int, default=1024 * 1024)
    p.add_argument("--capacity", type=int, default=2048, help="sample buffer capacity")
    p.add_argument("--ca-file"), p.add_argument("--cert-file"), p.add_argument("--key-file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", type=Path, help="file that keeps the delta counter (and the trainer's rounding "
                   "step) across restarts (default: <data>.state.json next to --data)")
    p.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive, seconds: a silent device counts as "
                   "gone after 1.5x this")
    p.add_argument("--will-delay", type=int, default=5, help="seconds the broker waits before publishing the Last "
                   "Will (offline status) of a lost connection")


def _verifier(args):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from device_agent.wire.envelope import Verifier

    if args.insecure_unsigned:
        return Verifier.unsigned()
    if args.pubkey is None:
        raise SystemExit("device-agent: --pubkey PEM is required (or --insecure-unsigned for tests)")
    key = serialization.load_pem_public_key(args.pubkey.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SystemExit(f"device-agent: {args.pubkey}: expected an Ed25519 public key")
    return Verifier.ed25519(key)


def fetch_plan(url, fleet: str, client_id: str, verify, timeout: float = 10.0):
    """The one retained plan under ``plan/+`` (a clear error if there are none or several)."""
    from device_agent.mqtt import MqttEndpoint
    from device_agent.wire.messages import full_topic, split_topic
    from device_agent.wire.plan import plan_from_bytes

    got: queue.Queue = queue.Queue()

    def on_msg(topic: str, payload: bytes, ack) -> None:
        ack()
        got.put((split_topic(fleet, topic), payload))

    ep = MqttEndpoint(url, f"{client_id}-plan", [full_topic(fleet, "plan/+")], on_msg, session_expiry=0)
    ep.start(timeout)
    blobs = {}
    try:
        blobs.update([got.get(timeout=timeout)])
        while True:  # retained messages arrive together; collect the rest
            blobs.update([got.get(timeout=0.5)])
    except queue.Empty:
        pass
    finally:
        ep.stop()
    if len(blobs) != 1:
        raise SystemExit(f"device-agent: expected one retained plan on {full_topic(fleet, 'plan/+')}, got "
                         f"{len(blobs)}{': ' + ', '.join(k[0][:16] for k in blobs) if blobs else ''}; "
                         "is the coordinator running (tinyfleet serve)?")
    return plan_from_bytes(next(iter(blobs.values())), verify=verify)


def run(args: argparse.Namespace) -> int:
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import BrokerURL, BrokerURLError, DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    from device_agent.wire.plan import plan_from_bytes

    try:
        url = BrokerURL.parse(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    except BrokerURLError as e:
        print(f"device-agent: {e}", file=sys.stderr)
        return 2
    verify = _verifier(args)
    plan = (plan_from_bytes(args.plan.read_bytes(), verify=verify) if args.plan
            else fetch_plan(url, args.fleet, f"tinyfleet-{args.fleet}-{args.id}", verify))
    data = np.load(args.data)
    if "x" not in data or "y" not in data:
        print(f"device-agent: {args.data}: expected arrays x and y, got {sorted(data.files)}", file=sys.stderr)
        return 2
    inp = plan.tensors[plan.input_id]
    x, y = data["x"], np.asarray(data["y"]).astype(np.int32)
    if x.shape[1:] != tuple(inp.shape):
        print(f"device-agent: {args.data}: x must be (N, {', '.join(map(str, inp.shape))}), got {x.shape}",
              file=sys.stderr)
        return 2
    if x.dtype != np.int8:  # quantize with the plan's input parameters
        scale = float(np.ravel(inp.scale)[0])
        x = np.clip(np.round(x.astype(np.float64) / scale) + inp.zero_point, -128, 127).astype(np.int8)
    buf = SampleBuffer(args.capacity, tuple(inp.shape), np.int8, seed=args.seed)
    buf.add(x, y)
    state_file = args.state or args.data.with_suffix(".state.json")
    state = _load_state(state_file)
    trainer = Trainer(plan)
    trainer.step = state["trainer_step"]
    proto = DeviceProtocol(Identity(args.id, args.board, args.sram, args.flash), plan, trainer,
                           WireDeviceCodec(plan, verify), buf, counter=state["counter"], seed=args.seed)
    _persist_state(proto, state_file, state)
    agent = DeviceAgent(url, args.fleet, proto, keepalive=args.keepalive, will_delay=args.will_delay)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent.start()
    print(f"device-agent: {args.id} on {url}, plan {proto.codec.plan_hash[:16]}, {len(buf)} samples",
          file=sys.stderr)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    agent.stop(graceful=True)
    return 0


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
        if not (isinstance(state, dict) and all(type(state.get(k)) is int for k in ("counter", "trainer_step"))):
            raise ValueError
        return state
    except FileNotFoundError:
        return {"counter": 0, "trainer_step": 0}
    except ValueError:
        raise SystemExit(f"device-agent: {path}: expected {{\"counter\": int, \"trainer_step\": int, ...}}; "
                         "delete it only for a device that never trained in this fleet") from None


def _persist_state(proto, path: Path, state: dict) -> None:
    """Keep what a restarted agent needs in ``path`` (atomically, fsynced), written whenever a new delta was made,
    before the adapter publishes it: the delta counter (never reused: the coordinator refuses a counter it has seen
    as REPLAYED_COUNTER, so a device restarted at 0 could never contribute again; a board keeps it in flash), the
    trainer's step (it seeds the stochastic rounding) and the last delta with its round and base model hash.

    A restarted agent answers a task for exactly that round and base with the same delta bytes, as the protocol
    asks of a repeated task (the delta may have died with the process before it left); trained again, it would
    differ. A task for a later round makes the saved delta moot.
    """
    from device_agent.protocol import Received
    from device_agent.wire.messages import MessageError, Task, parse

    inner = proto.handle
    saved = state if state.get("delta") else None

    def handle(event):
        nonlocal saved
        if saved is not None and isinstance(event, Received) and event.kind == "task":
            try:
                task = parse(event.payload, Task)
                if (task.round_id, task.model_hash) == (saved["round"], saved["base"]):
                    proto.last_round, proto.last_delta = saved["round"], bytes.fromhex(saved["delta"])
                    saved = None
                elif task.round_id > saved["round"]:
                    saved = None
            except MessageError:
                pass
        before = proto.counter
        out = inner(event)
        if proto.counter != before:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"counter": proto.counter, "trainer_step": int(proto.trainer.step),
                           "round": proto.last_round, "base": proto.model_hash, "delta": proto.last_delta.hex()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return out
    proto.handle = handle


if __name__ == "__main__":
    sys.exit(main())

"""``device-agent run --broker URL --id ID --data FILE.npz``: one host device of a fleet, until Ctrl-C.

The device fetches the retained, signed plan (``plan/<hash>``), loads its private samples into a bounded
buffer, says hello and then trains whenever the coordinator sends it a task. ``--data`` is an ``.npz`` with
``x`` (N, *plan input shape; int8, or float quantized here with the plan's input scale) and ``y`` (N,) labels.
It never imports the coordinator (``fleet``); it only speaks MQTT. Bad input (files, keys, plan, samples that do
not fit the plan, an unreachable broker, an invalid id) is one line on stderr and exit 2, never a traceback
(``TINYFLEET_DEBUG=1`` shows one for an unexpected error); what the device does while running (model versions,
rounds trained or failed, acks) is logged one line each on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import queue
import re
import signal
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np

_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as device_agent.wire.messages: an MQTT topic level


class CliError(Exception):
    """What the user must fix, in one line (printed as ``device-agent: <message>``, exit 2)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("run", help="run one host device against a broker"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CliError as e:
        print(f"device-agent: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("TINYFLEET_DEBUG"):
            raise
        print(f"device-agent: unexpected {type(e).__name__}: {e} (TINYFLEET_DEBUG=1 shows where)", file=sys.stderr)
        return 2


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
    p.add_argument("--buffer-policy", choices=("fifo", "reservoir"), default="fifo",
                   help="which samples a full buffer keeps: the newest (fifo) or a uniform sample (reservoir)")
    p.add_argument("--personalize", choices=("ditto", "finetune", "head", "bias"),
                   help="train a personal copy after each model update (docs/personalization.md; it never leaves)")
    p.add_argument("--personal-steps", type=int, default=20, help="local steps per model update (--personalize)")
    p.add_argument("--personal-lr", type=float, default=0.05, help="learning rate of the personal steps")
    p.add_argument("--ditto-lambda", type=float, default=0.1, help="Ditto's pull toward the global model, [0, 1]")
    p.add_argument("--ca-file"), p.add_argument("--cert-file"), p.add_argument("--key-file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", type=Path, help="file that keeps the delta counter (and the trainer's rounding "
                   "step) across restarts (default: <data>.state.json next to --data)")
    p.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive, seconds: a silent device counts as "
                   "gone after 1.5x this")
    p.add_argument("--will-delay", type=int, default=5, help="seconds the broker waits before publishing the Last "
                   "Will (offline status) of a lost connection")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the broker at start")


def _verifier(args):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from device_agent.wire.envelope import Verifier

    if args.insecure_unsigned:
        return Verifier.unsigned()
    if args.pubkey is None:
        raise CliError("--pubkey PEM is required (or --insecure-unsigned for tests)")
    try:
        key = serialization.load_pem_public_key(args.pubkey.read_bytes())
    except OSError as e:
        raise CliError(f"--pubkey {args.pubkey}: cannot read ({e.strerror or e})") from None
    except (ValueError, TypeError):
        raise CliError(f"--pubkey {args.pubkey}: not a PEM public key (expected the fleet's Ed25519 key, "
                       "-----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CliError(f"--pubkey {args.pubkey}: expected an Ed25519 public key, got {type(key).__name__}")
    return Verifier.ed25519(key)


def fetch_plan(url, fleet: str, client_id: str, verify, timeout: float = 10.0, sram: int | None = None):
    """The retained plan this device trains: the one under ``plan/+``, or, for a nested plan family (several plans
    and a ``plan/index``), the largest whose SRAM need fits ``sram`` (as the coordinator assigns it); a clear error
    otherwise."""
    from device_agent.mqtt import MqttEndpoint
    from device_agent.wire.messages import MessageError, PlanIndex, full_topic, parse, split_topic

    got: queue.Queue = queue.Queue()
    index_topic = full_topic(fleet, "plan/index")

    def on_msg(topic: str, payload: bytes, ack) -> None:
        ack()
        got.put((topic, payload))

    ep = MqttEndpoint(url, f"{client_id}-plan", [full_topic(fleet, "plan/+")], on_msg, session_expiry=0)
    try:
        ep.start(timeout)
    except ConnectionError:
        raise CliError(f"no connection to the broker {url} within {timeout:g} s: is it running, and are the "
                       "URL, credentials and TLS files right?") from None
    retained = {}
    try:
        retained.update([got.get(timeout=timeout)])
        while True:  # retained messages arrive together; collect the rest
            retained.update([got.get(timeout=0.5)])
    except queue.Empty:
        pass
    finally:
        ep.stop()
    index = retained.pop(index_topic, None)
    blobs = {k[0]: v for t, v in retained.items() if (k := split_topic(fleet, t)) is not None and k[1] == "plan"}
    where = full_topic(fleet, "plan/+")
    if not blobs:
        raise CliError(f"no retained plan on {where} within {timeout:g} s. Two likely causes: "
                       f"the coordinator serves another fleet name (--fleet {fleet!r} must equal the config's "
                       "`name:`, which `tinyfleet serve` prints as \"fleet '<name>'\"; the default is 'tinyfleet'), "
                       "or no coordinator (`tinyfleet serve` or a Flower ServerApp) has started on this broker yet "
                       "(--connect-timeout waits longer)")
    if len(blobs) == 1:
        return _plan(next(iter(blobs.values())), verify, f"the retained plan on {where}")
    if index is None or sram is None:
        raise CliError(f"expected one retained plan on {where}, got {len(blobs)} and no plan/index saying which "
                       f"fits this device: {', '.join(h[:16] for h in blobs)}; give the one to train with "
                       "--plan FILE.ttp")
    try:
        idx = parse(index, PlanIndex)
    except MessageError as e:
        raise CliError(f"{index_topic}: refused: {e}") from None
    assert isinstance(idx, PlanIndex)
    chosen = idx.choose(sram)
    if chosen is None:
        raise CliError(f"no plan of this fleet fits --sram {sram}: the smallest needs {min(idx.sram)} bytes, so the "
                       "coordinator will not ask this device to train (give the bytes the device really has)")
    if chosen not in blobs:
        raise CliError(f"{index_topic} names plan {chosen[:16]} for --sram {sram}, but no retained {where} holds it")
    return _plan(blobs[chosen], verify, f"the retained plan {chosen[:16]} on {where} (largest that fits "
                                        f"--sram {sram})")


def _plan(blob: bytes, verify, what: str):
    from device_agent.wire.errors import WireFormatError
    from device_agent.wire.plan import plan_from_bytes

    try:
        return plan_from_bytes(blob, verify=verify)
    except WireFormatError as e:
        raise CliError(f"{what}: refused: {e}") from None


def _load_plan(args, url, verify):
    if args.plan is None:
        return fetch_plan(url, args.fleet, f"tinyfleet-{args.fleet}-{args.id}", verify, args.connect_timeout, args.sram)
    try:
        blob = args.plan.read_bytes()
    except OSError as e:
        raise CliError(f"--plan {args.plan}: cannot read ({e.strerror or e})") from None
    return _plan(blob, verify, f"--plan {args.plan}")


_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)


def load_samples(path: Path, plan) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x, y, saturated)`` from the .npz at ``path``, checked against ``plan`` (device_agent.samples)."""
    from device_agent.samples import SampleError, prepare

    if not path.is_file():
        raise CliError(f"--data {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            raise CliError(f"--data {path}: a single array (.npy); expected an .npz with arrays x and y "
                           "(np.savez(path, x=x, y=y))")
        with data:
            if "x" not in data.files or "y" not in data.files:
                raise CliError(f"--data {path}: expected arrays x and y, got {sorted(data.files)}")
            x, y = data["x"], data["y"]
    except CliError:
        raise
    except _UNREADABLE as e:
        raise CliError(f"--data {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    try:
        return prepare(plan, x, y)
    except SampleError as e:
        raise CliError(f"--data {path}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import BrokerURL, BrokerURLError, DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    _check_flags(args)
    try:
        url = BrokerURL.parse(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    except BrokerURLError as e:
        raise CliError(str(e)) from None
    verify = _verifier(args)
    plan = _load_plan(args, url, verify)
    x, y, saturated = load_samples(args.data, plan)
    if saturated:
        log(args.id, "note", f"{saturated} of {x.size} input values were outside the plan's int8 input range "
                             "and saturated at -128/127")
    if len(x) > args.capacity:
        log(args.id, "note", f"{len(x)} samples, --capacity {args.capacity}: the buffer keeps the newest "
                             f"{args.capacity}")
    state_file = args.state or args.data.with_suffix(".state.json")
    state = _load_state(state_file)
    buf = SampleBuffer(args.capacity, x.shape[1:], x.dtype, policy=args.buffer_policy, seed=args.seed)
    buf.add(x, y)
    trainer = Trainer(plan)
    trainer.step = state["trainer_step"]
    pers = None
    if args.personalize:
        from device_agent.engine.personal import Personalizer, PersonalSpec

        try:
            pers = Personalizer(plan, PersonalSpec(args.personalize, args.personal_steps, args.personal_lr,
                                                   round(args.ditto_lambda * 32768)))
        except ValueError as e:
            raise CliError(f"--personalize {args.personalize}: {e}") from None
    proto = DeviceProtocol(Identity(args.id, args.board, args.sram, args.flash), plan, trainer,
                           WireDeviceCodec(plan, verify), buf, counter=state["counter"], seed=args.seed,
                           personalizer=pers)
    _persist_state(proto, state_file, state)
    try:
        agent = DeviceAgent(url, args.fleet, proto, keepalive=args.keepalive, will_delay=args.will_delay,
                            log=lambda what, detail: log(args.id, what, detail))
    except (OSError, ValueError) as e:  # NOTE: paho loads the TLS files here
        raise CliError(f"TLS setup for {url}: {e}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        agent.start(args.connect_timeout)
    except ConnectionError:
        agent.stop(graceful=False)
        raise CliError(f"no connection to the broker {url} within {args.connect_timeout:g} s: is it running, and "
                       "are the URL, credentials and TLS files right?") from None
    log(args.id, "started", f"on {url}, plan {proto.codec.plan_hash[:16]}, {len(buf)} samples")
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    agent.stop(graceful=True)
    log(args.id, "stopped", "offline status published" if agent.said_offline else "no broker connection at exit")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """What can be checked before touching the broker (so a typo does not wait out a connect timeout)."""
    from device_agent.wire.messages import Hello, MessageError

    if not _ID.fullmatch(args.id):
        raise CliError(f"--id {args.id!r}: expected 1-64 letters, digits, '.', '_' or '-' (it is an MQTT topic level)")
    try:
        Hello(args.id, args.board, 0, 0).to_json()
    except MessageError:
        raise CliError(f"--board {args.board!r}: expected 1-64 letters, digits, '.', '_' or '-'") from None
    if args.capacity < 1:
        raise CliError(f"--capacity must be >= 1, got {args.capacity}")
    if args.personal_steps < 0 or not args.personal_lr > 0 or not 0 <= args.ditto_lambda <= 1:
        raise CliError(f"--personal-steps must be >= 0, --personal-lr > 0 and --ditto-lambda in [0, 1], got "
                       f"{args.personal_steps}, {args.personal_lr}, {args.ditto_lambda}")
    for name in ("sram", "flash"):
        if not 0 <= getattr(args, name) < 2**32:
            raise CliError(f"--{name} must be in 0..2**32-1 bytes, got {getattr(args, name)}")
    for flag in ("ca_file", "cert_file", "key_file"):
        f = getattr(args, flag)
        if f is not None and not Path(f).is_file():
            raise CliError(f"--{flag.replace('_', '-')} {f}: no such file")
    if not args.data.is_file():
        raise CliError(f"--data {args.data}: no such file")


def log(device_id: str, what: str, detail: str = "") -> None:
    """One line on stderr: ``device-agent: <id>: <what>: <detail>``."""
    print(f"device-agent: {device_id}: {what}{': ' + detail if detail else ''}", file=sys.stderr, flush=True)


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
        if not (isinstance(state, dict) and all(type(state.get(k)) is int for k in ("counter", "trainer_step"))):
            raise ValueError
        return state
    except FileNotFoundError:
        return {"counter": 0, "trainer_step": 0}
    except OSError as e:
        raise CliError(f"--state {path}: cannot read ({e.strerror or e})") from None
    except ValueError:
        raise CliError(f"--state {path}: expected {{\"counter\": int, \"trainer_step\": int, ...}}; "
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

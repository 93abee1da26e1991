"""Host devices in worker processes: each device's protocol, trainer and private samples live in one worker.

``backend: python`` devices used to train on threads of the runner process, where the GIL holds them to about
one core. With ``workers: N`` the runner keeps only each device's MQTT endpoint
(:class:`device_agent.mqtt.DeviceAgent`); its :class:`~device_agent.protocol.DeviceProtocol`, engine ``Trainer``
and :class:`~device_agent.buffer.SampleBuffer` are built inside worker process ``i % N``, which handles every
event of the device (``Start``, ``Received``, ``Heartbeat``) and sends back the publish intents.

The runner hands a device's training samples to its worker once, at setup (the harness loaded the data set);
from then on they exist only in the worker's buffer. Every device sees the same events in the same order and
is built with the same seeds as on the in-process path, so its deltas are bit-identical
(tests/pure/test_workers.py). Workers are spawned (the runner already has network threads), so a script that
calls ``run_simulation`` needs the usual ``if __name__ == "__main__":`` guard, as for any multiprocessing code.
This module only moves work between processes; it implements no protocol logic.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# what the runner may ask of a device in its worker (method paths on the DeviceProtocol)
CALLS = ("handle", "status", "last_will", "subscriptions", "set_session", "trainer.trainable_state",
         "trainer.state_hash", "personal_model")


class WorkerError(RuntimeError):
    """A worker process failed or refused a call; the message names the device and the cause."""


def _verifier_spec(verifier) -> tuple[str, bytes | None]:
    """A picklable form of a ``device_agent.wire.envelope.Verifier`` (Ed25519 keys do not pickle)."""
    key = getattr(verifier, "_key", None)
    if verifier.mode == "ed25519":
        from cryptography.hazmat.primitives import serialization as ser

        return "ed25519", key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)  # type: ignore[union-attr]
    return verifier.mode, key  # type: ignore[return-value]


def _verifier(spec: tuple[str, bytes | None]):
    from device_agent.wire.envelope import Verifier

    mode, key = spec
    if mode == "ed25519":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Verifier.ed25519(Ed25519PublicKey.from_public_bytes(key))
    return Verifier.hmac_sha256(key) if mode == "hmac" else getattr(Verifier, mode)()


class DeviceHost:
    """The devices of one worker: index -> DeviceProtocol over this worker's copy of the plan."""

    def __init__(self, plan):
        self.plan = plan
        self.devices: dict[int, object] = {}
        self._verifiers: dict[tuple, object] = {}

    def add(self, idx: int, identity, verifier: tuple[str, bytes | None], buffer: tuple, x: np.ndarray | None,
            y: np.ndarray | None, seed: int, personal=None) -> None:
        """Build device ``idx`` exactly as the in-process path: buffer ``(capacity, x_shape, dtype, seed)``;
        ``personal``: an engine ``PersonalSpec`` (or None) for the device's personalizer."""
        from device_agent.buffer import SampleBuffer
        from device_agent.engine.trainer import Trainer
        from device_agent.protocol import DeviceProtocol, WireDeviceCodec

        if verifier not in self._verifiers:
            self._verifiers[verifier] = _verifier(verifier)
        capacity, shape, dtype, buf_seed = buffer
        buf = SampleBuffer(capacity, tuple(shape), dtype, seed=buf_seed)
        if x is not None and len(x):
            buf.add(x, y)
        pers = None
        if personal is not None:
            from device_agent.engine.personal import Personalizer

            pers = Personalizer(self.plan, personal)
        self.devices[idx] = DeviceProtocol(identity, self.plan, Trainer(self.plan),
                                           WireDeviceCodec(self.plan, self._verifiers[verifier]), buf, seed=seed,
                                           personalizer=pers)

    def call(self, idx: int, path: str, args: tuple) -> tuple[object, int]:
        """``path`` on device ``idx`` -> (result, the device's model version after it)."""
        if path not in CALLS:
            raise ValueError(f"worker call {path!r} is not one of {', '.join(CALLS)}")
        obj = self.devices[idx]
        for name in path.split("."):
            obj = getattr(obj, name)
        return obj(*args), self.devices[idx].version  # type: ignore[operator,attr-defined]


def _serve(conn, plan) -> None:
    """A worker's main loop: one request at a time, ``(op, args)`` in, ``("ok", result)`` or ``("error", text)``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # NOTE: Ctrl-C is the runner's; it ends workers by closing the pipe
    host = DeviceHost(plan)
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        op, args = req
        try:
            conn.send(("ok", getattr(host, op)(*args)))
        except Exception as e:  # noqa: BLE001  NOTE: the runner decides what a failed device means
            conn.send(("error", f"{type(e).__name__}: {e}"))


class WorkerPool:
    """``n`` worker processes (spawned: the runner has network threads) holding copies of ``plan``."""

    def __init__(self, n: int, plan):
        if n < 1:
            raise ValueError(f"workers: need at least 1 worker process, got {n}")
        ctx = mp.get_context("spawn")
        self.conns, self.procs, self.locks = [], [], []
        self.placement: dict[int, int] = {}  # device index -> worker (default: index % n)
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, plan), name=f"tinyfleet-devices-{i}", daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
            self.locks.append(threading.Lock())
        # NOTE: one thread per worker: a worker handles one request at a time, so more threads would only queue
        self.executors = [ThreadPoolExecutor(1, thread_name_prefix=f"worker-{i}") for i in range(n)]

    def __len__(self) -> int:
        return len(self.procs)

    def request(self, w: int, op: str, *args: object) -> object:
        with self.locks[w]:
            try:
                self.conns[w].send((op, args))
                status, value = self.conns[w].recv()
            except (EOFError, OSError, BrokenPipeError) as e:
                code = self.procs[w].exitcode
                raise WorkerError(f"device worker {w} is gone (exit code {code}): {type(e).__name__}") from None
        if status != "ok":
            raise WorkerError(f"device worker {w}: {value}")
        return value

    def device(self, idx: int, identity, verifier, x: np.ndarray | None, y: np.ndarray | None,
               buffer: tuple, seed: int, personal=None) -> RemoteProtocol:
        """Device ``idx`` built in its worker (``placement``); returns the runner-side stand-in for its protocol."""
        w = self.placement.get(idx, idx % len(self))
        self.request(w, "add", idx, identity, _verifier_spec(verifier), buffer, x, y, seed, personal)
        return RemoteProtocol(self, w, idx, identity)

    def close(self) -> None:
        for ex in self.executors:
            ex.shutdown(wait=False, cancel_futures=True)
        for conn, lock in zip(self.conns, self.locks):
            with lock:
                try:
                    conn.send(None)
                except OSError:
                    pass
                conn.close()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)


class _RemoteTrainer:
    def __init__(self, proto: RemoteProtocol):
        self._p = proto

    def trainable_state(self) -> dict:
        return self._p._call("trainer.trainable_state")

    def state_hash(self) -> str:
        return self._p._call("trainer.state_hash")


class RemoteProtocol:
    """Runner-side stand-in for a DeviceProtocol living in a worker: what DeviceAgent and the runner use."""

    def __init__(self, pool: WorkerPool, worker: int, idx: int, identity):
        self.pool, self.worker, self.idx, self.id = pool, worker, idx, identity
        self.version = -1
        self._session: int | None = None
        self.trainer = _RemoteTrainer(self)

    @property
    def executor(self):
        return self.pool.executors[self.worker]

    def _call(self, path: str, *args: object):
        result, self.version = self.pool.request(self.worker, "call", self.idx, path, args)
        return result

    def handle(self, event: object) -> list:
        return self._call("handle", event)

    def status(self, state: str = "online"):
        return self._call("status", state)

    def last_will(self):
        return self._call("last_will")

    @property
    def session(self) -> int | None:
        return self._session

    @session.setter
    def session(self, value: int | None) -> None:  # NOTE: DeviceAgent numbers each connection (Status.session)
        self._session = value
        self._call("set_session", value)

    def subscriptions(self) -> list[str]:
        return self._call("subscriptions")

    def personal_model(self) -> dict:
        return self._call("personal_model")

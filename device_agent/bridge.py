"""The device agent's side of an MCU board: a :class:`~device_agent.protocol.LocalTrainer` whose training runs on
the board, over TCP (an emulated board: :class:`~device_agent.board.QemuBoard`) or a serial port (a real one,
pyserial), with the same frame code (``device_agent.wire.frames`` via :class:`~device_agent.board.BoardClient`).

The fleet protocol (:class:`~device_agent.protocol.DeviceProtocol`) is unchanged: it calls
``load_trainable`` (-> LOAD_UPDATE, a full-state TFUP v1 blob, which also becomes the board's delta base),
``train_step`` (-> PUSH_SAMPLE + TRAIN 1: the board trains N = 1 steps, bit-exact with the Python Trainer) and
``trainable_state`` (-> GET_DELTA, dense, added to the base). It refuses mini-batches (the board has N = 1: use
``batch_size = 1`` in tasks for board devices) and reading personal tensors (they never leave the board).
"""

from __future__ import annotations

import math
from urllib.parse import parse_qs, urlparse

import numpy as np

from device_agent.board import BoardClient, BoardError
from device_agent.engine import ir
from device_agent.engine.qmath import mant_exp
from device_agent.engine.trainer import StepStats
from device_agent.wire import frames
from device_agent.wire.delta import delta_from_records, delta_to_dense
from device_agent.wire.plan import plan_hash, plan_to_bytes
from device_agent.wire.update import update_from_state

_ARENA_KINDS = (ir.Kind.INPUT, ir.Kind.LABEL, ir.Kind.ACTIVATION, ir.Kind.GRADIENT, ir.Kind.MASK)


class _SerialStream:
    """The socket calls BoardClient uses, over a pyserial port."""

    def __init__(self, port: str, baud: int, timeout: float):
        try:
            import serial  # type: ignore[import-not-found]
        except ImportError:
            raise RuntimeError("a serial board needs pyserial: `pip install pyserial` (TCP boards do not)") from None
        self.port = serial.Serial(port, baud, timeout=timeout)

    def sendall(self, data: bytes) -> None:
        self.port.write(data)
        self.port.flush()

    def recv(self, n: int) -> bytes:
        data = self.port.read(max(1, min(n, self.port.in_waiting or 1)))
        if not data:
            raise TimeoutError(f"no answer from the board on {self.port.port}")
        return data

    def settimeout(self, t: float) -> None:
        self.port.timeout = t

    def setsockopt(self, *args) -> None:
        pass

    def close(self) -> None:
        self.port.close()


def connect(url: str, timeout: float = 60.0) -> BoardClient:
    """A client for ``tcp://host:port`` (emulated board) or ``serial:///dev/ttyACM0?baud=115200`` (real board)."""
    u = urlparse(url)
    if u.scheme == "tcp":
        if not u.hostname or not u.port:
            raise ValueError(f"board URL {url!r}: expected tcp://host:port")
        return BoardClient((u.hostname, u.port), timeout=timeout)
    if u.scheme == "serial":
        baud = int(parse_qs(u.query).get("baud", ["115200"])[0])
        client = BoardClient.__new__(BoardClient)
        client.sock = _SerialStream(u.path, baud, timeout)  # type: ignore[assignment]
        client.deframer, client.pending, client.seq = frames.Deframer(), [], 0
        return client
    raise ValueError(f"board URL {url!r}: scheme must be tcp:// or serial://")


def _v1(blob_writer, **kw) -> bytes:
    """The v1 layout the firmware reads, whatever version the Python writer defaults to."""
    try:
        return blob_writer(version=1, **kw)
    except TypeError:
        return blob_writer(**kw)


class BoardTrainer:
    """LocalTrainer backed by a board. Loads ``plan`` onto it on construction (unless ``load_plan=False``).

    Parameters
    ----------
    client : a connected :class:`BoardClient` (see :func:`connect`).
    plan : the ir.Plan the board runs (its blob is sent with LOAD_PLAN, unsigned: boards built "unsigned only").
    """

    def __init__(self, client: BoardClient, plan: ir.Plan, load_plan: bool = True):
        self.client, self.plan = client, plan
        unplanned = [t.name for t in plan.tensors if t.kind in _ARENA_KINDS and t.offset < 0]
        if plan.arena_bytes <= 0 or plan.input_id in [t.id for t in plan.tensors if t.name in unplanned]:
            raise ValueError(f"plan {plan.name!r} has no arena layout (arena_bytes {plan.arena_bytes}): a board runs "
                             f"compiled plans only (fleet.compiler.planner.plan_arena / tinyfleet compile)")
        self.blob = plan_to_bytes(plan)
        self.hash = plan_hash(self.blob)
        self.shared = sorted(t.id for t in plan.trainable if not t.personal)
        self.base = {t.id: np.array(t.data, copy=True).reshape(t.shape) for t in plan.trainable}
        self.version = 0
        tin = plan.tensors[plan.input_id]
        self.input = tin
        if load_plan:
            client.load_plan(self.blob)

    # ---- LocalTrainer --------------------------------------------------------------------------------------

    def load_trainable(self, state: dict[int, np.ndarray]) -> None:
        """Send the shared tensors as a full-state model update (base_version 0); personal ones stay on the board."""
        for tid, v in state.items():
            if tid not in self.base:
                raise KeyError(f"tensor {tid} is not trainable in plan {self.plan.name!r}")
            self.base[tid] = np.array(v, dtype=self.base[tid].dtype, copy=True).reshape(self.base[tid].shape)
        self.version += 1
        upd = update_from_state(self.plan, self.base, base_version=0, new_version=self.version, plan_hash=self.hash)
        self.client.load_update(_v1(upd.to_bytes))

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepStats:
        """One N = 1 step on the board: PUSH_SAMPLE then TRAIN 1 (it trains on the sample just pushed)."""
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
        if x.shape[0] != 1 or y.shape != (1,):
            raise ValueError(f"a board trains one sample per step (N = 1), got a batch of {x.shape[0]}: "
                             f"use batch_size = 1 in tasks for board devices")
        if x.shape[1:] != tuple(self.input.shape):
            raise ValueError(f"sample shape {x.shape[1:]}, the plan's input is {self.input.shape}")
        dt = "<i4" if self.input.dtype == ir.DType.INT32 else "<i1"
        self.client.push_sample(np.ascontiguousarray(x[0].astype(dt)).tobytes(), int(y[0]))
        lr_m, lr_e = mant_exp(float(lr))
        r = self.client.train(1, lr_m, lr_e)
        return StepStats(math.nan, r["correct"], 1)

    def trainable_state(self) -> dict[int, np.ndarray]:
        """Base + the board's delta (GET_DELTA, dense) for the shared tensors; personal ones as last loaded."""
        records = self.client.delta_records(0)
        d = delta_from_records(records, device_id="board", round_id=0, base_hash=b"\0" * 32, plan_hash=self.hash,
                               counter=1, sample_count=1)
        dense = delta_to_dense(d, self.plan, plan_hash=self.hash)
        out = {tid: v.copy() for tid, v in self.base.items()}
        for tid, dv in dense.items():
            out[tid] = (self.base[tid].astype(np.int64) + dv).astype(self.base[tid].dtype)
        return out

    def state_hash(self) -> str:
        """The board's own sha256 of its trainable tensors (== Trainer.state_hash of the same training)."""
        return bytes(self.client.state()["state_hash"]).hex()


__all__ = ["BoardError", "BoardTrainer", "connect"]

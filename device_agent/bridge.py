"""The device agent's side of an MCU board: a :class:`~device_agent.protocol.LocalTrainer` whose training runs on
the board, over TCP (an emulated board: :class:`~device_agent.board.QemuBoard`) or a serial port (a real one,
pyserial), with the same frame code (``device_agent.wire.frames`` via :class:`~device_agent.board.BoardClient`).

The fleet protocol (:class:`~device_agent.protocol.DeviceProtocol`) is unchanged: it calls
``load_trainable`` (-> LOAD_UPDATE, a full-state TFUP v1 blob, which also becomes the board's delta base),
``train_step`` / ``train_steps`` (N = 1 steps, bit-exact with the Python Trainer) and ``trainable_state``
(-> GET_DELTA, dense, added to the base). It refuses mini-batches (the board has N = 1: use ``batch_size = 1`` in
tasks for board devices) and reading personal tensors (they never leave the board).

Samples live on the board (protocol v2): ``store_samples`` puts the device's sensor stream into the board's
sample store once (STORE_SAMPLES, many per frame), and a step names a stored slot (TRAIN_LIST), so a 20-step
round sends one small frame instead of 20 samples. :class:`SampleSlots` is the host's map of that store, keyed
by content (label + bytes): whatever sample the agent's buffer draws, the board trains on the same bytes and
label, so results stay bit-exact. A v1 board falls back to PUSH_SAMPLE + TRAIN 1 per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlparse

import numpy as np

from device_agent.board import BoardClient, BoardError
from device_agent.engine import ir
from device_agent.engine.personal import Personalizer, PersonalSpec, method_ids
from device_agent.engine.qmath import mant_exp
from device_agent.engine.recipe import plan_recipe
from device_agent.engine.trainer import StepStats
from device_agent.wire import frames
from device_agent.wire.delta import delta_from_records, delta_to_dense, max_records_bytes
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


class SampleSlots:
    """The host's map of a board's sample store (``capacity`` slots): which sample sits in which slot.

    A sample is keyed by ``label i32 | input bytes``. New samples take free slots first, then replace the slot
    stored longest ago (FIFO), never one listed in ``keep`` (the steps about to train).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("the board has no sample store (capacity 0): is its plan store too small?")
        self.capacity = capacity
        self.slot_of: dict[bytes, int] = {}
        self.key_at: list[bytes | None] = [None] * capacity
        self._next = 0

    def place(self, key: bytes, keep: set[int] = frozenset()) -> tuple[int, bool]:
        """``(slot, is_new)``: where ``key`` is, or the slot it must be stored into now."""
        if key in self.slot_of:
            return self.slot_of[key], False
        for _ in range(self.capacity):
            slot, self._next = self._next, (self._next + 1) % self.capacity
            if slot not in keep:
                break
        else:
            raise ValueError(f"more distinct samples in one TRAIN_LIST than the board's {self.capacity} slots")
        old = self.key_at[slot]
        if old is not None:
            del self.slot_of[old]
        self.key_at[slot], self.slot_of[key] = key, slot
        return slot, True


class BoardTrainer:
    """LocalTrainer backed by a board. Loads ``plan`` onto it on construction (unless ``load_plan=False``).

    Parameters
    ----------
    client : a connected :class:`BoardClient` (see :func:`connect`).
    plan : the ir.Plan the board runs (its blob is sent with LOAD_PLAN, unsigned: boards built "unsigned only").
    stored : train on samples kept in the board's sample store (protocol v2) when the board has one; False: push
        every step's sample (PUSH_SAMPLE + TRAIN 1, the v1 path).
    """

    def __init__(self, client: BoardClient, plan: ir.Plan, load_plan: bool = True, stored: bool = True):
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
        self._dt = "<i4" if tin.dtype == ir.DType.INT32 else "<i1"
        self.nbytes = int(np.prod(tin.shape)) * (4 if tin.dtype == ir.DType.INT32 else 1)
        self.stored = stored
        self.slots: SampleSlots | None = None  # set when the board's store is first used
        self.personal_bytes = 0  # SRAM the board reserved for a personal copy (BoardPersonalizer's PERSONAL_SETUP)
        self.samples_sent = 0  # samples that crossed the UART (STORE_SAMPLES or PUSH_SAMPLE)
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

    def sample_key(self, x: np.ndarray, y) -> bytes:
        """``label i32 | input bytes`` of one sample (its identity in :class:`SampleSlots`)."""
        x = np.asarray(x)
        if x.shape != tuple(self.input.shape):
            raise ValueError(f"sample shape {x.shape}, the plan's input is {tuple(self.input.shape)}")
        return int(np.asarray(y).reshape(())).to_bytes(4, "little", signed=True) + np.ascontiguousarray(
            x.astype(self._dt)).tobytes()

    def _store(self) -> SampleSlots | None:
        """The board's sample store map (None: a v1 board or ``stored=False``: push per step)."""
        if self.slots is None and self.stored:
            if self.client.ping()["protocol_version"] < 2:
                self.stored = False
                return None
            cap = self.client.store_samples(0, [], self.nbytes)["sample_capacity"]
            self.slots = SampleSlots(cap)
        return self.slots

    def _send(self, new: list[tuple[int, bytes]]) -> None:
        """STORE_SAMPLES for (slot, key) pairs, one transfer per run of consecutive slots."""
        new = sorted(new)
        i = 0
        while i < len(new):
            j = i + 1
            while j < len(new) and new[j][0] == new[j - 1][0] + 1:
                j += 1
            run = [(k[4:], int.from_bytes(k[:4], "little", signed=True)) for _, k in new[i:j]]
            self.client.store_samples(new[i][0], run, self.nbytes)
            self.samples_sent += len(run)
            i = j

    def store_samples(self, x: np.ndarray, y: np.ndarray) -> int:
        """The device's sensor stream: samples ``x`` (N, *input) with labels ``y`` (N,) go into the board's store
        (those it does not hold yet). Returns how many crossed the UART."""
        slots = self._store()
        if slots is None:
            return 0
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
        new = {}
        for xi, yi in zip(x[-slots.capacity:], y[-slots.capacity:], strict=True):
            slot, fresh = slots.place(self.sample_key(xi, yi))
            if fresh:
                new[slot] = slots.key_at[slot]
        self._send(list(new.items()))
        return len(new)

    def train_steps(self, samples: list[bytes], lr: float) -> dict[str, int]:
        """N = 1 steps on the given samples (keys from :meth:`sample_key`), in order: TRAIN_LIST over stored slots,
        storing first whichever the board does not hold. Returns the board's TRAIN counters."""
        lr_m, lr_e = mant_exp(float(lr))
        slots = self._store()
        if slots is None:
            out = {"steps_done": 0, "samples_used": 0, "correct": 0}
            for k in samples:
                self.client.push_sample(k[4:], int.from_bytes(k[:4], "little", signed=True))
                self.samples_sent += 1
                r = self.client.train(1, lr_m, lr_e)
                for f in out:
                    out[f] += r[f]
            return out
        out = {"steps_done": 0, "samples_used": 0, "correct": 0}
        for todo in self.stored_runs(samples):
            r = self.client.train_list(todo, lr_m, lr_e)
            out = {f: out[f] + r[f] for f in out}
        return out

    def stored_runs(self, samples: list[bytes]) -> Iterator[list[int]]:
        """The slots of ``samples`` (keys from :meth:`sample_key`) in order, in runs the board holds at once: each
        run is stored (STORE_SAMPLES for what the board lacks) before it is yielded. Needs a v2 board."""
        slots = self._store()
        if slots is None:
            raise BoardError(frames.Status.ERR_STATE, "this board keeps no samples (protocol v1 or stored=False)")
        todo: list[int] = []
        new: list[tuple[int, bytes]] = []
        for k in samples:
            if k not in slots.slot_of and len(set(todo)) >= slots.capacity:
                self._send(new)  # the store is full of this list's samples: use what is listed so far
                yield todo
                todo, new = [], []
            slot, fresh = slots.place(k, keep=set(todo))
            if fresh:
                new.append((slot, k))
            todo.append(slot)
        self._send(new)
        if todo:
            yield todo

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepStats:
        """One N = 1 step on the board on sample ``x[0]``: from its store (TRAIN_LIST, storing the sample first if
        the board does not hold it), or PUSH_SAMPLE + TRAIN 1 on a v1 board."""
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
        if x.shape[0] != 1 or y.shape != (1,):
            raise ValueError(f"a board trains one sample per step (N = 1), got a batch of {x.shape[0]}: "
                             f"use batch_size = 1 in tasks for board devices")
        r = self.train_steps([self.sample_key(x[0], y[0])], lr)
        return StepStats(math.nan, r["correct"], 1)

    def trainable_state(self) -> dict[int, np.ndarray]:
        """Base + the board's delta (GET_DELTA, dense) for the shared tensors; personal ones as last loaded."""
        records = self.client.delta_records(0, max_total=max_records_bytes(self.plan))
        d = delta_from_records(records, device_id="board", round_id=0, base_hash=b"\0" * 32, plan_hash=self.hash,
                               counter=1, sample_count=1, plan=self.plan)
        dense = delta_to_dense(d, self.plan, plan_hash=self.hash)
        out = {tid: v.copy() for tid, v in self.base.items()}
        for tid, dv in dense.items():
            out[tid] = (self.base[tid].astype(np.int64) + dv).astype(self.base[tid].dtype)
        return out

    def state_hash(self) -> str:
        """The board's own sha256 of its trainable tensors (== Trainer.state_hash of the same training)."""
        return bytes(self.client.state()["state_hash"]).hex()

    @property
    def memory(self) -> dict[str, int]:
        """What the board measured of itself: SRAM = statics (.data + .bss) + the plan's pool (+ a personal copy)
        + the painted stack's high-water mark; flash = firmware + plan blob."""
        info, stats = self.client.board_info(), self.client.stats()
        pool = pool_need(self.plan)
        if self.personal_bytes:  # NOTE: the copy sits 8-aligned after the runtime's part of the pool
            pool = -(-pool // 8) * 8 + self.personal_bytes
        return {"sram_bytes": info["static_ram"] + pool + info["stack_high_water"],
                "flash_bytes": info["flash_used"] + stats["plan_bytes"], "stack_high_water": info["stack_high_water"]}


class BoardPersonalizer:
    """:class:`~device_agent.engine.personal.Personalizer` run by the board (PERSONAL_* commands,
    firmware/src/device/tf_device_personal.c): the same spec and samples give the same personal model bit for bit
    (compare :meth:`hash` with the reference's), but the copy stays in the board's SRAM and is never read back.

    Parameters
    ----------
    trainer : the device's :class:`BoardTrainer` (the samples a step names are stored on its board).
    spec : method, steps, lr, Ditto's lam_q15; batch_size must be 1 (the board trains N = 1).
    """

    def __init__(self, trainer: BoardTrainer, spec: PersonalSpec):
        if spec.batch_size != 1:
            raise ValueError(f"a board personalizes one sample per step, got batch_size {spec.batch_size}")
        self.trainer, self.spec, self.plan = trainer, spec, trainer.plan
        self.ids = method_ids(trainer.plan, spec.method)
        self.cost = trainer.client.personal_setup(spec.method, self.ids, spec.lam_q15)  # what the board reserved
        trainer.personal_bytes = self.cost["sram_bytes"]
        self.updates = 0
        self.steps_done = 0

    def update(self, trainer, reference: dict[int, np.ndarray], batch: Callable[[int], tuple]) -> None:
        """Personalize on the board on top of the model update it holds (``reference``: the same model, unused:
        the board reads the global values from its stored update); ``batch(k)`` gives step k's ``(x, y)``."""
        # NOTE: a wrapper that defers board traffic (fleet/sim/backends.LazyBoardTrainer) hands over its board
        # holding exactly the current model update, untrained
        board = trainer.personal_board() if hasattr(trainer, "personal_board") else trainer
        if board is not self.trainer:
            raise ValueError("a BoardPersonalizer personalizes on its own board's trainer")
        trainer = board
        del reference
        keys = []
        for k in range(self.spec.steps):
            x, y = batch(k)
            x, y = np.asarray(x), np.asarray(y).reshape(-1)
            if x.shape[0] != 1 or y.shape != (1,):
                raise ValueError(f"a board personalizes one sample per step, got a batch of {x.shape[0]}")
            keys.append(trainer.sample_key(x[0], y[0]))
        lr_m, lr_e = mant_exp(float(self.spec.lr))
        first = True
        for run in trainer.stored_runs(keys):
            r = trainer.client.personalize(run, lr_m, lr_e, restart=first and self.spec.method == "finetune")
            self.steps_done = r["personal_steps"]
            first = False
        self.updates += 1

    def model(self, reference: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Refused: the personal copy never leaves the board (compare :meth:`hash` instead)."""
        raise BoardError(frames.Status.ERR_STATE, "the personal model stays on the board: compare hash()")

    def hash(self) -> str:
        """The board's sha256 of its personal model (== Trainer.state_hash of Personalizer.model(global))."""
        return bytes(self.trainer.client.personal_hash()["personal_hash"]).hex()


def make_personalizer(trainer, plan: ir.Plan, spec: PersonalSpec):
    """The personalizer a device runs: on its board for a :class:`BoardTrainer`, else the host reference."""
    return BoardPersonalizer(trainer, spec) if isinstance(trainer, BoardTrainer) else Personalizer(plan, spec)


def pool_need(plan: ir.Plan) -> int:
    """SRAM a plan takes from the board's pool, as ``tf_runtime_pool_need`` computes it: the arena (8-aligned),
    a 4-aligned copy of every trainable tensor, and a training recipe's optimizer region."""
    pr = plan_recipe(plan)
    return (-(-plan.arena_bytes // 8) * 8 + sum(-(-t.nbytes // 4) * 4 for t in plan.trainable)
            + (pr.optimizer_bytes if pr is not None else 0))


__all__ = ["BoardError", "BoardPersonalizer", "BoardTrainer", "SampleSlots", "connect", "make_personalizer", "pool_need"]

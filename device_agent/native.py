"""The native engine: the firmware's C training runtime behind the reference :class:`Trainer`'s interface.

``NativeTrainer(plan)`` trains with the same C the boards run (``firmware/boards/host/tf_native.c`` over the
kernels and runtime, built as a shared library by ``make native``), so it is bit-exact with the reference by
construction (tests compare state hashes step by step). Forward-only work (``predict``, ``evaluate``) and state
I/O stay in the reference engine, on the values copied back after each call. It trains at batch 1 as a board
does: a batch of N samples is N device steps in one call, which is what the reference does only with a
training recipe (plain reference mini-batches sum N gradients into one update; that is refused here rather
than silently changed). A plan's training recipe (plan v2 RECIPE section) runs in C with its optimizer state
there; ``load_trainable`` (a new model version) resets it, as on a board and in the reference. In a source
tree it refuses a library built from other sources than the tree's (its build id differs): run ``make native``.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
from pathlib import Path

import numpy as np

from device_agent.engine import ir
from device_agent.engine.forward import check_input
from device_agent.engine.recipe import plan_recipe
from device_agent.engine.trainer import StepStats, Trainer
from device_agent.engine.update import lr_mant_exp
from device_agent.wire.plan import plan_to_bytes

FIRMWARE = Path(__file__).resolve().parent.parent / "firmware"
LIBRARY = FIRMWARE / "build" / "native" / "libtinyfleet_native.so"
# What the library is built from (boards/host/native.mk SRC and HDR; keep the two lists alike): its build id hashes
# these files.
NATIVE_SOURCES = ("src/kernels/*.c", "src/runtime/*.c", "src/wire/*.c", "src/proto/tf_crc.c", "boards/host/tf_native.c",
                  "include/*.h", "src/kernels/*.h", "src/runtime/*.h", "src/wire/*.h")
RUNTIME_ERRORS = {1: "too many tensors/ops/classes for the runtime's tables", 2: "not enough memory",
                  3: "an op the runtime cannot run", 4: "an op's scratch buffer is missing",
                  5: "a kernel refused", 6: "a bad sample (label out of range or token id outside the table)"}

_lib: ctypes.CDLL | None = None


class NativeError(RuntimeError):
    """The native library is missing or refused the plan or a step."""


def source_build_id(firmware: Path) -> str | None:
    """The build id ``make native`` gives a library built from the sources under ``firmware``; None outside a source
    tree (no ``boards/host/native.mk``). As native.mk: the first 16 hex digits of the sha256 of ``sha256sum``'s
    listing of the files, in path order."""
    if not (firmware / "boards" / "host" / "native.mk").is_file():
        return None
    files = sorted({p.relative_to(firmware).as_posix() for pattern in NATIVE_SOURCES for p in firmware.glob(pattern)})
    listing = "".join(f"{hashlib.sha256((firmware / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def library_build_id(lib: ctypes.CDLL) -> str | None:
    """The build id a library exports (None: built before libraries had one)."""
    try:
        fn = lib.tf_native_build_id
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode("ascii")


def load_library(path: Path | None = None) -> ctypes.CDLL:
    """The shared library (built once per checkout by ``make native``), with its function signatures; in a source
    tree, only if it was built from that tree's sources (:func:`source_build_id`)."""
    global _lib
    if _lib is not None and path is None:
        return _lib
    path = path or LIBRARY
    if not path.exists():
        raise NativeError(f"native engine library {path} not built: run `make native` (needs gcc)")
    lib = ctypes.CDLL(str(path))
    want = source_build_id(FIRMWARE)
    built = library_build_id(lib)
    if want is not None and built != want:
        raise NativeError(f"native engine library {path} is stale: built from other sources than {FIRMWARE} "
                          f"(build id {built or 'none'}, the sources give {want}): run `make native` to rebuild it")
    u8p, i32p, u32p = ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_uint32)
    lib.tf_native_open.restype = ctypes.c_void_p
    lib.tf_native_open.argtypes = [u8p, ctypes.c_uint32, i32p, i32p]
    lib.tf_native_close.argtypes = [ctypes.c_void_p]
    lib.tf_native_steps.restype = ctypes.c_int
    lib.tf_native_steps.argtypes = [ctypes.c_void_p, u8p, ctypes.c_uint32, i32p, ctypes.c_uint32, ctypes.c_int32,
                                    ctypes.c_int32, u32p, i32p, i32p]
    lib.tf_native_tensor.restype = ctypes.c_int
    lib.tf_native_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int32, u8p, ctypes.c_uint32, ctypes.c_int]
    lib.tf_native_get_step.restype = ctypes.c_uint32
    lib.tf_native_get_step.argtypes = [ctypes.c_void_p]
    lib.tf_native_set_step.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.tf_native_err_op.restype = ctypes.c_int32
    lib.tf_native_err_op.argtypes = [ctypes.c_void_p]
    lib.tf_native_get_pending.restype = ctypes.c_uint32
    lib.tf_native_get_pending.argtypes = [ctypes.c_void_p]
    lib.tf_native_set_pending.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.tf_native_reset_optimizer.argtypes = [ctypes.c_void_p]
    lib.tf_native_optimizer.restype = ctypes.c_int
    lib.tf_native_optimizer.argtypes = [ctypes.c_void_p, u8p, ctypes.c_uint32]
    if path == LIBRARY:
        _lib = lib
    return lib


def _ptr(a: np.ndarray, kind=ctypes.c_uint8):
    return a.ctypes.data_as(ctypes.POINTER(kind))


class NativeTrainer(Trainer):
    """A :class:`Trainer` whose ``train_step`` runs in the firmware's C runtime (one handle per instance)."""

    def __init__(self, plan: ir.Plan, library: Path | None = None) -> None:
        super().__init__(plan)
        if plan.arena_bytes <= 0:
            raise NativeError(f"plan {plan.name!r} has no arena layout: a board (and this engine) runs planned "
                              "plans only (fleet.compiler.planner.plan_arena, as `tinyfleet compile` does)")
        self._lib = load_library(library)
        blob = np.frombuffer(plan_to_bytes(plan), np.uint8).copy()
        err, err_op = ctypes.c_int32(0), ctypes.c_int32(-1)
        self._h = self._lib.tf_native_open(_ptr(blob), blob.size, ctypes.byref(err), ctypes.byref(err_op))
        if not self._h:
            e = err.value
            why = (f"plan reader: wire error {e}" if e < 100 else
                   f"runtime: {RUNTIME_ERRORS.get(e - 100, e - 100)} at op {err_op.value}" if e < 200 else
                   "out of memory")
            raise NativeError(f"native engine refused plan {plan.name!r}: {why}")
        self._sample_bytes = int(np.prod(plan.tensors[plan.input_id].shape)) * \
            (4 if plan.tensors[plan.input_id].dtype == ir.DType.INT32 else 1)

    def __del__(self) -> None:
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._lib.tf_native_close(h)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepStats:
        """N device steps at batch 1 (N must be 1 without a recipe); the same bits as the reference's N = 1 steps."""
        xs = check_input(self.tensors[self.plan.input_id], x)
        n = xs.shape[0]
        if n != 1 and self.recipe is None:
            raise ValueError(f"the native engine trains at batch 1, as a board does; got {n} samples "
                             "(call train_step once per sample, or use steps())")
        return self.steps(xs, y, lr)

    def steps(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepStats:
        """``len(x)`` consecutive device steps (batch 1 each) in one call: what a board does with a buffer."""
        xs = np.ascontiguousarray(check_input(self.tensors[self.plan.input_id], x))
        n = xs.shape[0]
        if n < 1:
            raise ValueError("train_step needs at least one sample, got an empty batch")
        labels = np.ascontiguousarray(self._labels(y, n), np.int32)
        lr_m, lr_e = lr_mant_exp(lr)
        self._lib.tf_native_set_step(self._h, self.step & 0xFFFFFFFF)
        self._lib.tf_native_set_pending(self._h, self.pending)
        done = ctypes.c_uint32(0)
        correct, p = np.zeros(n, np.int32), np.zeros(n, np.int32)
        raw = xs.astype(xs.dtype.newbyteorder("<"), copy=False).view(np.uint8)
        e = self._lib.tf_native_steps(self._h, _ptr(raw), self._sample_bytes, _ptr(labels, ctypes.c_int32), n,
                                      lr_m, lr_e, ctypes.byref(done), _ptr(correct, ctypes.c_int32),
                                      _ptr(p, ctypes.c_int32))
        self._pull()
        if e:
            raise NativeError(f"native step {done.value} of {n} failed: {RUNTIME_ERRORS.get(e, e)} at op "
                              f"{self._lib.tf_native_err_op(self._h)} (the first {done.value} steps were applied)")
        # NOTE: the loss from the runtime's Q15 probability of the label (the reference computes it in float)
        loss = float(np.mean([-math.log(max(int(v), 1) / 32768.0) for v in p]))
        return StepStats(loss, int(correct.sum()), n)

    def load_trainable(self, state: dict[int, np.ndarray]) -> None:
        super().load_trainable(state)
        self._lib.tf_native_reset_optimizer(self._h)
        for tid in state:
            v = np.ascontiguousarray(self.params[tid], self.params[tid].dtype.newbyteorder("<")).view(np.uint8)
            if self._lib.tf_native_tensor(self._h, tid, _ptr(v), v.size, 1) != 0:
                raise NativeError(f"native engine: tensor {tid} is not a trainable tensor of its size")

    def _pull(self) -> None:
        for tid, v in self.params.items():
            buf = np.empty(v.nbytes, np.uint8)
            if self._lib.tf_native_tensor(self._h, tid, _ptr(buf), buf.size, 0) != 0:
                raise NativeError(f"native engine: cannot read trainable tensor {tid}")
            self.params[tid] = buf.view(v.dtype.newbyteorder("<")).astype(v.dtype).reshape(v.shape)
        self.step = int(self._lib.tf_native_get_step(self._h))
        self.pending = int(self._lib.tf_native_get_pending(self._h))

    def optimizer_region(self) -> bytes:
        """The recipe's optimizer region as the C runtime holds it (b"" without a recipe)."""
        pr = plan_recipe(self.plan)
        n = pr.optimizer_bytes if pr is not None else 0
        buf = np.zeros(n, np.uint8)
        if self._lib.tf_native_optimizer(self._h, _ptr(buf), n) != 0:
            raise NativeError(f"native engine: the optimizer region is not {n} bytes")
        return buf.tobytes()

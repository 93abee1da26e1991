"""``tinyfleet quantize-data IN.npz -o OUT.npz``: float samples -> the int8 a plan's input takes, as a device would.

The input quantization comes from a plan (``--plan plan.ttp``: its input tensor, with the same checks a device
applies to its data, device_agent/samples.py) or is given (``--scale``, ``--zero-point``, printed by
``tinyfleet compile``): ``q = clip(round(x / scale) + zero_point, -128, 127)``. ``y`` and any other array are
copied unchanged. It refuses NaN/Inf, non-float ``x``, a file that is not a .npz (zip) archive and one without ``x``;
it says how many values saturated.
"""

from __future__ import annotations

import argparse
import math
import sys
import zipfile
from pathlib import Path

import numpy as np


class QuantizeError(ValueError):
    """Bad input, one line for stderr."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help=".npz with float x (and y, kept as is)")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the .npz with int8 x")
    p.add_argument("--plan", type=Path, help="take the input quantization (and shape) from this plan (.ttp)")
    p.add_argument("--scale", type=float, help="input scale (the compile report's input.scale)")
    p.add_argument("--zero-point", type=int, help="input zero point (the compile report's input.zero_point)")


def quantize(x: np.ndarray, scale: float, zero_point: int) -> tuple[np.ndarray, int]:
    """``(int8 x, saturated)``: float ``x`` quantized; ``saturated`` counts values clipped to the int8 range."""
    if x.dtype.kind != "f":
        raise QuantizeError(f"x must be float samples to quantize, got {x.dtype}")
    if not np.isfinite(x).all():
        raise QuantizeError("x holds NaN or Inf")
    if not (math.isfinite(scale) and scale > 0):
        raise QuantizeError(f"--scale must be a finite number > 0, got {scale}")
    if not -128 <= zero_point <= 127:
        raise QuantizeError(f"--zero-point must be in [-128, 127], got {zero_point}")
    q = np.round(x.astype(np.float64) / scale) + zero_point
    return np.clip(q, -128, 127).astype(np.int8), int(np.count_nonzero((q < -128) | (q > 127)))


# NOTE: np.load guesses the format from the first bytes and takes anything else for a pickle, so a text or .npy
# file would be reported as pickled data; a .npz is a zip archive (local file header, or the end record if empty).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise QuantizeError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as e:
        raise QuantizeError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head.startswith(_ZIP_MAGIC):
        what = "a single-array .npy file" if head.startswith(_NPY_MAGIC) else \
            "an empty file" if not head else f"it starts with {head[:4]!r}"
        raise QuantizeError(f"{path}: not a .npz (zip) archive ({what}); save the samples with "
                            "np.savez(path, x=x, y=y)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if isinstance(data, np.ndarray) or "x" not in data.files:
                raise QuantizeError(f"{path}: expected an .npz with an array x (np.savez(path, x=x, y=y))")
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, QuantizeError):
            raise
        raise QuantizeError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None


def convert(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], int]:
    arrays = _read(args.input)
    if args.plan is not None:
        if args.scale is not None or args.zero_point is not None:
            raise QuantizeError("give --plan or --scale/--zero-point, not both")
        from device_agent.samples import SampleError, input_spec, prepare
        from device_agent.wire.envelope import Verifier
        from device_agent.wire.errors import WireFormatError
        from device_agent.wire.plan import plan_from_bytes

        try:
            plan = plan_from_bytes(args.plan.read_bytes(), verify=Verifier.skip())
        except (OSError, WireFormatError) as e:
            raise QuantizeError(f"--plan {args.plan}: {e}") from None
        x = arrays["x"]
        spec = input_spec(plan)
        if x.ndim >= 2 and x.shape[1:] != spec.shape and int(np.prod(x.shape[1:])) == int(np.prod(spec.shape)):
            x = x.reshape(len(x), *spec.shape)  # NOTE: the torch layout (N, C, L) of the IR's (C, 1, L)
        if x.dtype.kind != "f":
            raise QuantizeError(f"x must be float samples to quantize, got {x.dtype}")
        y = arrays.get("y", np.zeros(len(x), np.int64))
        try:
            q, _, saturated = prepare(plan, x, y)
        except SampleError as e:
            raise QuantizeError(f"{args.input}: {e}") from None
        return {**arrays, "x": q}, saturated
    if args.scale is None or args.zero_point is None:
        raise QuantizeError("give --plan plan.ttp, or both --scale and --zero-point (from `tinyfleet compile`)")
    q, saturated = quantize(arrays["x"], args.scale, args.zero_point)
    return {**arrays, "x": q}, saturated


def run(args: argparse.Namespace) -> int:
    try:
        arrays, saturated = convert(args)
        np.savez(args.output, **arrays)
    except QuantizeError as e:
        print(f"tinyfleet quantize-data: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tinyfleet quantize-data: -o {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    x = arrays["x"]
    print(f"wrote {args.output}: x int8 {tuple(x.shape)}; {saturated} of {x.size} values saturated at -128/127")
    return 0

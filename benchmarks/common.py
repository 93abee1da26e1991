"""Shared plumbing for benchmarks: one JSON line last, a readable table before it, offline data loaders."""

from __future__ import annotations

import gzip
import json
import math
import os
import resource
import sys
from pathlib import Path

import numpy as np

from fleet.compiler.mit_import import default_models_dir

ROOT = Path(__file__).resolve().parent.parent
MODELS = default_models_dir()
FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


def emit(result: dict, rows: list[tuple] | None = None, header: tuple | None = None) -> None:
    """Print an optional table to stdout, then ``result`` as the last line (one JSON object)."""
    if rows:
        widths = [max(len(str(r[i])) for r in [header or (), *rows] if i < len(r)) for i in range(len(rows[0]))]
        for r in ([header] if header else []) + rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_fashion_mnist(split: str = "train", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: uint8 images (N, 28, 28) and labels (N,)."""
    prefix = "train" if split == "train" else "t10k"
    img, lab = FASHION / f"{prefix}-images-idx3-ubyte.gz", FASHION / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists():
        raise FileNotFoundError(f"{img} missing: install Debian package dataset-fashion-mnist (make setup does)")
    with gzip.open(img) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def quick() -> bool:
    return "--quick" in sys.argv or os.environ.get("TINYFLEET_QUICK") == "1"


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(v: list[float]) -> list[float]:
    """95% Student-t interval of the mean ([mean, mean] for one value)."""
    m = float(np.mean(v))
    if len(v) < 2:
        return [round(m, 4), round(m, 4)]
    h = T975.get(len(v) - 1, 1.96) * float(np.std(v, ddof=1)) / math.sqrt(len(v))
    return [round(m - h, 4), round(m + h, 4)]

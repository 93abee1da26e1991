"""The ``npz`` scenario: a user's own data, one ``.npz`` per device, checked against the user's own model.

Each device file holds float ``x`` ``(N, *input_shape)`` and integer labels ``y`` ``(N,)``, and optionally its own
held-out ``x_test``/``y_test`` (otherwise its last ``dataset.test_fraction`` of samples are held out, in file
order). ``dataset.proxy`` (``x``, ``y``) is the coordinator's data: calibration, pretraining, scheme search.
Samples are stored in the engine's ``(C, H, W)`` layout (``(C, W)`` -> ``(C, 1, W)``, ``(F,)`` -> ``(F, 1, 1)``)
and quantized on each device with the plan's input scale, like every scenario. :func:`own_data_errors` is the
config check (every problem one line with its key path, before any work starts); it never repairs data.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fleet.scenarios.base import DeviceData, Scenario

if TYPE_CHECKING:
    from fleet.schema import DatasetConfig, FleetConfig


class NpzError(ValueError):
    """One unusable file; the message names the file and what was expected."""


def ir_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A model's per-sample input shape in the engine's ``(C, H, W)`` layout (as the torch importer lays it out)."""
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    if len(shape) == 2:
        return (shape[0], 1, shape[1])
    if len(shape) == 1:
        return (shape[0], 1, 1)
    raise NpzError(f"per-sample shape {tuple(shape)} has no (C, H, W) layout (1 to 3 dimensions)")


def device_files(d: DatasetConfig) -> list[Path]:
    """The device files in device order: ``files`` as listed, or ``devices``' ``*.npz`` sorted by name."""
    if d.files is not None:
        return [Path(f) for f in d.files]
    return sorted(Path(d.devices or ".").glob("*.npz"))


def read_npz(path: Path, test: bool = False, int8_ok: bool = False) -> dict[str, np.ndarray]:
    """Arrays ``x``, ``y`` (and ``x_test``, ``y_test`` when present and ``test``) of one file, checked for
    kind and length (not yet against a model); ``int8_ok``: x may also be int8 already quantized like the plan's
    input (evaluation data). Raises :class:`NpzError`."""
    if not path.is_file():
        raise NpzError(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if isinstance(data, np.ndarray) or "x" not in data.files or "y" not in data.files:
                raise NpzError(f"{path.name}: expected an .npz with arrays x and y (np.savez(path, x=x, y=y))")
            out = {k: data[k] for k in ("x", "y", "x_test", "y_test") if k in data.files and (test or len(k) == 1)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, NpzError):
            raise
        raise NpzError(f"{path.name}: not a readable .npz ({type(e).__name__}: {e})") from None
    if ("x_test" in out) != ("y_test" in out):
        raise NpzError(f"{path.name}: x_test and y_test come together (got only one)")
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if xk not in out:
            continue
        x, y = out[xk], out[yk]
        if x.dtype.kind != "f" and not (int8_ok and x.dtype == np.int8):
            raise NpzError(f"{path.name}: {xk} must be float samples (quantized with the plan's input scale on "
                           f"the device), got {x.dtype}")
        if x.ndim < 2 or len(x) == 0:
            raise NpzError(f"{path.name}: {xk} must be (N >= 1, *input_shape), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise NpzError(f"{path.name}: {xk} holds NaN or Inf")
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise NpzError(f"{path.name}: {yk} must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    return out


def _check_against(path: Path, arrays: dict, shape: tuple[int, ...] | None, classes: int | None) -> None:
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if xk not in arrays:
            continue
        got = tuple(arrays[xk].shape[1:])
        if shape is not None and got != shape:
            raise NpzError(f"{path.name}: {xk} has per-sample shape {got}, model.input_shape is {list(shape)}")
        y = arrays[yk]
        if classes is not None and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise NpzError(f"{path.name}: labels {yk} in [{int(y.min())}, {int(y.max())}] are outside the "
                           f"classifier's range [0, {classes})")


def _model_facts(cfg: FleetConfig, errs: list[str]) -> tuple[tuple[int, ...] | None, int | None]:
    """The own model's per-sample shape and class count (None when unknown), or errors with their key paths."""
    m = cfg.model
    if m.torch is None:
        return None, None
    from fleet.compiler.models import OwnModelError, build_own_model, load_weights, output_classes

    try:
        model = build_own_model(m.torch, m.root)
    except OwnModelError as e:
        errs.append(f"model.torch: {e}")
        return None, None
    shape = tuple(m.torch_shape() or getattr(model, "input_shape", None) or ())
    if not shape:
        errs.append("model.input_shape: required for an own model (per sample, e.g. [1, 8, 8])")
        return None, None
    if m.weights is not None:
        try:
            load_weights(model, m.weights)
        except OwnModelError as e:
            errs.append(f"model.weights: {e}")
    try:
        return shape, output_classes(model, shape)
    except OwnModelError as e:
        errs.append(f"model.input_shape: {e}")
        return None, None


def own_data_errors(cfg: FleetConfig, devices: bool = True) -> list[str]:
    """Every problem of an own model / own data / evaluation set, one line each with its key path; ``devices``:
    the device files too (the simulator; a coordinator holds only the proxy and evaluation files)."""
    errs: list[str] = []
    shape, classes = _model_facts(cfg, errs)
    d = cfg.dataset
    if devices and d.name == "npz" and (d.devices is not None or d.files is not None):
        if d.devices is not None and not Path(d.devices).is_dir():
            errs.append(f"dataset.devices: not a folder: {d.devices}")
        else:
            files = device_files(d)
            key = "dataset.devices" if d.files is None else "dataset.files"
            if not files:
                errs.append(f"{key}: no .npz files in {d.devices}")
            elif len(files) < cfg.devices:
                errs.append(f"devices: {cfg.devices} devices, but {key} names {len(files)} .npz files (one each)")
            for i, f in enumerate(files[:cfg.devices]):
                where = f"dataset.files[{i}]" if d.files is not None else key
                try:
                    _check_against(f, read_npz(f, test=True), shape, classes)
                except NpzError as e:
                    errs.append(f"{where}: {e}")
    for key, path in (("dataset.proxy", d.proxy if d.name == "npz" else None),
                      ("evaluation.data", cfg.evaluation.data if cfg.evaluation else None)):
        if path:
            try:
                _check_against(Path(path), read_npz(Path(path), int8_ok=key == "evaluation.data"), shape, classes)
            except NpzError as e:
                errs.append(f"{key}: {e}")
    return errs


def _ir(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(len(x), *ir_shape(tuple(x.shape[1:]))), dtype=np.float32)


def load_npz_scenario(cfg: FleetConfig, devices: bool = True) -> Scenario:
    """The devices' files (the first ``cfg.devices``) and the proxy set, in the engine's layout; without
    ``devices`` (a coordinator) the proxy set alone, which must then exist.

    Raises :class:`NpzError` (a ValueError) for a file that cannot be used; the config check reports the same
    problems earlier, with key paths.
    """
    d = cfg.dataset
    if not devices:
        if not d.proxy:
            raise NpzError("proxy: a coordinator builds the plan from its own data: give dataset.proxy "
                           "(or serve a compiled plan with --plan)")
        p = read_npz(Path(d.proxy))
        y = p["y"].astype(np.int64)
        return Scenario([], _ir(p["x"]), y, max(2, int(y.max()) + 1), tuple(_ir(p["x"][:1]).shape[1:]))  # type: ignore[arg-type]
    files = device_files(d)
    if len(files) < cfg.devices:
        raise NpzError(f"{cfg.devices} devices, but only {len(files)} .npz files")
    devices = []
    for i, f in enumerate(files[:cfg.devices]):
        a = read_npz(f, test=True)
        x, y = a["x"], a["y"].astype(np.int64)
        if "x_test" in a:
            xt, yt = a["x_test"], a["y_test"].astype(np.int64)
        else:
            cut = len(y) - round(len(y) * d.test_fraction)
            x, xt, y, yt = x[:cut], x[cut:], y[:cut], y[cut:]
        if d.max_train_per_device is not None:
            x, y = x[:d.max_train_per_device], y[:d.max_train_per_device]
        devices.append(DeviceData(f"dev{i:04d}", i, _ir(x), y, _ir(xt), yt))
    shape = devices[0].x_train.shape[1:] if len(devices[0].y_train) else devices[0].x_test.shape[1:]
    if d.proxy:
        p = read_npz(Path(d.proxy))
        x_proxy, y_proxy = _ir(p["x"]), p["y"].astype(np.int64)
    else:
        x_proxy, y_proxy = np.zeros((0, *shape), np.float32), np.zeros(0, np.int64)
    labels = [y_proxy, *(dd.y_train for dd in devices), *(dd.y_test for dd in devices)]
    classes = int(max((int(y.max()) for y in labels if len(y)), default=0)) + 1
    return Scenario(devices, x_proxy, y_proxy, max(2, classes), tuple(shape))  # type: ignore[arg-type]

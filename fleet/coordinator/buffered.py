"""The coordinator in asynchronous mode (``mode: async``): :class:`AsyncCoordinator`, a :class:`Coordinator` whose
round machine is :class:`~fleet.coordinator.async_round.AsyncMachine` and whose commits are staleness-weighted
buffers. ``Coordinator(...)`` builds one when ``config.mode == "async"``.

Same rules as sync: every change is written to the store before an output that depends on it (handing out a task
before its publish, accepting a delta before its ack, a version before ``model/current``), dedup by (task, device,
content hash), replay protection by device counter, a restarted coordinator resumes from the store bit-identically
(it finishes a full buffer's commit at boot and re-sends open tasks). It refuses to decide a delta's verdict (the
machine does) or to aggregate by itself (``fleet.aggregate``).
"""

from __future__ import annotations

import hashlib

import numpy as np

from device_agent.wire.messages import Publish, Task
from fleet import aggregate as agg
from fleet import round as rnd
from fleet.coordinator import async_round as ar
from fleet.coordinator.core import Coordinator
from fleet.coordinator.deltas import read_delta
from fleet.coordinator.events import Boot, Output, Received, RoundClosed, RoundRefused, StartRound, Tick
from fleet.security.dp import dp_mean, round_rng
from fleet.store import DeltaRow


class AsyncCoordinator(Coordinator):
    """One fleet, one plan, buffered asynchronous aggregation. ``machine.round_id`` is the open buffer (= the
    version it builds on), so committed buffers = ``round_id - 1`` once open."""

    def _new_machine(self) -> ar.AsyncMachine:
        return ar.AsyncMachine(self.config.asynchronous, self.codec.plan_hash, seed=self.config.round.seed)

    def _resume(self) -> None:
        s = self.store
        rows = s.async_tasks()
        tasks = {d: ar.OpenTask(rid, v, h, dl) for d, rid, v, h, dl, is_open in rows if is_open}
        buffer = {r.device_id: ar.Buffered(r.round_id, r.content_hash, base) for r, base in s.buffered(self.version)}
        self.machine.restore(opened=s.meta("async_open") == "1", version=self.version, version_hash=self.hash,
                             task_seq=int(s.meta("async_task_seq") or 0), tasks=tasks,
                             issued={r[0]: r[1] for r in rows}, buffer=buffer,
                             counters=s.counters())

    # --- events --------------------------------------------------------------------------------------------

    def handle(self, event: object) -> list[Output]:
        now = float(self.clock())
        if isinstance(event, StartRound):
            return self._open(now)
        if isinstance(event, Boot):
            out = self._resume_boot(now)
        elif isinstance(event, (Received, Tick)):
            out = super().handle(event)
        else:
            raise TypeError(f"unknown coordinator event {type(event).__name__}")
        return out + self._offer(now)

    def _open(self, now: float) -> list[Output]:
        m = self.machine
        if m.state != rnd.RoundState.IDLE:
            return []
        refused = self._budget_refusal()
        if refused is not None:
            return [refused]
        if self._all_published():
            return []
        return self._machine(ar.OpenAsync(self.version, self.hash, now), now) + self._offer(now)

    def _all_published(self) -> bool:
        """The run's ``max_versions`` versions exist (the initial model is version 1)."""
        return 0 < self.config.max_versions <= self.version - 1

    def _resume_boot(self, now: float) -> list[Output]:
        out: list[Output] = [Publish(f"plan/{self.codec.plan_hash}", self.codec.plan_bytes(), retain=True),
                             self._model_output()]
        m = self.machine
        if m.state == rnd.RoundState.COMMITTING:
            out += self._commit(m.commit(), now)
        if self._all_published():  # NOTE: e.g. killed between the last commit and closing the session
            out += self._machine(ar.CloseAsync(now), now)
        for d, t in sorted(m.tasks.items()):  # re-sent: a device answers a repeated task with the same bytes
            out += self._assign(ar.Assign(t.round_id, (d,), t.deadline, t.version, t.version_hash))
        return out

    def _offer(self, now: float) -> list[Output]:
        if self.machine.state != rnd.RoundState.COLLECTING:
            return []
        return self._machine(rnd.Eligible(tuple(self._eligible()), now), now)

    def _catch_up(self, device_id: str, held: int) -> list[Output]:
        now = float(self.clock())
        return super()._catch_up(device_id, held) + self._machine(ar.Behind(device_id, held, now), now)

    def _failed(self, device_id: str, round_id: int, now: float) -> list[Output]:
        return self._machine(ar.TaskFailed(device_id, round_id, now), now)

    def _machine(self, event: object, now: float) -> list[Output]:
        """Feed the machine; persist its open tasks if they changed (write-ahead), then turn commands into outputs."""
        m = self.machine
        before, seq, opened = dict(m.tasks), m.task_seq, m.state != rnd.RoundState.IDLE
        cmds = m.handle(event)
        self._persist_tasks(before, seq, opened)
        out: list[Output] = []
        for cmd in cmds:
            if isinstance(cmd, ar.Assign):
                out += self._assign(cmd)
            elif isinstance(cmd, rnd.Commit):
                out += self._commit(cmd, now)
        return out

    def _persist_tasks(self, before: dict[str, ar.OpenTask], seq: int, opened: bool) -> None:
        m = self.machine
        now_open = m.state != rnd.RoundState.IDLE
        if m.tasks == before and m.task_seq == seq and now_open == opened:  # (issued moves only with tasks)
            return
        put = [(d, t.round_id, t.version, t.version_hash, t.deadline) for d, t in sorted(m.tasks.items())
               if before.get(d) != t]
        self.store.put_tasks(put, sorted(before.keys() - m.tasks.keys()), m.task_seq, now_open)

    def _assign(self, a: ar.Assign) -> list[Output]:
        c = self.config
        task = Task(a.round_id, self.codec.plan_hash, a.version, a.version_hash, c.lr, c.local_steps, c.batch_size,
                    a.deadline, c.topk_permille).to_json()
        return [Publish(f"dev/{dev}/task", task) for dev in a.device_ids]

    # --- deltas --------------------------------------------------------------------------------------------

    def _judge(self, ev: Received, now: float) -> list[Output]:
        content_hash = hashlib.sha256(ev.payload).hexdigest()
        m = self.machine
        held = m.buffer.get(ev.device_id)
        if held is not None and held.content_hash == content_hash:  # QoS 1 redelivery into the open buffer
            return self._verdict(ev.device_id, held.round_id, content_hash, None, "")
        r = read_delta(self.codec, ev.device_id, ev.payload, content_hash)
        if r.decoded is None:
            rid = r.round_id if r.round_id is not None else (
                m.tasks[ev.device_id].round_id if ev.device_id in m.tasks else 0)
            return self._verdict(ev.device_id, rid, content_hash, rnd.Reject(r.reject), r.detail)
        up = r.decoded.header
        if self.store.has_delta(up.round_id, up.device_id, content_hash):
            return self._verdict(ev.device_id, up.round_id, content_hash, None, "")  # counted in an earlier buffer
        before, seq = dict(m.tasks), m.task_seq
        buffer_id = m.round_id
        cmds = m.handle(rnd.DeltaArrived(up, now))
        out: list[Output] = []
        for cmd in cmds:
            if isinstance(cmd, rnd.Accepted):
                self.store.accept_buffered(DeltaRow(up.round_id, up.device_id, content_hash, up.counter,
                                                    up.num_samples, ev.payload), buffer_id,
                                           m.buffer[up.device_id].base_version)
                out += self._verdict(up.device_id, up.round_id, content_hash, None, "ok", accepted=True)
            elif isinstance(cmd, rnd.Duplicate):
                out += self._verdict(up.device_id, up.round_id, content_hash, None, "")
            elif isinstance(cmd, rnd.Rejected):
                self._persist_tasks(before, seq, True)
                out += self._verdict(up.device_id, up.round_id, content_hash, cmd.reason, cmd.detail)
            elif isinstance(cmd, rnd.Commit):
                out += self._commit(cmd, now)
        return out

    # --- committing a buffer -------------------------------------------------------------------------------

    def _budget_refusal(self) -> RoundRefused | None:
        acc, dp = self.accountant, self.config.dp
        if acc is None or dp is None or acc.budget is None:
            return None
        after = acc.preview(1.0, dp.noise_multiplier)
        if after <= acc.budget:
            return None
        return RoundRefused(f"privacy budget spent: another version would reach epsilon {after:.3g} > budget "
                            f"{acc.budget:.3g} (delta {dp.delta:g}) after {len(acc.rounds)} versions")

    def _commit(self, cmd: rnd.Commit, now: float) -> list[Output]:
        refused = self._budget_refusal()
        if refused is not None:  # NOTE: the buffer stays full and unpublished: nothing more can count
            return [refused]
        buffer_id = cmd.round_id
        new_state, staleness = self.aggregate_buffer(buffer_id)
        base, payload = self._encode_model(self.version, self.state, self.version + 1, new_state)
        new_hash = self.codec.update_hash(payload)
        spent, epsilon, meta = self._dp_spend()
        self.store.commit_buffer(buffer_id, self.version + 1, new_hash, self._pack(new_state), meta)
        if spent is not None:
            self.accountant = spent
        self.version, self.hash, self.state = self.version + 1, new_hash, new_state
        self.model_base, self.model_payload = base, payload
        self.machine.handle(ar.Published(self.version, self.hash, now))
        if self._all_published():  # NOTE: before any new task leaves: the run ends at exactly max_versions
            self._machine(ar.CloseAsync(now), now)
        detail = "staleness " + ",".join(map(str, staleness))
        return [Publish("model/current", payload, retain=True),
                RoundClosed(buffer_id, True, self.version, cmd.device_ids, detail, epsilon=epsilon)]

    def aggregate_buffer(self, buffer_id: int) -> tuple[dict[int, np.ndarray], list[int]]:
        """The model after applying buffer ``buffer_id`` as stored, and each delta's staleness (device order)."""
        c = self.config
        rows = self.store.buffered(buffer_id)
        flat = [self._flat(self.codec.decode_delta(r.payload, r.content_hash)) for r, _ in rows]
        values, masks = np.stack([f[0] for f in flat]), np.stack([f[1] for f in flat])
        weights = np.array([r.num_samples for r, _ in rows], np.int64)
        staleness = [buffer_id - base for _, base in rows]
        a = c.asynchronous
        q16 = agg.staleness_q16(np.array([a.server_lr * a.weight(s) for s in staleness]))
        if c.dp is not None:  # NOTE: equal weights (as sync); factors <= 1 scale before clipping, so each delta
            scaled = values.astype(np.float64) * (q16 / agg.Q16)[:, None]  # still moves the sum by <= clip
            mean = dp_mean(scaled, masks, clip=c.dp.clip, noise_multiplier=c.dp.noise_multiplier,
                           denominator=c.asynchronous.buffer_size, rng=round_rng(self.dp_secret, buffer_id),
                           units=self.dp_units)
        else:
            mean = agg.buffered_aggregate(c.aggregator, values, masks, weights, q16, clip=c.clip, beta=c.trim)
        delta = agg.to_int_delta(mean)
        out, pos = {}, 0
        for t in self.shared:
            out[t.id] = agg.apply_int_delta(self.state[t.id], delta[pos:pos + t.numel])
            pos += t.numel
        return out, staleness

"""What the dashboard shows, folded from the coordinator's outputs and registry snapshots; no I/O, no clock.

:class:`FleetView` takes what a running coordinator already produces (``Verdict``, ``RoundClosed``,
``RoundRefused``, ``DeviceFailed``, ``Dropped``, ``Unfit``, ``Publish``; a copy of its registry's records and of its open
round) and keeps the tables the pages render: devices (paged), rounds, learning curves, traffic, privacy. Every
change bumps ``seq``, which is what the live stream announces. It refuses to read the store: it sees the fleet
as the coordinator saw it since the dashboard started (plus what the caller seeds it with).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from device_agent.wire.messages import Publish
from fleet.coordinator.events import DeviceFailed, Dropped, RoundClosed, RoundRefused, Unfit, Verdict


@dataclass
class DeviceRow:
    device_id: str
    board: str = ""
    sram: int = 0
    flash: int = 0
    plans: int = 0
    model_version: int = 0
    samples: int = 0
    online: bool = False
    busy: bool = False
    last_seen: float = 0.0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    last_failure: str = ""


@dataclass
class RoundRow:
    round_id: int
    committed: bool
    version: int
    accepted: int
    detail: str
    epsilon: float | None
    bytes_up: int
    bytes_down: int


class FleetView:
    """The dashboard's model of one fleet. ``apply(output)`` and ``sync(...)`` return True when something changed."""

    def __init__(self, fleet: str, plan_hash: str = "", epsilon_budget: float | None = None, max_log: int = 200):
        self.fleet, self.plan_hash, self.epsilon_budget = fleet, plan_hash, epsilon_budget
        self.devices: dict[str, DeviceRow] = {}
        self.rounds: list[RoundRow] = []
        self.open: dict = {}
        self.accuracy: dict[str, list[tuple[int, float]]] = {}  # curve name -> (round, accuracy)
        self.log: list[str] = []
        self.max_log = max_log
        self.seq = 0
        self._up = self._down = 0  # bytes of the round in progress

    # ------------------------------------------------------------------------------------------------ inputs

    def apply(self, out: object) -> bool:
        """Fold one coordinator output in."""
        if isinstance(out, Publish):
            self._down += len(out.payload)
            return False  # NOTE: traffic shows per closed round; a publish alone is not worth a page update
        if isinstance(out, Verdict):
            row = self._row(out.device_id)
            row.bytes_up += out.nbytes
            self._up += out.nbytes
            if out.reason == "ok":
                row.accepted += 1
            elif out.reason != "duplicate":
                row.refused[out.reason] = row.refused.get(out.reason, 0) + 1
                self._note(f"delta from {out.device_id} for round {out.round_id} refused: {out.reason} {out.detail}")
        elif isinstance(out, RoundClosed):
            self.rounds.append(RoundRow(out.round_id, out.committed, out.version, len(out.accepted), out.detail,
                                        out.epsilon, self._up, self._down))
            self._up = self._down = 0
            self._note(f"round {out.round_id} " + (f"committed v{out.version}" if out.committed else "abandoned")
                       + f" ({len(out.accepted)} deltas)")
        elif isinstance(out, RoundRefused):
            self._note(f"round refused: {out.detail}")
        elif isinstance(out, DeviceFailed):
            self._row(out.device_id).last_failure = f"round {out.round_id}: {out.reason}"
            self._note(f"device {out.device_id} cannot train round {out.round_id}: {out.reason}")
        elif isinstance(out, Unfit):  # NOTE: repeated at every hello of that device: shown once, not counted up
            row = self._row(out.device_id)
            why = f"no plan fits: {out.sram} B of SRAM, the smallest plan needs {out.need} B"
            if row.last_failure == why:
                return False
            row.last_failure, row.refused["no_plan_fits"] = why, 1
            self._note(f"device {out.device_id}: {why}")
        elif isinstance(out, Dropped):
            self._row(out.device_id).refused[f"{out.kind} refused"] = \
                self._row(out.device_id).refused.get(f"{out.kind} refused", 0) + 1
        else:
            return False
        self.seq += 1
        return True

    def sync(self, records: list, open_round: dict) -> bool:
        """Registry records (``fleet.registry.DeviceRecord`` copies) and the open round
        (``{"round_id", "state", "selected", "accepted", "lost", "deadline"}``)."""
        if open_round and any(r.round_id >= open_round.get("round_id", 0) for r in self.rounds):
            open_round = {}  # NOTE: a snapshot taken before a RoundClosed that was applied first: that round is over
        changed = open_round != self.open
        self.open = open_round
        for r in records:
            row = self._row(r.device_id)
            new = (r.board, r.sram, r.flash, len(r.plan_hashes), r.model_version, r.samples, r.online, r.busy,
                   r.last_seen)
            old = (row.board, row.sram, row.flash, row.plans, row.model_version, row.samples, row.online, row.busy,
                   row.last_seen)
            if new != old:
                (row.board, row.sram, row.flash, row.plans, row.model_version, row.samples, row.online, row.busy,
                 row.last_seen) = new
                changed = True
        if changed:
            self.seq += 1
        return changed

    def add_accuracy(self, curve: str, round_id: int, accuracy: float) -> bool:
        """An evaluation result (e.g. the simulator's global accuracy after a round)."""
        self.accuracy.setdefault(curve, []).append((int(round_id), float(accuracy)))
        self.seq += 1
        return True

    # ----------------------------------------------------------------------------------------------- outputs

    def summary(self) -> dict:
        online = sum(d.online for d in self.devices.values())
        last = self.rounds[-1] if self.rounds else None
        return {"fleet": self.fleet, "plan_hash": self.plan_hash, "seq": self.seq, "devices": len(self.devices),
                "online": online, "rounds_closed": len(self.rounds),
                "committed": sum(r.committed for r in self.rounds),
                "model_version": max((r.version for r in self.rounds if r.committed), default=None),
                "open_round": self.open, "epsilon": last.epsilon if last else None,
                "epsilon_budget": self.epsilon_budget,
                "refused": self._refused_totals(), "log": self.log[-20:]}

    def device_page(self, page: int = 0, size: int = 50, query: str = "", online_only: bool = False) -> dict:
        """One page of the device table, sorted by id; ``query`` filters by substring of the id or board."""
        size = max(1, min(int(size), 500))
        rows = [d for _, d in sorted(self.devices.items())
                if (not query or query in d.device_id or query in d.board) and (d.online or not online_only)]
        pages = max(1, -(-len(rows) // size))
        page = max(0, min(int(page), pages - 1))
        return {"seq": self.seq, "total": len(rows), "page": page, "pages": pages, "size": size,
                "rows": [asdict(d) for d in rows[page * size:(page + 1) * size]]}

    def device(self, device_id: str) -> dict | None:
        row = self.devices.get(device_id)
        return None if row is None else {**asdict(row), "seq": self.seq}

    def rounds_table(self) -> dict:
        return {"seq": self.seq, "open_round": self.open, "rounds": [asdict(r) for r in self.rounds]}

    def curves(self) -> dict:
        """Series for the charts: accuracy per curve, bytes and epsilon per closed round."""
        return {"accuracy": {k: list(v) for k, v in self.accuracy.items()},
                "bytes_up": [(r.round_id, r.bytes_up) for r in self.rounds],
                "bytes_down": [(r.round_id, r.bytes_down) for r in self.rounds],
                "epsilon": [(r.round_id, r.epsilon) for r in self.rounds if r.epsilon is not None],
                "epsilon_budget": self.epsilon_budget}

    # ------------------------------------------------------------------------------------------------ helpers

    def _row(self, device_id: str) -> DeviceRow:
        row = self.devices.get(device_id)
        if row is None:
            row = self.devices[device_id] = DeviceRow(device_id)
        return row

    def _note(self, line: str) -> None:
        self.log.append(line)
        del self.log[:-self.max_log]

    def _refused_totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices.values():
            for k, v in d.refused.items():
                out[k] = out.get(k, 0) + v
        return out


def coordinator_snapshot(coordinator) -> tuple[list, dict]:
    """(copies of the registry's records, the open round) of a running coordinator, for :meth:`FleetView.sync`;
    call it where the coordinator lives (``CoordinatorLink.call``)."""
    from dataclasses import replace

    from fleet.round import RoundState

    m = coordinator.machine
    records = [replace(r) for r in coordinator.registry.devices.values()]
    idle = m.state == RoundState.IDLE
    open_round = {} if idle else {"round_id": m.round_id, "state": m.state.value, "selected": len(m.selected),
                                  "accepted": len(m.accepted), "lost": len(m.lost), "deadline": m.deadline}
    return records, open_round

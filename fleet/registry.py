"""The coordinator's view of its devices: who said hello with which capabilities, who is online, who is eligible.

Fed by parsed control messages (``Hello``, ``Status``, a Last Will ``Status(state="offline")``) and the time
they arrived; it never reads a socket or a clock. Eligibility for a round is deterministic (sorted ids), so two
coordinators fed the same messages select the same devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device_agent.wire.messages import Hello, Status


@dataclass
class DeviceRecord:
    device_id: str
    board: str
    sram: int
    flash: int
    plan_hashes: frozenset[str] = frozenset()
    firmware: str = ""
    online: bool = True
    busy: bool = False
    model_version: int = 0
    samples: int = 0
    last_seen: float = 0.0


@dataclass
class Registry:
    """Devices by id. ``heartbeat_timeout`` (seconds, 0 = never) marks a silent device as offline."""

    heartbeat_timeout: float = 0.0
    devices: dict[str, DeviceRecord] = field(default_factory=dict)

    def on_hello(self, hello: Hello, now: float) -> DeviceRecord:
        """A (re)announcement: capabilities replace the old ones; the device is online."""
        rec = DeviceRecord(hello.device_id, hello.board, hello.sram, hello.flash, frozenset(hello.plan_hashes),
                           hello.firmware, online=True, last_seen=now)
        old = self.devices.get(hello.device_id)
        if old is not None:
            rec.model_version, rec.samples = old.model_version, old.samples
        self.devices[hello.device_id] = rec
        return rec

    def on_status(self, status: Status, now: float) -> DeviceRecord | None:
        """Heartbeat or Last Will. A status from a device that never said hello is ignored (returns None)."""
        rec = self.devices.get(status.device_id)
        if rec is None:
            return None
        rec.online = status.state != "offline"
        rec.busy = status.state == "busy"
        rec.model_version, rec.samples, rec.last_seen = status.model_version, status.samples, now
        return rec

    def mark_offline(self, device_id: str) -> bool:
        """Return True if the device was online (i.e. this is news)."""
        rec = self.devices.get(device_id)
        if rec is None or not rec.online:
            return False
        rec.online = False
        return True

    def expire(self, now: float) -> list[str]:
        """Mark devices silent for longer than ``heartbeat_timeout`` offline; return their ids (sorted)."""
        if self.heartbeat_timeout <= 0:
            return []
        gone = sorted(d for d, r in self.devices.items() if r.online and now - r.last_seen > self.heartbeat_timeout)
        for d in gone:
            self.devices[d].online = False
        return gone

    def is_online(self, device_id: str) -> bool:
        rec = self.devices.get(device_id)
        return rec is not None and rec.online

    def eligible(self, min_sram: int, plan_hash: str | None = None) -> list[str]:
        """Online devices whose SRAM holds the plan (and that already hold ``plan_hash`` if given), sorted by id."""
        return sorted(
            d for d, r in self.devices.items()
            if r.online and r.sram >= min_sram and (plan_hash is None or plan_hash in r.plan_hashes)
        )

    def __len__(self) -> int:
        return len(self.devices)

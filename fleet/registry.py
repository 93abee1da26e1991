"""The coordinator's view of its devices: who said hello with which capabilities, who is online, who is eligible.

Fed by parsed control messages (``Hello``, ``Status``, a Last Will ``Status(state="offline")``) and the time
they arrived; it never reads a socket or a clock. Eligibility for a round is deterministic (sorted ids), so two
coordinators fed the same messages select the same devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device_agent.wire.messages import Hello, MessageError, MsgError, Status, parse


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
    session: int = 0  # the newest connection number heard from the device (0: it sends none)


@dataclass(frozen=True)
class Control:
    """What one hello/status meant: the parsed message, whether the device was online before, and ``lost``:
    True when the device has just gone offline (its open task will not be answered)."""

    message: Hello | Status
    was_online: bool
    lost: bool
    stale: bool = False  # from an older connection than one already heard (e.g. a late Last Will): ignored


@dataclass
class Registry:
    """Devices by id. ``heartbeat_timeout`` (seconds, 0 = never) marks a silent device as offline."""

    heartbeat_timeout: float = 0.0
    devices: dict[str, DeviceRecord] = field(default_factory=dict)

    def receive(self, kind: str, device_id: str, payload: bytes, now: float) -> Control:
        """The one rule for control messages, for the coordinator and the Flower grid alike: parse a ``hello`` or
        ``status`` from ``dev/<device_id>/<kind>`` and apply it.

        Raises
        ------
        MessageError
            Not a valid message of that kind, another device's id, or a status before any hello (the registry is
            unchanged).
        """
        msg: Hello | Status = parse(payload, Hello) if kind == "hello" else parse(payload, Status)
        if msg.device_id != device_id:
            raise MessageError(MsgError.BAD_VALUE, f"device_id {msg.device_id!r} != topic id")
        was_online = self.is_online(device_id)
        rec = self.devices.get(device_id)
        if rec is not None and msg.session is not None and msg.session < rec.session:
            return Control(msg, was_online, False, stale=True)
        if isinstance(msg, Hello):
            self.on_hello(msg, now)
            return Control(msg, was_online, False)
        assert isinstance(msg, Status)
        if self.on_status(msg, now) is None:
            raise MessageError(MsgError.BAD_VALUE, "status before hello")
        if msg.session is not None:
            self.devices[device_id].session = msg.session
        return Control(msg, was_online, was_online and msg.state == "offline")

    def on_hello(self, hello: Hello, now: float) -> DeviceRecord:
        """A (re)announcement: capabilities replace the old ones; the device is online."""
        rec = DeviceRecord(hello.device_id, hello.board, hello.sram, hello.flash, frozenset(hello.plan_hashes),
                           hello.firmware, online=True, last_seen=now, session=hello.session or 0)
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
        if status.model_version is not None:  # NOTE: the Last Will leaves both out (they would be stale)
            rec.model_version = status.model_version
        if status.samples is not None:
            rec.samples = status.samples
        rec.last_seen = now
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

"""A run directory's ``metrics.json``: its one definition (version, keys), written by ``simulate --out`` and
``serve --out``, read by ``tinyfleet report`` (docs/metrics.md lists every key).

:class:`ServeRecorder` folds a running coordinator's outputs (tasks and model updates published, deltas
judged, rounds closed) into the same per-round series ``simulate`` reports, plus accuracy on the config's
``evaluation.data`` when it is given. It does no I/O but :func:`write_metrics` (one JSON file, written whole
through a temporary file) and never judges a delta: it counts what the coordinator decided.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

METRICS_VERSION = 1  # bump when a key changes meaning or is removed (adding a key keeps the version)


class MetricsError(ValueError):
    """A metrics.json this version cannot read; says what to do."""


def write_metrics(out_dir: Path, data: dict, source: str) -> Path:
    """Write ``data`` as ``out_dir/metrics.json`` with ``version`` and ``source`` (simulate | serve); returns it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    tmp = out_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps({**data, "version": METRICS_VERSION, "source": source}, indent=1, sort_keys=True))
    os.replace(tmp, path)  # NOTE: a reader (report, a dashboard, a crash) never sees half a file
    return path


def check_version(data: dict, path: Path) -> None:
    """Refuse a metrics.json written by a newer format; a file without ``version`` predates versioning (= 1)."""
    v = data.get("version", 1)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= METRICS_VERSION:
        raise MetricsError(f"{path}: metrics version {v!r}, this tinyfleet reads versions 1..{METRICS_VERSION}: "
                           "use the tinyfleet that wrote it, or re-run")


@dataclass
class _Round:
    selected: set[str] = field(default_factory=set)
    task_bytes: int = 0  # payloads to one device (dev/<id>/...)
    broadcast_bytes: int = 0  # payloads every device receives (model/current, ...)
    up_bytes: int = 0  # delta payloads received


class ServeRecorder:
    """What ``serve --out`` writes: per-round series from the coordinator's outputs, accuracy from ``evaluate``.

    ``on_output`` runs on the coordinator's thread; ``start_round`` / ``round_closed`` / ``to_dict`` on the
    serve loop's. ``evaluate(state) -> accuracy`` scores the model's trainable state (None: no evaluation data).
    Byte counts are payloads seen by the coordinator (no MQTT headers): per selected device, up = its delta,
    down = its task plus what every device receives (the model update).
    """

    def __init__(self, fleet: str, broker: str, plan_bytes: int, plan_sram: int, scheme: str = "",
                 aggregator: str = "fedavg", evaluate=None):
        self.lock = threading.Lock()
        self.evaluate = evaluate
        self.cur = _Round()
        self.t_round = 0.0
        self.m: dict = {"evaluation_samples": getattr(evaluate, "samples", 0), "fleet": fleet, "broker": broker, "plan_bytes": plan_bytes, "plan_sram_bytes": plan_sram,
                        "scheme": scheme, "aggregator": aggregator, "rounds": 0, "devices": 0,
                        "accuracy_initial": None, "accuracy_per_round": [], "round_status": [],
                        "devices_per_round": [], "selected_per_round": [], "bytes_up_per_device_round": [],
                        "bytes_down_per_device_round": [], "payload_up_per_device_round": [],
                        "payload_down_per_device_round": [], "round_seconds": [], "round_ids": [],
                        "model_version": 0, "devices_dropped": 0, "devices_offline": 0, "epsilon_per_round": [],
                        "errors": [], "interrupted": False, "stopped": "", "aggregation": {}, "per_device": []}
        self.participation: dict[str, int] = {}

    def on_output(self, out: object) -> None:
        """Count one coordinator output (Publish, Verdict); other outputs are read by the serve loop."""
        from device_agent.wire.messages import Publish
        from fleet.coordinator import Verdict

        with self.lock:
            if isinstance(out, Publish):
                parts = out.topic.split("/")
                if parts[0] == "dev" and len(parts) >= 3:
                    self.cur.task_bytes += len(out.payload)
                    if parts[2] == "task":
                        self.cur.selected.add(parts[1])
                elif parts[0] == "model":
                    self.cur.broadcast_bytes += len(out.payload)
            elif isinstance(out, Verdict):
                self.cur.up_bytes += out.nbytes

    def initial(self, state: dict, version: int) -> None:
        """The deployed model before this run's first round."""
        self.m["model_version"] = version
        if self.evaluate is not None:
            self.m["accuracy_initial"] = round(float(self.evaluate(state)), 4)

    def start_round(self, now: float) -> None:
        with self.lock:
            self.cur, self.t_round = _Round(), now

    def round_closed(self, closed, state: dict, now: float) -> float | None:
        """Record one RoundClosed with the model ``state`` after it; returns the accuracy (None: not measured)."""
        with self.lock:
            cur, self.cur = self.cur, _Round()
        m = self.m
        sel = max(1, len(cur.selected))
        up, down = cur.up_bytes / sel, cur.task_bytes / sel + cur.broadcast_bytes
        for key, v in (("bytes_up_per_device_round", up), ("payload_up_per_device_round", up),
                       ("bytes_down_per_device_round", down), ("payload_down_per_device_round", down)):
            m[key].append(round(v, 1))
        m["round_ids"].append(closed.round_id)
        m["round_status"].append("committed" if closed.committed else "abandoned")
        m["devices_per_round"].append(len(closed.accepted))
        m["selected_per_round"].append(len(cur.selected))
        m["devices_dropped"] += len(cur.selected - set(closed.accepted))
        m["round_seconds"].append(round(now - self.t_round, 3) if self.t_round else None)
        if closed.epsilon is not None:
            m["epsilon_per_round"].append(closed.epsilon)
        if closed.committed:
            m["model_version"] = closed.version
        for d in closed.accepted:
            self.participation[d] = self.participation.get(d, 0) + 1
        acc = round(float(self.evaluate(state)), 4) if self.evaluate is not None else None
        if acc is not None:
            m["accuracy_per_round"].append(acc)
        m["rounds"] += 1
        return acc

    def devices(self, records: list) -> None:
        """The registry at the end: one row per device it knows (what the device reported in its hello)."""
        m = self.m
        m["devices"] = len(records)
        m["devices_offline"] = sum(not r.online for r in records)
        m["per_device"] = [{"device_id": r.device_id, "board": r.board, "backend": "device",
                            "subject": None, "n_train": r.samples, "n_test": None,
                            "rounds_participated": self.participation.get(r.device_id, 0),
                            "memory_source": "planned", "sram_bytes": m["plan_sram_bytes"],
                            "flash_bytes": m["plan_bytes"], "board_sram_bytes": r.sram, "board_flash_bytes": r.flash,
                            "model_version": r.model_version, "online": r.online}
                           for r in sorted(records, key=lambda r: r.device_id)]

    def to_dict(self) -> dict:
        return dict(self.m)

    def write(self, out_dir: Path, link, pool=None) -> Path:
        """``out_dir/metrics.json`` with the registry's devices, the aggregation ``pool``'s summary (if any) and
        the link's errors as of now."""
        try:
            self.devices(link.call(lambda c: list(c.registry.devices.values())))
            if pool is not None:
                self.m["aggregation"] = link.call(lambda c: pool.summary())
        except (ConnectionError, RuntimeError, TimeoutError):  # NOTE: a link that went away keeps the last table
            pass
        self.m["errors"] = list(link.errors)
        return write_metrics(out_dir, self.to_dict(), "serve")

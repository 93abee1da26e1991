"""FleetGrid: the ``flwr.serverapp.Grid`` a ServerApp talks to; every call is an event or a query on a Link."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fleet.flower.core import Push


class Link(Protocol):
    """What :class:`FleetGrid` needs from a transport (``fleet.mqtt.CoordinatorLink`` fits as it is)."""

    def submit(self, event: object) -> None: ...  # handle(event) on the core, publish its outputs

    def call(self, fn: Callable[[Any], Any], timeout: float = 30.0) -> Any: ...  # fn(core) on the core's thread


class FleetGrid(Grid):
    """A Flower ``Grid`` over a TinyFleet fleet. Outside ``flwr run`` (tests, scripts) it sets Flower's task
    identity (run id, SuperLink node id) itself, since ``Message(...)`` needs one."""

    def __init__(self, link: Link, run_id: int = 1, pull_interval: float = 0.05):
        self.link, self.pull_interval = link, pull_interval
        self._run = Run.create_empty(run_id)
        try:
            TaskIdentity.run_id  # noqa: B018  set by flwr when running under a SuperLink
        except RuntimeError:
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be a flwr Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.link.call(lambda core: core.node_ids()))

    def device_ids(self) -> dict[int, str]:
        """Node id -> device id (ours, not Flower's API: for logs and tests)."""
        return self.link.call(lambda core: core.node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = tuple(messages)
        for m in msgs:
            md = m.metadata
            if md.reply_to_message_id or md.ttl <= 0:
                raise ValueError(f"not an instruction message: {md}")
            md.__dict__["_message_id"] = uuid.uuid4().hex  # NOTE: what Flower's own grids do (no public setter)
        self.link.submit(Push(msgs))
        return [m.metadata.message_id for m in msgs]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ids = list(message_ids)
        return self.link.call(lambda core: core.pull(ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every instruction has a reply; at ``timeout`` the missing ones get an Error
        reply (``GridErrorCode.TIMEOUT``), so the result always has one reply per message."""
        ids = list(self.push_messages(messages))
        waiting, out = set(ids), []
        end = None if timeout is None else time.monotonic() + timeout
        while waiting:
            got = list(self.pull_messages(waiting))
            out += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.pull_interval)
        if waiting:
            left = list(waiting)
            out += self.link.call(lambda core: core.expire(left, f"no reply within send_and_receive's {timeout} s"))
        return out


# --- the strategy wrapper ------------------------------------------------------------------------------------

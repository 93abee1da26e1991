"""The dashboard's web server: the Starlette app of :mod:`fleet.dashboard.app` under uvicorn, in a thread.

:class:`Dashboard` owns a :class:`~fleet.dashboard.view.FleetView` behind a lock. The process that runs the
fleet (``serve``, ``simulate``) calls :meth:`Dashboard.update` from its own threads with whatever it learned
(coordinator outputs, registry snapshots, evaluations); when the view changed, every open live stream gets the
new ``seq`` at once. Binding anywhere but loopback requires an access token (given, or generated and printed).
It refuses to touch the coordinator: it only sees what it is handed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable

from fleet.dashboard.view import FleetView

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_bind(spec: str) -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT`` (``[v6]:PORT``) -> (host, port); host defaults to 127.0.0.1."""
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
        raise ValueError(f"--dashboard: expected PORT or HOST:PORT, got {spec!r}")
    return host, int(port)


class Dashboard:
    """A running dashboard. ``start()`` returns once the socket listens; ``url`` then says where."""

    def __init__(self, view: FleetView, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.view, self.host, self.port = view, host, port
        self.token = token or (None if is_loopback(host) else secrets.token_urlsafe(18))
        self.lock = threading.Lock()
        self.subscribers: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._following = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self, timeout: float = 10.0) -> Dashboard:
        import uvicorn

        from fleet.dashboard.app import make_app

        config = uvicorn.Config(make_app(self), host=self.host, port=self.port, log_level="warning",
                                access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)
        self._thread.start()
        t_end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > t_end:
                raise OSError(f"dashboard: cannot listen on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def follow(self, link, every: float = 0.5) -> None:
        """Copy ``link``'s coordinator registry and open round into the view every ``every`` seconds (on a
        daemon thread, through ``CoordinatorLink.call``: the coordinator's thread reads its own state)."""
        from fleet.dashboard.view import coordinator_snapshot

        def loop() -> None:
            while not self._following.wait(every):
                try:
                    snap = link.call(coordinator_snapshot, timeout=5.0)
                except TimeoutError:  # NOTE: a busy or stopping coordinator thread: try again next tick
                    snap = None
                if snap is not None:
                    self.update(lambda v, s=snap: v.sync(*s))

        threading.Thread(target=loop, name="dashboard-follow", daemon=True).start()

    def stop(self) -> None:
        self._following.set()
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=5)

    def update(self, fn: Callable[[FleetView], bool]) -> None:
        """Run ``fn(view)`` under the lock; announce the new ``seq`` to every live stream if it returned True."""
        with self.lock:
            changed = fn(self.view)
            seq = self.view.seq
        if changed and self.loop is not None:
            self.loop.call_soon_threadsafe(self._broadcast, seq)

    def read(self, fn: Callable[[FleetView], object]) -> object:
        with self.lock:
            return fn(self.view)

    def _broadcast(self, seq: int) -> None:
        for q in list(self.subscribers):
            if q.qsize() < 8:  # NOTE: a slow client misses intermediate seqs, never the latest state
                q.put_nowait(seq)


def open_dashboard(cfg, plan_hash: str, bind: tuple[str, int], token: str | None, who: str) -> Dashboard:
    """A started dashboard for fleet config ``cfg``; its address printed to stderr as ``<who>: dashboard at URL``.
    Raises OSError when it cannot listen."""
    import sys

    budget = cfg.dp.epsilon_budget if cfg.dp is not None else None
    dash = Dashboard(FleetView(cfg.name, plan_hash, budget), *bind, token=token).start()
    print(f"{who}: dashboard at {dash.url}", file=sys.stderr, flush=True)
    return dash

"""Host devices in Ray actors: :class:`RayPool` is :class:`fleet.sim.workers.WorkerPool` with Ray actors in place of
spawned processes, so a simulation can spread its devices over a Ray cluster (``ray_address``) or, by default,
over a local Ray instance started for the run.

Each actor holds a :class:`fleet.sim.workers.DeviceHost` (the same code the process pool runs), so devices are
built with the same seeds and see the same events in the same order: their deltas are bit-identical to the
in-process path's (tests/pure/test_ray_pool.py). The runner keeps each device's MQTT endpoint; only the device's
protocol, trainer and private samples live in the actor. This module moves work between processes; it
implements no protocol logic, and it refuses nothing that ``WorkerPool`` accepts.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from fleet.sim.workers import DeviceHost, WorkerError, WorkerPool


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse an address nothing listens on (``host:port`` or ``ray://host:port``) within ``timeout`` seconds:
    Ray itself keeps retrying for minutes."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise WorkerError(f"ray_address: expected host:port or ray://host:port, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise WorkerError(f"ray_address: no Ray cluster answers at {address} ({e.strerror or e}): start one "
                          f"(`ray start --head`) or leave ray_address out for a local instance") from None


class _HostActor:
    """The body of one Ray actor: a DeviceHost and one entry point."""

    def __init__(self, plan):
        self.host = DeviceHost(plan)

    def run(self, op: str, args: tuple) -> object:
        return getattr(self.host, op)(*args)


class RayPool(WorkerPool):
    """``n`` Ray actors holding copies of ``plan``. ``address``: an existing Ray cluster (``ray://...`` or
    ``host:port``); None starts a local Ray instance for this pool and shuts it down on :meth:`close`."""

    def __init__(self, n: int, plan, address: str | None = None):
        if n < 1:
            raise ValueError(f"workers: need at least 1 Ray actor, got {n}")
        try:
            import ray
        except ImportError:
            raise WorkerError("backend ray: Ray is not installed (pip install -e '.[flower-simulation]', "
                              "which `make setup` does)") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray and address not in (None, "auto", "local"):
            _check_reachable(address)
        if self._owns_ray:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except Exception as e:  # noqa: BLE001  NOTE: Ray raises several types for "no cluster there"
                raise WorkerError(f"backend ray: could not start or reach Ray at {address or 'a new local instance'}"
                                  f": {type(e).__name__}: {e}") from None
        # NOTE: num_cpus=0: the pool decides how many actors there are; Ray must not leave some pending
        actor = ray.remote(num_cpus=0, max_restarts=0)(_HostActor)
        plan_ref = ray.put(plan)
        self.actors = [actor.options(name=None, scheduling_strategy="SPREAD").remote(plan_ref) for _ in range(n)]
        self.placement: dict[int, int] = {}
        self.locks = [threading.Lock() for _ in range(n)]
        self.executors = [ThreadPoolExecutor(1, thread_name_prefix=f"ray-actor-{i}") for i in range(n)]

    def __len__(self) -> int:
        return len(self.actors)

    def request(self, w: int, op: str, *args: object) -> object:
        ray = self._ray
        with self.locks[w]:
            try:
                return ray.get(self.actors[w].run.remote(op, args))
            except ray.exceptions.RayActorError as e:
                raise WorkerError(f"device actor {w} is gone: {type(e).__name__}") from None
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise WorkerError(f"device actor {w}: {type(cause).__name__}: {cause}") from None

    def close(self) -> None:
        for ex in self.executors:
            ex.shutdown(wait=False, cancel_futures=True)
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

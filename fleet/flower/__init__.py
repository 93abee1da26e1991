"""Flower 1.42 on a TinyFleet fleet: a ``flwr.serverapp.Grid`` whose nodes are our MQTT devices, and a strategy
wrapper that lets any stock Flower strategy aggregate sparse int8 deltas (``records``, ``core``, ``grid``,
``strategy``, ``claim``, ``runconfig``; import from here; ``broker`` puts the grid on a real broker).

Three layers, top to bottom:

- :class:`FleetGrid` — the ``Grid`` a ServerApp (or ``Strategy.start``) talks to. Every call becomes an event
  or a query on a :class:`Link` (``fleet.flower.broker`` has the MQTT link, ``fleet.flower_app`` an in-memory one).
- :class:`GridCore` — sans-I/O, the same ``handle(event) -> outputs`` shape as ``fleet.coordinator.Coordinator``
  so ``fleet.mqtt.CoordinatorLink`` can drive it unchanged. It turns a Flower train ``Message`` into our model
  update + ``task``; one push of train messages is one round of ``fleet.round.RoundMachine``, which judges each
  delta by the coordinator's own rules (dedup, replayed counter, stale base, plan, samples, deadline), and the
  hello/status rule is the registry's (``Registry.receive``), as for the coordinator. An accepted delta becomes
  ``Message(RecordDict, reply_to=...)``; a device that goes offline, misses the
  deadline or sends a refused delta gets ``Message(Error, reply_to=...)``. It signs what it publishes when its
  codec has a signer, and publishes the fleet's ``flower/state`` and (for the run that holds it) ``flower/lock``.
- Records (pure): the model as Flower sees it is an ``ArrayRecord`` of float64 arrays holding the **integer
  values** of the plan's shared trainable tensors (int8 weight units, int32 bias units), keyed by tensor name.
  Float64 holds every int32 exactly, so a FedAvg of dense replies equals ``fleet.aggregate.fedavg`` except
  at exact .5 ties, where Flower's float weighting may land one ulp low and round one unit down.
  Aggregated floats go back to integers by ``floor(x + 0.5)`` (round half up, as ``aggregate.to_int_delta``),
  clamped to [-127, 127] (int8) or the int32 range; NaN/Inf are refused.

It refuses what our devices cannot do: evaluate messages (devices only train; use ``evaluate_fn`` on the
server), FedProx's ``proximal-mu`` > 0 (devices add no proximal term) and two tasks for one device in one push are
answered with an ``Error`` reply at once. It keeps no store: a new ServerApp run continues the fleet's model
versions and round ids from what the broker retains (``claim``); crash-resume of an open round is the native
coordinator's job.
"""


from fleet.flower.claim import LOCK_TOPIC, STATE_TOPIC, FleetBusy, Lock, State, winner
from fleet.flower.core import GridConfig, GridCore, Push, Release, SetModel
from fleet.flower.grid import FleetGrid, Link
from fleet.flower.records import (
    ARRAYS,
    CONFIG,
    META,
    METRICS,
    NUM_EXAMPLES,
    GridErrorCode,
    arrays_from_state,
    initial_arrays,
    node_id,
    reply_content,
    shared_tensors,
    state_from_arrays,
)
from fleet.flower.strategy import SparseDeltaStrategy

__all__ = ["ARRAYS", "CONFIG", "LOCK_TOPIC", "META", "METRICS", "NUM_EXAMPLES", "STATE_TOPIC", "FleetBusy",
           "FleetGrid", "GridConfig", "GridCore", "GridErrorCode", "Link", "Lock", "Push", "Release", "SetModel",
           "SparseDeltaStrategy", "State", "arrays_from_state", "initial_arrays", "node_id", "reply_content",
           "shared_tensors", "state_from_arrays", "winner"]

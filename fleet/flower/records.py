"""Flower records <-> TinyFleet tensors, pure: node ids, the model as an ArrayRecord of integer values, replies."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from device_agent.engine.ir import DTYPE_NUMPY
from device_agent.wire.delta import delta_from_bytes, delta_support
from device_agent.wire.envelope import Verifier
from fleet import aggregate as agg

ARRAYS, METRICS, CONFIG, META = "arrays", "metrics", "config", "tinyfleet"
NUM_EXAMPLES = "num-examples"


class GridErrorCode:
    """``Error.code`` of the replies this grid makes up (100+ so they never clash with ``flwr`` ErrorCode)."""

    TIMEOUT = 101  # no delta before the deadline (the task's TTL or send_and_receive's timeout)
    OFFLINE = 102  # the device's Last Will (or an offline status) arrived while it owed a delta
    REJECTED = 103  # the device's delta was refused (reason names the rule: stale_base, replayed_counter...)
    UNKNOWN_NODE = 104  # dst_node_id is not a registered, eligible device
    UNSUPPORTED = 105  # a message type devices cannot run (evaluate, query)
    BAD_CONTENT = 106  # the instruction's records do not fit the plan (array names, shapes, config types)


# --- node ids and records (pure) -----------------------------------------------------------------------------


def node_id(device_id: str) -> int:
    """The stable Flower node id of a device: the first 8 bytes of sha256(device id) as an int in [2, 2**63)."""
    v = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "little") & (2**63 - 1)
    return v if v > SUPERLINK_NODE_ID else v + 2


def shared_tensors(plan) -> list:
    """The plan's shared (uploaded, downloaded) trainable tensors in id order; names must be unique."""
    ts = sorted((t for t in plan.trainable if not t.personal), key=lambda t: t.id)
    names = [t.name for t in ts]
    if len(set(names)) != len(names):
        raise ValueError(f"plan {plan.name}: shared trainable tensor names are not unique: {names}")
    return ts


def arrays_from_state(plan, state: dict[int, np.ndarray]) -> ArrayRecord:
    """Integer model state (tensor id -> int8/int32) -> ArrayRecord of float64 arrays, keyed by tensor name."""
    return ArrayRecord({t.name: Array(np.asarray(state[t.id], np.float64).reshape(t.shape))
                        for t in shared_tensors(plan)})


def initial_arrays(plan) -> ArrayRecord:
    """The plan's own values (model version 1) as the ServerApp's ``initial_arrays``."""
    return arrays_from_state(plan, {t.id: np.asarray(t.data) for t in shared_tensors(plan)})


def state_from_arrays(plan, arrays: ArrayRecord) -> dict[int, np.ndarray]:
    """Float arrays (integer units) -> int state: ``floor(x + 0.5)``, clamped to the tensor's integer range.

    Raises ValueError naming the tensor when names or shapes differ from the plan, or values are not finite.
    """
    ts = shared_tensors(plan)
    want, got = {t.name for t in ts}, set(arrays.keys())
    if want != got:
        raise ValueError(f"ArrayRecord names {sorted(got)} != the plan's shared trainable tensors {sorted(want)}")
    out = {}
    for t in ts:
        x = np.asarray(arrays[t.name].numpy(), np.float64)
        if x.size != t.numel:
            raise ValueError(f"array {t.name!r}: {t.numel} values expected (shape {t.shape}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"array {t.name!r}: NaN or Inf after aggregation")
        zero = np.zeros(t.shape, DTYPE_NUMPY[t.dtype])
        out[t.id] = agg.apply_int_delta(zero, np.floor(x.reshape(t.shape) + 0.5).astype(np.int64))
    return out


def reply_content(plan, base: dict[int, np.ndarray], values: dict[int, np.ndarray], masks: dict[int, np.ndarray],
                  num_samples: int, device_id: str, round_id: int, payload: bytes, trained: int = 0) -> RecordDict:
    """One decoded delta as a Flower train reply: the updated tensors (base + delta, dense, float64 integer
    units; where a top-k record is silent, the base: a 0 vote, as in the native coordinator); metrics
    ``num-examples`` = the delta's sample count (the device's buffered samples: the weight of FedAvg, as in the
    native coordinator), ``samples-trained`` = ``trained`` (local steps x batch size of the task),
    ``sent-fraction`` (coordinates the delta carries / shared coordinates) and ``delta-bytes``; the raw delta
    bytes under ``tinyfleet``."""
    ts = shared_tensors(plan)
    arrays = ArrayRecord({t.name: Array((base[t.id].astype(np.float64) + np.where(masks[t.id], values[t.id], 0))
                                        .reshape(t.shape)) for t in ts})
    # NOTE: not from ``masks``: a top-k record votes 0 where it is silent, so its mask covers the whole tensor
    support = delta_support(delta_from_bytes(payload, verify=Verifier.skip(), plan=plan), plan)
    sent = sum(int(np.count_nonzero(support[t.id])) for t in ts) / max(1, sum(t.numel for t in ts))
    metrics = MetricRecord({NUM_EXAMPLES: int(num_samples), "samples-trained": int(trained),
                            "sent-fraction": float(sent), "delta-bytes": len(payload)})
    meta = ConfigRecord({"device-id": device_id, "round-id": round_id, "delta": payload})
    return RecordDict({ARRAYS: arrays, METRICS: metrics, META: meta})


# --- the sans-I/O core -----------------------------------------------------------------------------------------


def _with_content(m: Message, content: RecordDict) -> Message:
    """The same reply (metadata kept) with dense content in place of the raw delta."""
    return Message(metadata=m.metadata, content=content)  # type: ignore[call-overload]

"""The coordinator, split by job: ``core`` (the one ``handle(event) -> outputs`` entry, boot, rounds, closing),
``deltas`` (judge, store, count and aggregate deltas), ``publication`` (tasks and models), ``events`` (its
vocabulary and derived policy), ``codec`` (the binary formats behind one interface), ``partials`` (aggregation
workers' sums, merged exactly once) and ``pool`` (the workers themselves: processes and MQTT, imported by name
only). Import from here."""

from fleet.coordinator.codec import Codec, CodecError, DecodedDelta, FamilyCodec, WireCodec, encode_diff
from fleet.coordinator.core import Coordinator
from fleet.coordinator.deltas import RoundDeltas, read_delta
from fleet.coordinator.events import (
    Boot,
    Claimed,
    CoordinatorConfig,
    DeviceFailed,
    Dropped,
    Output,
    Received,
    RoundClosed,
    RoundRefused,
    StartRound,
    Tick,
    Unfit,
    Verdict,
    plan_sram,
)
from fleet.coordinator.partials import Partial, merge_partials

__all__ = ["Boot", "Claimed", "Codec", "CodecError", "Coordinator", "CoordinatorConfig", "DecodedDelta", "DeviceFailed",
           "Dropped", "FamilyCodec", "Output", "Partial", "Received", "RoundClosed", "RoundDeltas", "RoundRefused",
           "StartRound", "Tick", "Unfit", "Verdict", "WireCodec", "encode_diff", "merge_partials", "plan_sram",
           "read_delta"]

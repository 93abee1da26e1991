"""Partial sums from aggregation workers and their merge at commit: exactly once, by (round, device, content hash).

A :class:`Partial` is one worker's running FedAvg sums over the deltas it was told were accepted, with the exact
(device -> content hash) set they cover. :func:`merge_partials` adds partials whose every delta is one of the
round's accepted (stored) deltas and that overlap no partial already taken; whatever accepted delta no taken
partial covers (its worker died, answered late, or summed something else) is returned as missing, for the
coordinator to decode from its store. So a delta is counted once whatever the workers did, and the sum equals the
single-process coordinator's bit for bit (integer sums). Pure: no I/O; it refuses to guess which rows of a
refused partial were good (a sum cannot be taken apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fleet.aggregate import RunningSums


@dataclass
class Partial:
    """Running sums of one worker for one round, and exactly which deltas are in them."""

    round_id: int
    sums: RunningSums
    covered: dict[str, str] = field(default_factory=dict)  # device id -> content hash (sha256 hex)
    worker: str = ""
    # deltas read but not summed yet (their verdict was still out when the commit asked): device id, content hash,
    # flat values, mask, weight; the merge adds those that are accepted and in no partial's sums
    rows: list[tuple[str, str, np.ndarray, np.ndarray, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_partials` made: the sums of the partials it took, and the accepted deltas none covers."""

    sums: RunningSums
    missing: frozenset[str]  # device ids: decode these from the store and add them
    taken: tuple[str, ...]  # workers whose partial was added
    refused: tuple[str, ...]  # "worker: why" for partials left out


def merge_partials(round_id: int, accepted: dict[str, str], partials: list[Partial], size: int) -> Merged:
    """Add the partials of ``round_id`` that hold only ``accepted`` deltas (device -> content hash) and no delta
    an earlier-taken partial holds (largest first, so a refused overlap leaves the most to the workers), then the
    partials' unsummed ``rows`` that are accepted and not in yet."""
    total = RunningSums(size)
    seen: set[str] = set()
    taken, refused = [], []
    for p in sorted(partials, key=lambda p: (-len(p.covered), p.worker)):
        if p.round_id != round_id:
            refused.append(f"{p.worker}: partial of round {p.round_id}, committing round {round_id}")
        elif any(accepted.get(d) != h for d, h in p.covered.items()):
            refused.append(f"{p.worker}: holds a delta that is not one of the round's accepted ones")
        elif not seen.isdisjoint(p.covered):
            refused.append(f"{p.worker}: overlaps a partial already merged")
        elif p.sums.count != len(p.covered):
            refused.append(f"{p.worker}: {p.sums.count} rows summed for {len(p.covered)} deltas named")
        else:
            total.merge(p.sums)
            seen.update(p.covered)
            taken.append(p.worker)
    for p in partials:
        for d, h, values, mask, weight in p.rows if p.round_id == round_id else ():
            if accepted.get(d) == h and d not in seen:
                total.add(values, mask, weight)
                seen.add(d)
    return Merged(total, frozenset(d for d in accepted if d not in seen), tuple(taken), tuple(refused))

"""merge_partials: each accepted delta counted once whatever partials the workers hand over."""

from __future__ import annotations

import numpy as np

from fleet.aggregate import RunningSums
from fleet.coordinator.partials import Partial, merge_partials

SIZE = 4


def _rows():
    rng = np.random.default_rng(0)
    return {f"d{i}": (rng.integers(-5, 6, SIZE), rng.random(SIZE) < 0.7, int(rng.integers(1, 9))) for i in range(6)}


def _partial(rows, devices, worker, round_id=3):
    p = Partial(round_id, RunningSums(SIZE), {}, worker)
    for d in devices:
        p.sums.add(*rows[d])
        p.covered[d] = f"h{d}"
    return p


def _all(rows):
    s = RunningSums(SIZE)
    for d in sorted(rows):
        s.add(*rows[d])
    return s


def test_disjoint_partials_sum_to_every_row():
    rows = _rows()
    accepted = {d: f"h{d}" for d in rows}
    m = merge_partials(3, accepted, [_partial(rows, ["d0", "d1", "d2"], "a"), _partial(rows, ["d3", "d4"], "b")],
                       SIZE)
    assert m.missing == {"d5"} and not m.refused
    m.sums.add(*rows["d5"])  # what the coordinator decodes from its store
    want = _all(rows)
    assert np.array_equal(m.sums.num, want.num) and np.array_equal(m.sums.den, want.den)


def test_overlap_foreign_delta_and_old_round_are_left_out():
    rows = _rows()
    accepted = {d: f"h{d}" for d in rows if d != "d5"}
    big = _partial(rows, ["d0", "d1", "d2"], "a")
    overlap = _partial(rows, ["d2", "d3"], "b")  # d2 again: a sum cannot be taken apart, so all of b is refused
    foreign = _partial(rows, ["d4", "d5"], "c")  # d5 was never accepted
    old = _partial(rows, ["d3"], "d", round_id=2)
    m = merge_partials(3, accepted, [overlap, foreign, big, old], SIZE)
    assert m.taken == ("a",) and len(m.refused) == 3
    assert m.missing == {"d3", "d4"}
    changed = dict(accepted, d1="other")  # a partial summed other bytes than the stored delta
    assert merge_partials(3, changed, [big], SIZE).missing == set(changed)

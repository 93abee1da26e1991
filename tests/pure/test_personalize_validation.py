"""Which training samples a device holds back as validation (fleet/sim/personalize.py ``validation_indices``:
``last``, ``per_label``, ``stored``), and the stream order (``DeviceData.t_train``) the scenarios give it."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from device_agent.engine.trainer import Trainer
from fleet.sim import personalize as ps
from fleet.sim.baselines import DeviceSlice
from tests.conftest import require
from tests.fixtures.tiny import tiny_dataset, tiny_plan


def _val(y, times, rule, fraction=0.25):
    keep, val = ps.validation_indices(np.asarray(y), None if times is None else np.asarray(times), fraction, rule)
    assert sorted([*keep, *val]) == list(range(len(y)))  # a partition of the device's samples
    return val.tolist()


def test_rules_on_a_stream_stored_backwards():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    times = [7, 6, 5, 4, 3, 2, 1, 0]  # storage order is the reverse of time order
    assert _val(y, times, "last") == [0, 1]  # the 2 latest samples (k = round(8 x 0.25))
    assert _val(y, times, "stored") == [6, 7]  # the 2 last stored
    assert _val(y, times, "per_label") == [0, 4]  # each label's latest (k = floor(4 x 0.25 + 0.5) = 1)
    assert _val(y, None, "last") == _val(y, None, "stored") == [6, 7]  # no times: storage order is time order


def test_per_label_holds_every_class_back_where_last_holds_only_the_latest_exercise():
    # a watch-like stream in time order, exercise by exercise: 6 x class 0, 6 x class 1, 4 x class 2
    y = [0] * 6 + [1] * 6 + [2] * 4
    assert _val(y, list(range(16)), "last") == [12, 13, 14, 15]  # only class 2, the last exercise
    # per label: class 0 and 1 floor(1.5 + 0.5) = 2 each, class 2 floor(1 + 0.5) = 1, each label's latest
    assert _val(y, list(range(16)), "per_label") == [4, 5, 10, 11, 15]


def test_gap_drops_the_samples_just_before_each_held_back_tail():
    y = [0] * 6 + [1] * 6 + [2] * 4
    keep, val = ps.validation_indices(np.array(y), np.arange(16), 0.25, "per_label", gap=1)
    assert val.tolist() == [4, 5, 10, 11, 15] and keep.tolist() == [0, 1, 2, 6, 7, 8, 12, 13]  # 3, 9, 14 dropped
    keep, val = ps.validation_indices(np.array(y), np.arange(16), 0.25, "last", gap=2)
    assert val.tolist() == [12, 13, 14, 15] and keep.tolist() == list(range(10))  # 10, 11 dropped
    # a label keeps a training sample: label 1 has 2 (1 held back, nothing left to drop)
    keep, val = ps.validation_indices(np.array([0, 0, 0, 0, 1, 1]), None, 0.25, "per_label", gap=1)
    assert val.tolist() == [3, 5] and keep.tolist() == [0, 1, 4]
    keep, val = ps.validation_indices(np.array(y), None, 0.25, "stored", gap=3)  # stored: no gap (random holdout)
    assert val.tolist() == [12, 13, 14, 15] and len(keep) == 12


def test_small_labels_keep_a_training_sample_and_tiny_devices_hold_nothing_back():
    # label 0: 1 sample -> 0 held back; label 1: 2 -> floor(1.0) = 1; label 2: 4 -> 1
    assert _val([0, 1, 1, 2, 2, 2, 2], None, "per_label") == [2, 6]
    assert _val([0, 0, 0, 0], None, "per_label", fraction=0.9) == [1, 2, 3]  # at most n_c - 1 of a label
    for rule in ps.VALIDATION_RULES:
        assert _val([0, 1, 1], None, rule) == []  # fewer than 4 samples: no validation data
    with pytest.raises(ValueError, match="validation rule: expected one of last, per_label, stored"):
        ps.validation_indices(np.zeros(8), None, 0.25, "random")
    with pytest.raises(ValueError, match="times: expected one per sample"):
        ps.validation_indices(np.zeros(8), np.arange(7), 0.25, "last")


@pytest.fixture(scope="module")
def setup():
    plan = tiny_plan()
    slices, times = [], []
    for i in range(3):
        x, y = tiny_dataset(48, seed=20 + i)
        slices.append(DeviceSlice(f"d{i}", x[:32], y[:32].astype(np.int32), x[32:], y[32:].astype(np.int32)))
        times.append(np.random.default_rng(i).permutation(32))  # stored shuffled, as the scenarios do
    initial = Trainer(plan).trainable_state()
    t, globals_ = Trainer(plan), []
    for _ in range(2):
        t.train_step(slices[0].x_train[:8], slices[0].y_train[:8], 0.1)
        globals_.append(t.trainable_state())
    p = ps.Plain(local_steps=4, lr=0.1, steps=4, personal_lr=0.1, lam_q15=3277, seed=0, validation="per_label")
    return plan, slices, times, initial, globals_, p


def test_validation_split_takes_the_rule_and_each_devices_times(setup):
    _, slices, times, *_ = setup
    for rule in ps.VALIDATION_RULES:
        for d, t, v in zip(slices, times, ps.validation_split(slices, 0.25, rule, times)):
            keep, val = ps.validation_indices(d.y_train, t, 0.25, rule)
            assert np.array_equal(v.x_test, d.x_train[val]) and np.array_equal(v.y_train, d.y_train[keep])
            assert np.array_equal(v.y_test, d.y_train[val]) and np.array_equal(v.x_train, d.x_train[keep])
    per_label = ps.validation_split(slices, 0.25, "per_label", times)
    assert any(not np.array_equal(a.y_test, b.y_test)
               for a, b in zip(per_label, ps.validation_split(slices, 0.25, "stored")))


def test_lr_rule_and_select_use_the_configured_split_and_never_read_test_data(setup):
    plan, slices, times, initial, globals_, p = setup
    # no grid: the per-device validation accuracies are one replay on the per-label split of the given times
    _, _, val = ps.with_tuned_lr(plan, initial, globals_, slices, ["bias"], p, times=times)
    assert val == ps.compare_methods(plan, initial, globals_, ps.validation_split(slices, 0.25, "per_label", times),
                                     ["bias"], p)
    junk = [DeviceSlice(d.device_id, d.x_train, d.y_train, d.x_test * 0, (d.y_test + 1) % 4) for d in slices]
    got = [ps.tune_lr(plan, initial, globals_, sl, ["bias", "head"], p, grid=(1.0, 3.0), times=times)
           for sl in (slices, junk)]
    assert got[0] == got[1] and ps.select_per_device(got[0][2]) == ps.select_per_device(got[1][2])


def _overlap_breaks(x: np.ndarray, shift: int) -> int:
    """Consecutive windows (time order) that do not continue each other by ``shift`` samples along the last axis."""
    return int(sum(not np.array_equal(a[..., shift:], b[..., :-shift]) for a, b in pairwise(x)))


def test_watch_devices_know_the_time_order_of_their_shuffled_stream():
    """Sorted by t_train, each exercise's training windows on a device continue each other (stride 64 of 128: a
    window's second half is the next one's first half), except at most once where the device's chunk crosses from
    one recording to the next; in storage order (shuffled) they do not."""
    pytest.importorskip("seglearn")
    from fleet.scenarios.watch import load_watch_scenario

    sc = load_watch_scenario(10, window=128, stride=64, proxy_subjects=(1, 2), seed=0)
    shuffled = 0
    for d in sc.devices:
        assert sorted(d.t_train.tolist()) == list(range(len(d.y_train)))
        for c in np.unique(d.y_train):
            mine = np.flatnonzero(d.y_train == c)
            assert _overlap_breaks(d.x_train[mine[np.argsort(d.t_train[mine])]], 64) <= 1
            shuffled += _overlap_breaks(d.x_train[mine], 64) > 1
    assert shuffled > 0  # the stored order is not the time order (the check can fail)


def test_keyboard_and_heart_streams_carry_their_order(monkeypatch):
    from fleet.scenarios import heart as H
    from fleet.scenarios import text as T

    require((T.DATA_DIR / T.SDIST).is_file(), f"{T.DATA_DIR / T.SDIST} missing (run `make setup`)")
    roles = T.load_roles()
    monkeypatch.setattr(T, "load_roles", lambda data_dir=None: roles)
    sc = T.load_shakespeare_scenario(2, window=40, stride=8, devices_per_user=2, proxy_users=3, max_proxy=200)
    for d in sc.devices:  # sorted by t_train, each window continues the previous one by 8 characters (text order)
        assert sorted(d.t_train.tolist()) == list(range(len(d.y_train)))
        assert _overlap_breaks(d.x_train[np.argsort(d.t_train)], 8) == 0
        assert _overlap_breaks(d.x_train, 8) > 0  # stored shuffled
    capped = T.load_shakespeare_scenario(2, window=40, stride=8, devices_per_user=2, proxy_users=3, max_proxy=200,
                                         max_train_per_device=50)
    for d, full in zip(capped.devices, sc.devices):  # a kept window's t_train is still its place in the text
        assert len(d.t_train) == 50
        assert np.array_equal(d.x_train, full.x_train[np.argsort(full.t_train)][d.t_train])
    try:
        table = H.load_table()
    except FileNotFoundError as e:
        require(False, str(e))
    df = table.reset_index(drop=True)
    proxy_rows, per_device = H.split_rows(df, 8, 0.2, 0)
    feats = H.HeartFeatures(df.iloc[proxy_rows])
    hs = H.load_heart_scenario(8, table=table)
    for d, (_, tr_rows, _) in zip(hs.devices, per_device):  # sorted by t_train: its patients' arrival order
        assert np.array_equal(d.x_train[np.argsort(d.t_train)], feats(df.iloc[tr_rows]))

"""Heart-disease loader: split by hospital, proxy/train/test disjoint, preprocessing fitted on proxy rows only."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.scenarios import heart as H
from tests.conftest import require


@pytest.fixture(scope="module")
def table():
    try:
        return H.load_table()
    except FileNotFoundError as e:
        require(False, str(e))


def test_split_rows_by_hospital_with_disjoint_proxy_train_test(table):
    proxy, per_device = H.split_rows(table, devices=8, proxy_fraction=0.2, seed=0)

    hospital = table["dataset"].to_numpy()
    seen = set(proxy.tolist())
    assert len(per_device) == 8
    for d, (k, tr, te) in enumerate(per_device):
        assert k == d % 4
        assert set(hospital[tr]) == set(hospital[te]) == {H.HOSPITALS[k]}  # one hospital per device
        rows = set(tr.tolist()) | set(te.tolist())
        assert not rows & seen, f"device {d} shares patients with another device or the proxy set"
        seen |= rows
        assert len(te) / (len(tr) + len(te)) == pytest.approx(0.3, abs=0.05)
    assert seen == set(range(len(table)))  # every patient is used exactly once
    for h in H.HOSPITALS:  # the proxy set is stratified by hospital
        frac = (hospital[proxy] == h).sum() / (hospital == h).sum()
        assert frac == pytest.approx(0.2, abs=0.01)


def test_scenario_shapes_labels_and_class_balance(table):
    sc = H.load_heart_scenario(8, table=table)

    assert sc.input_shape == (len(H.FEATURES), 1, 1) == (32, 1, 1) and sc.num_classes == 2
    for d in sc.devices:
        for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
            assert x.dtype == np.float32 and x.shape == (len(y), 32, 1, 1) and np.isfinite(x).all()
            assert set(np.unique(y)) <= {0, 1}
    y_all = np.concatenate([d.y_train for d in sc.devices] + [d.y_test for d in sc.devices])
    assert 0.45 < y_all.mean() < 0.65  # ~55% of the 920 patients have disease
    swiss = np.concatenate([d.y_train for d in sc.devices if d.subject == 3])
    hungary = np.concatenate([d.y_train for d in sc.devices if d.subject == 1])
    assert swiss.mean() > 0.8 and hungary.mean() < 0.5  # the hospitals' priors differ (non-IID by nature)


def test_missing_values_imputed_with_indicator_and_proxy_statistics(table):
    proxy_rows, _ = H.split_rows(table, 4, 0.2, seed=0)
    proxy = table.iloc[proxy_rows]
    feats = H.HeartFeatures(proxy)
    f = {name: i for i, name in enumerate(H.FEATURES)}
    rows = table[(table["dataset"] == "Switzerland") & table["ca"].isna() & (table["chol"] == 0)].head(3)
    assert len(rows) == 3

    x = feats(rows)[:, :, 0, 0]

    assert (x[:, f["ca"]] == 0).all() and (x[:, f["ca_missing"]] == 1).all()  # imputed at the proxy mean
    assert (x[:, f["chol"]] == 0).all() and (x[:, f["chol_missing"]] == 1).all()  # chol = 0 means missing
    ok = proxy["ca"].notna()
    assert feats.mean["ca"] == pytest.approx(proxy.loc[ok, "ca"].mean())
    # a device's test rows never move the statistics: features of other rows are unchanged when they change
    before = feats(table.iloc[:5])
    changed = table.copy()
    changed.loc[~changed.index.isin(proxy.index), "age"] = 1000
    assert np.array_equal(H.HeartFeatures(changed.iloc[proxy_rows])(table.iloc[:5]), before)


def test_too_many_devices_is_a_clear_error(table):
    with pytest.raises(ValueError, match="use fewer devices"):
        H.split_rows(table, devices=400, proxy_fraction=0.2)

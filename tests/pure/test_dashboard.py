"""The dashboard's model and app: events fold into tables, paging, the access token, no write route."""

from __future__ import annotations

import pytest

from device_agent.wire.messages import Publish
from fleet.coordinator.events import DeviceFailed, RoundClosed, Unfit, Verdict
from fleet.dashboard.server import is_loopback, parse_bind
from fleet.dashboard.view import FleetView
from fleet.registry import DeviceRecord

pytestmark = pytest.mark.pure


def _view_with_a_round() -> FleetView:
    v = FleetView("f", "ab" * 32, epsilon_budget=4.0)
    v.sync([DeviceRecord("d1", "mps2-an500", 320_000, 1 << 20), DeviceRecord("d0", "host", 1 << 20, 1 << 20)],
           {"round_id": 1, "state": "training", "selected": 2, "accepted": 0, "lost": 0, "deadline": 9.0})
    v.apply(Publish("dev/d0/task", b"x" * 100))
    v.apply(Verdict("d0", 1, "ok", nbytes=300))
    v.apply(Verdict("d1", 1, "stale_base", 3, "base v1", nbytes=200))
    v.apply(Verdict("d0", 1, "duplicate", nbytes=300))
    v.apply(RoundClosed(1, True, 2, ("d0",), epsilon=0.5))
    return v


def test_outputs_fold_into_device_and_round_tables():
    v = _view_with_a_round()

    rows = {r["device_id"]: r for r in v.device_page()["rows"]}
    rounds = v.rounds_table()["rounds"]

    assert rows["d0"]["accepted"] == 1 and rows["d0"]["refused"] == {}
    assert rows["d1"]["accepted"] == 0 and rows["d1"]["refused"] == {"stale_base": 1}
    assert rows["d0"]["bytes_up"] == 600 and rows["d1"]["board"] == "mps2-an500"
    assert rounds == [{"round_id": 1, "committed": True, "version": 2, "accepted": 1, "detail": "",
                       "epsilon": 0.5, "bytes_up": 800, "bytes_down": 100}]
    s = v.summary()
    assert (s["devices"], s["online"], s["model_version"], s["refused"]) == (2, 2, 2, {"stale_base": 1})
    assert v.curves()["epsilon"] == [(1, 0.5)] and v.curves()["epsilon_budget"] == 4.0


def test_a_device_below_every_plan_is_shown_once_with_why():
    # Prepare
    v = _view_with_a_round()
    seq = v.seq
    # Execute: the coordinator says so at each of its hellos
    changed = [v.apply(Unfit("tiny", 20_000, 26_300, "no plan fits")) for _ in range(3)]
    # Assert
    row = v.device("tiny")
    assert changed == [True, False, False] and v.seq == seq + 1
    assert row["refused"] == {"no_plan_fits": 1} and "smallest plan needs 26300 B" in row["last_failure"]
    assert v.summary()["refused"]["no_plan_fits"] == 1 and "tiny" in v.log[-1]


def test_seq_moves_only_on_change():
    v = _view_with_a_round()
    recs = [DeviceRecord("d0", "host", 1 << 20, 1 << 20)]
    v.sync(recs, {})
    seq = v.seq

    changed = v.sync(recs, {})
    assert not changed and v.seq == seq
    recs[0].online = False
    assert v.sync(recs, {}) and v.seq == seq + 1
    assert v.apply(DeviceFailed("d0", 2, "no_samples")) and v.device("d0")["last_failure"] == "round 2: no_samples"


def test_a_snapshot_older_than_a_closed_round_does_not_reopen_it():
    v = _view_with_a_round()  # round 1 closed (applied from the coordinator's outputs)
    recs = [DeviceRecord("d0", "host", 1 << 20, 1 << 20)]

    v.sync(recs, {"round_id": 1, "state": "training", "selected": 2, "accepted": 1, "lost": 0, "deadline": 9.0})
    assert v.summary()["open_round"] == {}
    v.sync(recs, {"round_id": 2, "state": "training", "selected": 2, "accepted": 0, "lost": 0, "deadline": 19.0})
    assert v.summary()["open_round"]["round_id"] == 2


def test_device_table_pages_and_filters_at_ten_thousand_devices():
    v = FleetView("f")
    v.sync([DeviceRecord(f"dev{i:05d}", "host" if i % 2 else "mps2-an386", 1, 1, online=i % 3 == 0)
            for i in range(10_000)], {})

    last = v.device_page(page=999, size=10)
    beyond = v.device_page(page=5000, size=10)
    boards = v.device_page(size=500, query="mps2")
    online = v.device_page(size=20, online_only=True)

    assert (last["pages"], last["page"], last["rows"][-1]["device_id"]) == (1000, 999, "dev09999")
    assert beyond["page"] == 999  # clamped to the last page, not an empty one
    assert boards["total"] == 5000 and len(boards["rows"]) == 500
    assert online["total"] == 3334 and all(r["online"] for r in online["rows"])


def test_bind_spec_and_loopback():
    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_bind("[::1]:81") == ("::1", 81)
    for bad in ("http", "host:", ":80", "1:99999"):
        with pytest.raises(ValueError, match="--dashboard"):
            parse_bind(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def _client(token):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # starlette's TestClient on httpx: its own deprecation
        from starlette.testclient import TestClient

    from fleet.dashboard.app import make_app
    from fleet.dashboard.server import Dashboard

    host = "127.0.0.1" if token is None else "0.0.0.0"
    return TestClient(make_app(Dashboard(_view_with_a_round(), host, 0, token=token)))


def test_token_is_required_and_then_kept_in_a_cookie():
    with _client("s3cret") as c:
        assert c.get("/api/summary").status_code == 401
        assert c.get("/api/summary?token=wrong").status_code == 401
        assert c.get("/api/summary", headers={"Authorization": "Bearer s3cret"}).json()["devices"] == 2
        page = c.get("/?token=s3cret")
        assert page.status_code == 200 and "TinyFleet" in page.text
        assert c.get("/api/devices").status_code == 200  # the cookie the page set


def test_api_answers_and_refuses_bad_input():
    with _client(None) as c:
        assert c.get("/api/devices?page=x").status_code == 400
        assert c.get("/api/device/nope").status_code == 404
        assert c.get("/api/device/d1").json()["refused"] == {"stale_base": 1}
        png = c.get("/chart/traffic.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert c.get("/chart/other.png").status_code == 404
        assert c.post("/api/summary").status_code == 405  # read-only
        assert "d1" in c.get("/device/d1").text


def test_default_token_off_loopback():
    from fleet.dashboard.server import Dashboard

    assert Dashboard(FleetView("f"), "127.0.0.1").token is None
    off = Dashboard(FleetView("f"), "0.0.0.0")
    assert off.token and len(off.token) >= 20 and f"token={off.token}" in off.url

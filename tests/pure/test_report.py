"""The run report from a small metrics.json fixture, and the pure baseline helpers (personal marking, pooling)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.engine import ir
from fleet.compiler.pipeline import mark_personal
from fleet.sim import baselines as bl
from fleet.sim import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(devices: int = 3, rounds: int = 3) -> dict:
    per_device = [{"device_id": f"dev{i:04d}", "subject": 3 + i, "backend": "python", "n_train": 100 + i,
                   "n_test": 40, "rounds_participated": rounds - (i == 2), "memory_source": "planned",
                   "sram_bytes": 5760, "flash_bytes": 13936, "accuracy_global": 0.7 + 0.05 * i,
                   "accuracy_personalized": 0.75 + 0.05 * i, "accuracy_local": 0.6 + 0.1 * i,
                   "accuracy_centralized": 0.9} for i in range(devices)]
    return {"rounds": rounds, "devices": devices, "accuracy_initial": 0.6,
            "accuracy_per_round": [0.65, 0.7, 0.75][:rounds], "accuracy_personalized_per_round": [0.66, 0.72, 0.8],
            "accuracy_local_per_round": [0.62, 0.66, 0.7], "accuracy_centralized_per_round": [0.85, 0.88, 0.9],
            "accuracy_mean_per_device": {"global": 0.75, "personalized": 0.8, "local": 0.7, "centralized": 0.9},
            "round_status": ["committed", "abandoned", "committed"], "devices_per_round": [3, 1, 2],
            "selected_per_round": [3, 3, 3], "bytes_up_per_device_round": [1600.0, 500.0, 1500.0],
            "bytes_down_per_device_round": [2100.0, 2000.0, 2050.0], "round_seconds": [3.1, 30.0, 3.2],
            "devices_dropped": 3, "devices_offline": 0, "plan_bytes": 13936, "plan_sram_bytes": 5760,
            "scheme": "config", "personal": ["classifier.bias"], "errors": ["dev0002: <b>boom</b>"],
            "interrupted": False, "per_device": per_device}


def _write(tmp_path: Path, m: dict) -> Path:
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    return report.write_report(tmp_path)


def test_report_has_every_plot_and_table(tmp_path):
    m = _metrics()

    page = _write(tmp_path, m)

    text = page.read_text()
    for name in report.PLOTS:
        if name == "behaviour.png":  # drawn only for a run with a behaviour model (tests/e2e/test_sim_behaviour.py)
            assert 'src="behaviour.png"' not in text and "behaviour" not in m
            continue
        assert f'src="{name}"' in text, name
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    for cls in ("summary", "facts", "rounds", "devices"):
        assert f'<table class="{cls}">' in text
    for row in m["per_device"]:
        assert f"<td>{row['device_id']}</td>" in text
    for _, label, _ in report.METHODS:
        assert label in text
    assert text.count("<tr>") >= 1 + 3 + 1 + 3  # header + rows of the round and device tables at least
    assert "<script" not in text and "http" not in text  # self-contained, no JS, nothing fetched
    assert "&lt;b&gt;boom&lt;/b&gt;" in text  # errors are escaped


def test_report_without_baselines_or_device_table_skips_those_plots(tmp_path):
    m = _metrics()
    for k in ("accuracy_personalized_per_round", "accuracy_local_per_round", "accuracy_centralized_per_round",
              "per_device"):
        m.pop(k)

    text = _write(tmp_path, m).read_text()

    assert 'src="accuracy.png"' in text and 'src="bytes.png"' in text and 'src="participation.png"' in text
    assert "device_accuracy.png" not in text and "memory.png" not in text
    summary = text.split('<table class="summary">')[1].split("</table>")[0]
    assert "global model" in summary and "local-only" not in summary and "centralized" not in summary


def test_report_cli_missing_metrics_says_what_to_run(tmp_path, capsys):
    from fleet.cli import main

    code = main(["report", str(tmp_path)])

    assert code == 2
    assert "tinyfleet simulate" in capsys.readouterr().err


def test_report_cli_writes_page(tmp_path, capsys):
    from fleet.cli import main

    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))

    code = main(["report", str(tmp_path)])

    assert code == 0
    assert (tmp_path / "index.html").exists()
    assert capsys.readouterr().out.strip().endswith("index.html")


# --- baselines ------------------------------------------------------------------------------------------------


def _plan() -> ir.Plan:
    t = [ir.Tensor(0, "x", (2, 1, 1), ir.DType.INT8, ir.Kind.INPUT),
         ir.Tensor(1, "classifier.weight", (2, 2, 1, 1), ir.DType.INT8, ir.Kind.TRAINABLE,
                   data=np.zeros((2, 2, 1, 1), np.int8)),
         ir.Tensor(2, "classifier.bias", (2,), ir.DType.INT32, ir.Kind.TRAINABLE, data=np.zeros(2, np.int32)),
         ir.Tensor(3, "frozen", (2,), ir.DType.INT32, ir.Kind.CONST, data=np.zeros(2, np.int32))]
    return ir.Plan(t, [], 0, 0, 0, name="toy")


def test_mark_personal_marks_a_copy_only():
    plan = _plan()

    out = mark_personal(plan, ["classifier.bias"])

    assert [t.name for t in out.tensors if t.personal] == ["classifier.bias"]
    assert not any(t.personal for t in plan.tensors)
    assert bl.personal_ids(out) == [2] and bl.personal_ids(plan) == []
    assert mark_personal(plan, []) is plan


@pytest.mark.parametrize("names, msg", [(["frozen"], "not trainable"), (["nope"], "not trainable"),
                                        (["classifier.bias", "classifier.weight"], "at least one shared")])
def test_mark_personal_rejects_bad_names(names, msg):
    with pytest.raises(ValueError, match=msg):
        mark_personal(_plan(), names)


def test_pooled_weights_devices_by_test_windows():
    devs = [bl.DeviceSlice("a", *[np.zeros(0)] * 2, np.zeros(1), np.zeros(10)),
            bl.DeviceSlice("b", *[np.zeros(0)] * 2, np.zeros(1), np.zeros(30)),
            bl.DeviceSlice("c", *[np.zeros(0)] * 2, np.zeros(1), np.zeros(0))]

    assert bl.pooled([1.0, 0.5, None], devs) == pytest.approx((10 + 15) / 40)
    assert bl.pooled([None, None, None], devs) == 0.0

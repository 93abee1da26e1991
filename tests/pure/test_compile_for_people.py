"""`tinyfleet compile` for a user's own model: no PYTHONPATH, trained weights, the input quantization printed and
applied (`quantize-data`, float `--proxy`), shape conflicts refused, unsupported layers named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fleet.cli import main
from tests.conftest import ROOT

BOARD = str(ROOT / "configs" / "boards" / "stm32f746.yaml")
MODEL = '''
from torch import nn

class Net(nn.Module):
    input_shape = (1, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's folder (the working directory): mynet.py, trained-looking weights, float data."""
    (tmp_path / "mynet.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    import importlib.util  # NOTE: not through sys.path: the CLI must find the module on its own

    spec = importlib.util.spec_from_file_location("mynet_for_weights", tmp_path / "mynet.py")
    mynet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mynet)
    torch.manual_seed(1)
    net = mynet.Net()
    with torch.no_grad():
        net.fc.weight.mul_(3.0)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(0.5, 0.3, (40, 1, 6, 6)).astype(np.float32), y=np.arange(40) % 3)
    return tmp_path


def _compile(capsys, *argv) -> tuple[int, dict | None, str]:
    import sys

    sys.modules.pop("mynet", None)
    rc = main(["compile", *argv, "--board", BOARD, "--json"])
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    return rc, json.loads(out[-1]) if rc == 0 and out else None, cap.err


def test_own_model_compiles_from_the_working_directory_with_its_weights(user_dir, capsys):
    # Execute: module:Class found in the working directory; weights change the plan
    rc, with_w, err = _compile(capsys, "mynet:Net", "--weights", "w.pt", "--calib", "data.npz", "--scheme", "last")
    rc0, without, _ = _compile(capsys, "mynet:Net", "--calib", "data.npz", "--scheme", "last")
    bad_rc, _, bad = _compile(capsys, "mynet:Net", "--weights", "data.npz", "--calib", "data.npz")
    # Assert
    assert rc == 0 and rc0 == 0, err
    assert with_w["plan_hash"] != without["plan_hash"]
    q = with_w["input"]  # the calibration data's range [min, max] -> int8
    x = np.load("data.npz")["x"]
    assert q["shape"] == [1, 6, 6] and q["dtype"] == "int8" and -128 <= q["zero_point"] <= 127
    assert q["scale"] == pytest.approx((max(x.max(), 0) - min(x.min(), 0)) / 255, rel=1e-3)
    assert bad_rc == 2 and "--weights" in bad and "not a readable state dict" in bad


def test_float_proxy_and_quantize_data_give_the_same_plan(user_dir, capsys):
    # Prepare: the input quantization the compiler reports
    base = ["mynet:Net", "--weights", "w.pt", "--calib", "data.npz", "--scheme", "auto"]
    _, first, _ = _compile(capsys, *base)
    q = first["input"]
    # Execute: float proxy quantized by compile, and int8 proxy written by `tinyfleet quantize-data`
    rc_q = main(["quantize-data", "data.npz", "-o", "q.npz", "--scale", repr(q["scale"]), "--zero-point",
                 str(q["zero_point"])])
    capsys.readouterr()
    rc_f, from_float, err = _compile(capsys, *base, "--proxy", "data.npz")
    rc_i, from_int8, _ = _compile(capsys, *base, "--proxy", "q.npz")
    # Assert: one quantization rule, so the searched scheme and the plan are identical
    assert rc_q == 0 and rc_f == 0 and rc_i == 0, err
    assert np.load("q.npz")["x"].dtype == np.int8
    assert from_float["plan_hash"] == from_int8["plan_hash"] and from_float["scheme"] == from_int8["scheme"]


def test_input_shape_conflicting_with_the_calibration_file_is_an_error(user_dir, capsys):
    # Execute
    rc, _, err = _compile(capsys, "mynet:Net", "--calib", "data.npz", "--input-shape", "1,36")
    # Assert
    assert rc == 2 and "--input-shape 1,36 conflicts with --calib data.npz" in err and "(1, 6, 6)" in err


def test_unsupported_layer_is_named_by_module_path_and_type(user_dir, capsys):
    # Execute
    rc, _, err = _compile(capsys, "mynet:Recurrent", "--input-shape", "5,6")
    # Assert
    assert rc == 2 and "'rnn' (LSTM)" in err and "getitem" not in err, err


def test_missing_module_says_where_it_looked(user_dir, capsys):
    # Execute
    rc, _, err = _compile(capsys, "nosuch:Net", "--input-shape", "1,6,6")
    # Assert
    assert rc == 2 and "no module named 'nosuch'" in err and str(user_dir) in err

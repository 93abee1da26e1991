"""`tinyfleet compile` refuses bad input with one line on stderr, never a traceback: exit 2 for a missing module,
a bad model spec or file, a bad input shape, bad calibration/proxy data, a bad budget string or output path; exit
1 (documented in the README) for a budget no scheme meets. Each case is a real process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

BOARD = ["--board", "configs/boards/stm32f746.yaml"]
TINY = "fleet.compiler.models:TinyCNN"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile_cli")
    (d / "bad.pkl").write_bytes(b"not a pickle")
    (d / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.save(d / "flat_calib.npy", np.zeros((4, 3), np.float32))
    np.savez(d / "proxy_labels.npz", x=np.zeros((4, 1, 28, 28), np.int8), y=np.array([0, 1, 2, 99]))
    np.savez(d / "proxy_float.npz", x=np.zeros((4, 1, 27, 27), np.float32), y=np.array([0, 1, 2, 3]))
    np.savez(d / "proxy_no_y.npz", x=np.zeros((4, 1, 28, 28), np.int8))
    mods = d / "mods"
    mods.mkdir()
    (mods / "broken_model.py").write_text('raise RuntimeError("boom at import")\n')
    (mods / "needs_arg.py").write_text("import torch\n\nclass Net(torch.nn.Module):\n"
                                       "    def __init__(self, k):\n        super().__init__()\n")
    return d


def compile_(files, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(files / "mods")])}
    env.pop("TINYFLEET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fleet.cli", "compile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


CASES = {  # name -> (arguments, words the one line must hold)
    "missing_module": (["nosuch.module:Net", *BOARD], "no module named 'nosuch'"),
    "missing_class": (["fleet.compiler.models:Nope", *BOARD], "has no attribute 'Nope'"),
    "module_raises": (["broken_model:Net", *BOARD], "RuntimeError: boom at import"),
    "constructor_raises": (["needs_arg:Net", *BOARD, "--input-shape", "1,2"], "building the model raised TypeError"),
    "bad_model_spec": (["nonsense", *BOARD], "MODEL must be"),
    "missing_pkl": (["{d}/missing.pkl", *BOARD], "model file not found"),
    "corrupt_pkl": (["{d}/bad.pkl", *BOARD], "not a readable MIT model .pkl"),
    "input_shape_not_numbers": ([TINY, *BOARD, "--input-shape", "a,b"], "--input-shape 'a,b'"),
    "input_shape_zero": ([TINY, *BOARD, "--input-shape", "1,0,28"], "positive integers"),
    "input_shape_wrong_for_model": ([TINY, *BOARD, "--input-shape", "3,5"], "calibration batch of shape (256, 3, 5)"),
    "calib_missing": ([TINY, *BOARD, "--calib", "{d}/missing.npz"], "--calib"),
    "calib_corrupt": ([TINY, *BOARD, "--calib", "{d}/bad.npz"], "not a readable"),
    "calib_wrong_shape": ([TINY, *BOARD, "--calib", "{d}/flat_calib.npy"], "calibration batch of shape (4, 3)"),
    "proxy_labels": ([TINY, *BOARD, "--input-shape", "1,28,28", "--proxy", "{d}/proxy_labels.npz"], "[0, 10)"),
    "proxy_float": ([TINY, *BOARD, "--input-shape", "1,28,28", "--proxy", "{d}/proxy_float.npz"],
                    "x must be float or int8 (N, 1, 28, 28)"),
    "proxy_no_y": ([TINY, *BOARD, "--input-shape", "1,28,28", "--proxy", "{d}/proxy_no_y.npz"], "named 'y'"),
    "budget_string": ([TINY, *BOARD, "--input-shape", "1,28,28", "--budget", "12XB"], "--budget"),
    "board_missing": ([TINY, "--board", "{d}/missing.yaml", "--input-shape", "1,28,28"], "missing.yaml"),
    "unknown_scheme": ([TINY, *BOARD, "--input-shape", "1,28,28", "--scheme", "nonsense"], "unknown scheme"),
    "output_dir_missing": ([TINY, *BOARD, "--input-shape", "1,28,28", "-o", "{d}/no/dir/p.ttp"], "cannot write"),
    "classes_zero": ([TINY, *BOARD, "--input-shape", "1,28,28", "--classes", "0"], "--classes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(files, case):
    # Prepare
    args, words = CASES[case]
    # Execute
    r = compile_(files, *[a.format(d=files) for a in args])
    # Assert
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("tinyfleet compile: ") and words in lines[0], lines[0]


def test_infeasible_budget_is_one_line_and_exit_1(files):
    # Prepare / Execute
    r = compile_(files, TINY, *BOARD, "--input-shape", "1,28,28", "--budget", "1KB")
    # Assert
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "smallest feasible budget" in lines[0]

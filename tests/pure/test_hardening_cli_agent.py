"""`device-agent run` refuses bad input with one line on stderr and exit 2, never a traceback: files (data, plan,
key, state), samples the plan cannot train, an invalid id, an unreachable broker. Each case is a real process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from device_agent.wire.plan import plan_to_bytes
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    d = tmp_path_factory.mktemp("agent_cli")
    (d / "plan.ttp").write_bytes(plan_to_bytes(tiny_plan()))
    x, y = tiny_dataset(8)
    np.savez(d / "good.npz", x=x, y=y)
    np.savez(d / "labels.npz", x=x, y=y + 10)
    np.savez(d / "float_labels.npz", x=x, y=y.astype(np.float64))
    np.savez(d / "zero.npz", x=x[:0], y=y[:0])
    xf = x.astype(np.float32)
    xf[3, 0, 0, 0] = np.nan
    np.savez(d / "nan.npz", x=xf, y=y)
    np.savez(d / "shape.npz", x=x.transpose(0, 2, 3, 1), y=y)
    np.savez(d / "empty.npz")
    np.save(d / "array.npy", x)
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "bad.pem").write_text("not a key\n")
    (d / "bad.state.json").write_text('{"counter": "seven"}')
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TINYFLEET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "device_agent.cli", "run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


CASES = {  # name -> (arguments after the common ones, words the one line must hold)
    "invalid_id": (["--id", "a/b", "--data", "{d}/good.npz"], "--id 'a/b'"),
    "missing_data": (["--data", "{d}/missing.npz"], "no such file"),
    "npy_instead_of_npz": (["--data", "{d}/array.npy", "--plan", "{d}/plan.ttp"], "single array (.npy)"),
    "corrupt_npz": (["--data", "{d}/corrupt.npz", "--plan", "{d}/plan.ttp"], "not a readable .npz"),
    "empty_npz": (["--data", "{d}/empty.npz", "--plan", "{d}/plan.ttp"], "expected arrays x and y"),
    "labels_out_of_range": (["--data", "{d}/labels.npz", "--plan", "{d}/plan.ttp"], "[0, 4)"),
    "float_labels": (["--data", "{d}/float_labels.npz", "--plan", "{d}/plan.ttp"], "got dtype float64"),
    "zero_samples": (["--data", "{d}/zero.npz", "--plan", "{d}/plan.ttp"], "no samples"),
    "nan_inputs": (["--data", "{d}/nan.npz", "--plan", "{d}/plan.ttp"], "NaN or Inf in 1 of 8 samples"),
    "wrong_shape": (["--data", "{d}/shape.npz", "--plan", "{d}/plan.ttp"], "(N, 3, 8, 8)"),
    "missing_plan_file": (["--data", "{d}/good.npz", "--plan", "{d}/missing.ttp"], "--plan"),
    "bad_plan_file": (["--data", "{d}/good.npz", "--plan", "{d}/good.npz"], "BAD_MAGIC"),
    "bad_state_file": (["--data", "{d}/good.npz", "--plan", "{d}/plan.ttp", "--state", "{d}/bad.state.json"],
                       "--state"),
    "bad_capacity": (["--data", "{d}/good.npz", "--capacity", "0"], "--capacity"),
    "bad_board_name": (["--data", "{d}/good.npz", "--board", "my board"], "--board 'my board'"),
    "missing_tls_file": (["--data", "{d}/good.npz", "--ca-file", "{d}/missing.crt"], "--ca-file"),
    "bad_broker_url": (["--data", "{d}/good.npz", "--broker", "http://x"], "scheme must be mqtt://"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(files, case):
    # Prepare: an unreachable broker by default (each case must fail before or at connecting)
    extra, words = CASES[case]
    args = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--id", "d1", "--insecure-unsigned",
            "--connect-timeout", "1", *[a.format(d=files) for a in extra]]
    # Execute
    r = agent(*args)
    # Assert
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("device-agent: ") and words in lines[0], lines[0]


@pytest.mark.parametrize(("key", "words"), [("missing.pem", "cannot read"), ("bad.pem", "not a PEM public key")])
def test_bad_key_file_is_one_line_and_exit_2(files, key, words):
    # Prepare
    args = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--id", "d1", "--data", str(files / "good.npz"),
            "--pubkey", str(files / key)]
    # Execute
    r = agent(*args)
    # Assert
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


@pytest.mark.parametrize("with_plan", [True, False])
def test_unreachable_broker_is_one_line_and_exit_2(files, with_plan):
    # Prepare: nothing listens on the port (with a plan file the agent connects its device; without, it first
    # fetches the retained plan)
    port = free_port()
    args = ["--broker", f"mqtt://127.0.0.1:{port}", "--id", "d1", "--data", str(files / "good.npz"),
            "--insecure-unsigned", "--connect-timeout", "1", *(["--plan", str(files / "plan.ttp")] if with_plan else [])]
    # Execute
    r = agent(*args)
    # Assert
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [(f"device-agent: no connection to the broker mqtt://127.0.0.1:{port} "
                                             "within 1 s: is it running, and are the URL, credentials and TLS "
                                             "files right?")]

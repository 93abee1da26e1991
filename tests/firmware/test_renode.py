"""The STM32F746 image on Renode's STM32F746 (our platform description): it answers over USART1, counts cycles
with DWT, trains the golden plans and MbV2-w0.35 bit-exactly with the reference, and a small ``backend: renode``
fleet commits a round through the simulator.

Renode cannot be installed from a package (docs/boards.md): these tests skip, with that reason, wherever no
``renode`` is on PATH and ``$TINYFLEET_RENODE`` is unset, in CI too (the one documented exception to "a missing
tool fails in CI")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from fleet.sim.renode import RenodeProcess, connect_ready, find_renode, renode_missing_reason
from tests.conftest import MODELS, ROOT, require_cmd
from tests.firmware.conftest import PLAN_VECTORS, PlanVector

FIRMWARE = ROOT / "firmware"
VECTORS = sorted(PLAN_VECTORS.glob("*.tfv"))

pytestmark = pytest.mark.skipif(find_renode() is None, reason=renode_missing_reason())


@pytest.fixture(scope="module")
def f746_elf(tmp_path_factory) -> Path:
    require_cmd("arm-none-eabi-gcc", "make")
    build = tmp_path_factory.mktemp("fw")
    r = subprocess.run(["make", "-s", "-j2", "-C", str(FIRMWARE), f"BUILD={build}", "stm32f746"], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return build / "stm32f746" / "tinyfleet.elf"


def test_round_trip_and_dwt(f746_elf, tmp_path: Path) -> None:
    with RenodeProcess(f746_elf, workdir=tmp_path) as proc:
        c = connect_ready(proc, proc.endpoints[0], timeout=120)
        try:
            ping, info = c.ping(), c.board_info()
            test = c.selftest()
            info2 = c.board_info()
        finally:
            c.close()
    assert ping["sram_bytes"] == 320 * 1024 and ping["blob_capacity"] > 700 * 1024
    assert (info["cpuid"] >> 4) & 0xFFF == 0xC27 and info["tick_hz"] == 216_000_000  # Cortex-M7
    assert test["passed"] == test["cases"] > 50 and test["first_failed"] == -1
    # DWT CYCCNT runs (Renode's DWT model at 216 MHz of virtual time): the self-test took cycles
    assert test["ticks"] > 0 and info2["ticks"] > info["ticks"] + test["ticks"]


def test_plans_bit_exact_on_renode(f746_elf, tmp_path: Path) -> None:
    assert VECTORS, "no golden plan vectors: run tests/firmware/gen_plan_vectors.py"
    with RenodeProcess(f746_elf, workdir=tmp_path) as proc:
        c = connect_ready(proc, proc.endpoints[0], timeout=300)
        try:
            for path in VECTORS:
                v = PlanVector.read(path)
                c.load_plan(v.plan)
                for s, y in zip(v.samples, v.labels):
                    c.push_sample(s, y)
                tr = c.train(v.steps, v.lr_m, v.lr_e, round_id=1)
                st = c.state()
                assert tr["steps_done"] == v.steps and tr["correct"] == sum(v.correct), path.name
                assert st["state_hash"] == v.state_hash, f"{path.name} on Renode: state differs from the reference"
        finally:
            c.close()


def test_mbv2_bit_exact_on_renode(f746_elf, tmp_path: Path) -> None:
    """MbV2-w0.35 at 128x128 (the paper's ~100 KB rung), provisioned in the flash store: one step on the board
    equals the Python Trainer's."""
    if not (MODELS / "mbv2-w0.35.pkl").exists():
        pytest.skip(f"MIT int8 models not found at {MODELS}")
    from device_agent.board import elf_symbol
    from device_agent.engine.qmath import mant_exp
    from device_agent.engine.trainer import Trainer
    from fleet.compiler.compile import compile_full
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes

    comp = compile_full(new_classifier(import_mit(MODELS / "mbv2-w0.35.pkl"), 10),
                        load_schemes(PAPER_SCHEMES)["mbv2-w0.35"]["99kb"])
    plan = comp.plan
    tin = plan.tensors[plan.input_id]
    x = np.random.default_rng(0).integers(-100, 100, (1, *tin.shape)).astype(np.int8)
    y = np.array([3], np.int32)
    (tmp_path / "plan.ttp").write_bytes(comp.blob)
    preload = [(tmp_path / "plan.ttp", elf_symbol(f746_elf, "__store_start"))]
    with RenodeProcess(f746_elf, preload=preload, workdir=tmp_path) as proc:
        c = connect_ready(proc, proc.endpoints[0], timeout=1200)
        try:
            held = c.stats()["plan_bytes"]
            c.push_sample(x.tobytes(), 3)
            c.train(1, *mant_exp(0.02))
            st = c.state()
        finally:
            c.close()
    ref = Trainer(plan)
    ref.train_step(x, y, 0.02)
    assert held == len(comp.blob)
    assert bytes(st["state_hash"]).hex() == ref.state_hash() and st["train_ticks"] > 0


def test_small_renode_fleet_commits_a_round(f746_elf) -> None:
    """``backend: renode`` through the simulator: 3 boards in 2 Renode processes, one round committed."""
    require_cmd("mosquitto")
    import yaml

    from fleet.config import from_dict
    from fleet.sim.config import SimConfig
    from fleet.sim.runner import run_simulation

    path = ROOT / "configs" / "fleet-100-renode.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(devices=3, rounds=1, local_steps=5, deadline=300)
    data["model"]["pretrain_epochs"] = 1
    data["renode"] = dict(data["renode"], machines_per_process=2, elf=str(f746_elf))
    res = run_simulation(from_dict(SimConfig, data, str(path)), progress=False)
    assert res.round_status == ["committed"] and res.devices_per_round[0] >= 2, res.errors

"""`tinyfleet compile` end to end on a small torch model: one JSON object out, a plan blob, budget errors."""

from __future__ import annotations

import json

from fleet.cli import main

BOARD = "configs/boards/stm32f746.yaml"
MODEL = ["fleet.compiler.models:TinyCNN", "--input-shape", "1,28,28", "--board", BOARD]


def test_compile_prints_json_and_writes_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    out = tmp_path / "plan.ttp"
    assert main(["compile", *MODEL, "--scheme", "quarter", "-o", str(out), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    for key in ("peak_sram_bytes", "arena_bytes", "trainable_sram_bytes", "flash_bytes", "scheme", "num_ops",
                "plan_hash"):
        assert key in r
    assert r["peak_sram_bytes"] == r["arena_bytes"] + r["trainable_bytes"] + r["runtime_bytes"] <= 256000
    assert out.stat().st_size == r["flash_bytes"] and len(r["plan_hash"]) == 64
    pb = r["personalization_bytes"]  # each method's extra SRAM: a bias copy < a head copy <= the sparse set
    assert set(pb) >= {"bias", "head", "finetune", "ditto"}
    assert 0 < pb["bias"]["sram_bytes"] < pb["head"]["sram_bytes"] <= pb["ditto"]["sram_bytes"]

    from device_agent.wire.plan import plan_from_bytes, plan_hash

    blob = out.read_bytes()
    assert plan_hash(blob).hex() == r["plan_hash"]
    from device_agent.wire.envelope import Verifier

    plan = plan_from_bytes(blob, verify=Verifier.unsigned())
    assert plan.arena_bytes == r["arena_bytes"] and len(plan.ops) == r["num_ops"]
    assert any(t.name.endswith(".scratch") and t.offset >= 0 for t in plan.tensors)


def test_impossible_budget_names_the_minimum(capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    assert main(["compile", *MODEL, "--scheme", "last", "--patch", "always", "--json"]) == 0
    need = json.loads(capsys.readouterr().out)["peak_sram_bytes"]  # the smallest form: first stage tile by tile
    assert main(["compile", *MODEL, "--scheme", "auto", "--budget", str(need - 1), "--json"]) == 1
    cap = capsys.readouterr()
    assert f"smallest feasible budget is {need} bytes" in cap.err
    assert json.loads(cap.out)["required_bytes"] == need
    assert main(["compile", *MODEL, "--scheme", "full", "--budget", "1KB"]) == 1
    assert "smallest feasible budget for it is" in capsys.readouterr().err


def test_bad_model_spec_is_a_usage_error(capsys):
    assert main(["compile", "nonsense", "--board", BOARD]) == 2
    assert "MODEL must be" in capsys.readouterr().err


def test_compile_with_a_recipe_reports_and_carries_it(tmp_path, capsys, monkeypatch):
    # Prepare
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    out = tmp_path / "plan.ttp"
    opts = ["--accum-steps", "4", "--momentum", "0.9", "--residual-bits", "8", "--warmup", "2", "--total-steps",
            "20", "--lr-floor", "0.1"]
    # Execute
    assert main(["compile", *MODEL, "--scheme", "last", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["compile", *MODEL, "--scheme", "last", "-o", str(out), "--json", *opts]) == 0
    r = json.loads(capsys.readouterr().out)
    from device_agent.engine.recipe import plan_recipe
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.plan import plan_from_bytes
    from fleet.compiler.memory import trained_elements
    plan = plan_from_bytes(out.read_bytes(), verify=Verifier.unsigned())
    # Assert: the recipe is in the JSON and in the blob, its bytes counted in the peak
    nw, nb = trained_elements(plan)
    assert plain["recipe"] is None and plain["optimizer_bytes"] == 0
    assert r["recipe"] == {"accum_steps": 4, "momentum": 29491 / 32768, "beta_q15": 29491, "residual_bits": 8,
                           "warmup": 2, "total_steps": 20, "lr_min_q15": 3277,
                           "optimizer_bytes": r["optimizer_bytes"]}
    assert r["optimizer_bytes"] >= 5 * nw + 4 * nb and r["optimizer_bytes"] - (5 * nw + 4 * nb) < 4 * len(plan.ops)
    assert r["peak_sram_bytes"] == plain["peak_sram_bytes"] + r["optimizer_bytes"]
    pr = plan_recipe(plan)
    assert pr is not None and pr.recipe.accum_steps == 4 and pr.optimizer_bytes == r["optimizer_bytes"]


def test_bad_recipe_options_name_the_option(capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    for opts, want in ((["--accum-steps", "0"], "--accum-steps:"), (["--residual-bits", "4"], "--residual-bits:"),
                       (["--momentum", "1.0"], "--momentum:"), (["--lr-floor", "2"], "--lr-floor:"),
                       (["--warmup", "10", "--total-steps", "5"], "--warmup/--total-steps:")):
        assert main(["compile", *MODEL, "--scheme", "last", *opts]) == 2, opts
        assert want in capsys.readouterr().err, opts


def test_patch_auto_only_when_the_whole_stage_plan_does_not_fit(capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    sizes = {}
    for mode in ("never", "always"):
        assert main(["compile", *MODEL, "--scheme", "last", "--patch", mode, "--json"]) == 0
        sizes[mode] = json.loads(capsys.readouterr().out)["peak_sram_bytes"]
    assert sizes["always"] < sizes["never"]  # the model has a first stage worth patching
    for budget, want in ((sizes["never"], "never"), (sizes["never"] - 1, "always")):
        assert main(["compile", *MODEL, "--scheme", "last", "--budget", str(budget), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["peak_sram_bytes"] == sizes[want], budget

"""The kernels themselves on the hostile PATCH tables fuzz_plan found (firmware/fuzz/kernel_edges.c, UBSan + ASan):
pad_h = 2^30 must be refused by tf_patch_check without overflowing 2 * pad_h, and buf_off = 2^31 - 16 must give
tf_patch_get_buffer_size -1 or INT32_MAX, not a wrapped sum. The runtime refuses both plans before calling the
kernels (tf_runtime.c run_patch; regressions in fuzz/corpus.py hostile_plans), so this guards direct callers.
"""

from __future__ import annotations

import subprocess

from tests.conftest import ROOT, require_cmd

FW = ROOT / "firmware"


def test_patch_kernel_refuses_hostile_tables_without_ub(tmp_path):
    # Prepare
    require_cmd("clang")
    exe = tmp_path / "kernel_edges"
    src = [str(FW / "fuzz" / "kernel_edges.c")] + sorted(str(p) for p in (FW / "src" / "kernels").glob("*.c"))
    build = subprocess.run(["clang", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-g", f"-I{FW / 'include'}",
                            f"-I{FW / 'src' / 'kernels'}", "-fsanitize=undefined,address",
                            "-fno-sanitize-recover=all", "-o", str(exe), *src],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    # Execute
    r = subprocess.run([str(exe)], capture_output=True, text=True, check=False, timeout=60)
    # Assert
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]

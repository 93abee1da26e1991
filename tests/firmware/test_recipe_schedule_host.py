"""The recipe's integer schedule in C (firmware/src/runtime/tf_recipe.c) equals the reference (engine/recipe.py)
on a grid of edge cases: warm-up longer than 2^15 steps (factor 0), the cosine's last segment and its end, a floor
of 1.0, u near 2^32, per-sample division by B up to 65535, and a factor of 0 (nothing added)."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

from device_agent.engine.recipe import Recipe, lr_factor_q15, per_sample_lr, scaled_lr
from tests.conftest import ROOT, require_cmd

FIRMWARE = ROOT / "firmware"
DRIVER = r"""
#include <stdio.h>
#include "tf_recipe.h"
int main(void) {
    unsigned long u, w, t, b; long lr_min, m, e;
    while (scanf("%lu %lu %lu %ld %ld %ld %lu", &u, &w, &t, &lr_min, &m, &e, &b) == 7) {
        int32_t f = tf_lr_factor_q15((uint32_t)u, (uint32_t)w, (uint32_t)t, (int32_t)lr_min), pm, pe, sm = 0, se = 0;
        tf_per_sample_lr((int32_t)m, (int32_t)e, (uint32_t)b, &pm, &pe);
        int add = tf_scaled_lr(pm, pe, f, &sm, &se);
        printf("%d %d %d %d %d %d\n", (int)f, (int)pm, (int)pe, add, add ? (int)sm : 0, add ? (int)se : 0);
    }
    return 0;
}
"""


def _cases() -> list[tuple[int, int, int, int, int, int, int]]:
    scheds = [(0, 0), (1, 4), (3, 12), (40000, 0), (40000, 40100), (0, 3), (5, 2**32 - 1), (2**32 - 2, 2**32 - 1)]
    out = []
    for (w, t), lr_min, (m, e), b in itertools.product(scheds, (0, 1000, 32768), ((16384, -14), (20972, -21),
                                                                                  (32768, -10)), (1, 3, 65535)):
        last = max(w, t) + 3
        for u in sorted(v for v in {0, 1, w - 1 if w else 0, w, w + 1, (w + t) // 2, t - 1 if t else 0, t, last,
                                    2**32 - 1} if 0 <= v < 2**32):
            out.append((u, w, t, lr_min, m, e, b))
    for w, t in ((0, 997), (7, 4103)):  # every interpolation position of two long cosines
        out += [(u, w, t, 1000, 16384, -14, 1) for u in range(t + 2)]
    return out


def test_schedule_and_rates_match_the_reference(tmp_path: Path) -> None:
    require_cmd("gcc")
    # Prepare: a driver over tf_recipe.c, host gcc with the firmware's warnings
    src = tmp_path / "drv.c"
    src.write_text(DRIVER)
    exe = tmp_path / "drv"
    r = subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", f"-I{FIRMWARE / 'include'}",
                        str(src), str(FIRMWARE / "src" / "runtime" / "tf_recipe.c"), "-o", str(exe)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    cases = _cases()
    # Execute
    got = subprocess.run([str(exe)], input="\n".join(" ".join(map(str, c)) for c in cases), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    # Assert
    zeros = 0
    for case, line in zip(cases, got, strict=False):
        u, w, t, lr_min, m, e, b = case
        f = lr_factor_q15(u, Recipe(warmup=w, total=t, lr_min_q15=lr_min))
        pm, pe = per_sample_lr(m, e, b)
        s = scaled_lr(pm, pe, f)
        want = (f, pm, pe, int(s is not None), *(s or (0, 0)))
        assert tuple(int(v) for v in line.split()) == want, case
        zeros += f == 0
    assert len(got) >= len(cases) and zeros > 0  # the grid reaches a factor of 0

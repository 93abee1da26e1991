"""PATCH tables whose tile bounds or buffer ends pass int32 are refused by the reference, as by the firmware's
prepare step (tf_runtime.c run_patch; fuzz_plan found these overflowing in tf_patch_check /
tf_patch_get_buffer_size, regressions in fuzz/corpus.py hostile_plans)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.engine import patch as P
from tests.pure.test_patch import make_patch


def test_buffer_offset_passing_int32_is_refused():
    # Prepare: a 2-layer stage whose first buffer sits 64 bytes below 2^31
    op, tensors, consts = make_patch((1, 8, 8), [("conv", 2, 3, 1, 1, 1, 0), ("conv", 1, 3, 1, 1, 1, 0)], (2, 2))
    x = np.zeros((1, 1, 8, 8), np.int8)
    op.attrs["buf_off"] = np.asarray([P.INT32_MAX - 63, -1], np.int32)
    # Execute / Assert: the whole-tensor definition does not use buffers; the tiled (firmware) execution refuses
    assert P.patch_forward(op, tensors, x, consts).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="passes 2"):
        P.patch_forward(op, tensors, x, consts, tiled=True)


def test_tile_bounds_passing_int32_are_refused_and_legal_tables_pass():
    # Prepare: a 1x1 conv over a 1 x 50000 x 1 input (tiles x H = 50000^2 > 2^31)
    op, tensors, _ = make_patch((1, 50000, 1), [("conv", 1, 1, 1, 0, 1, 0)], (1, 1))
    layers = P.layers_of(op, tensors)
    # Execute / Assert
    P.check_int32(layers, 40, 1)
    with pytest.raises(ValueError, match="int32 tile bounds"):
        P.check_int32(layers, 50000, 1)


def test_pad_over_the_kernel_is_refused():
    # Prepare: a pad of 2^30 on a 3x3 conv layer (fuzz_plan: 2 * pad overflowed in tf_patch_check)
    op, tensors, _ = make_patch((1, 8, 8), [("conv", 2, 3, 1, 1, 1, 0), ("conv", 1, 3, 1, 1, 1, 0)], (2, 2))
    op.attrs["pad_h"] = np.asarray([2**30, 1], np.int32)
    # Execute / Assert
    with pytest.raises(ValueError, match="pad"):
        P.layers_of(op, tensors)

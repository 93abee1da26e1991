"""Exponent and shift limits the reference shares with the firmware (fuzz_plan / fuzz_cmds findings: int32
exponent sums and a 2^249 left shift in the update kernels, now refused on both sides; tf_runtime.c, tf_recipe.h)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.engine.backward import conv_bwd_input
from device_agent.engine.conv import ConvGeom
from device_agent.engine.qmath import EXP_LIMIT, check_exps, mant_exp
from device_agent.engine.recipe import ACC_BITS_B, ACC_MAX_BITS, fixed_delta


def test_exponents_within_the_limit_pass_and_beyond_it_are_refused():
    # Prepare: the widest exponents a float learning rate or scale can give (mant_exp of the extremes)
    tiny, huge = mant_exp(5e-324)[1], mant_exp(1.7e308)[1]
    # Execute / Assert
    check_exps("lr", [tiny, huge, -EXP_LIMIT, EXP_LIMIT])
    for bad in (EXP_LIMIT + 1, -EXP_LIMIT - 1, 2**31 - 1):
        with pytest.raises(ValueError, match="outside"):
            check_exps("qas exponent", [0, bad])


def test_conv_bwd_input_refuses_a_wscale_p_beyond_the_limit():
    # Prepare: a 1x1 conv, 2 -> 3 channels, on a 4x4 input
    rng = np.random.default_rng(0)
    g = rng.integers(-128, 128, (1, 3, 4, 4)).astype(np.int8)
    w = rng.integers(-127, 128, (3, 2, 1, 1)).astype(np.int8)
    q = np.full(3, 20000, np.int32)
    # Execute
    gx, _ = conv_bwd_input(g, np.array([-9]), w, ConvGeom(1, 1, 0, 0), (4, 4), q, -7)
    # Assert
    assert gx.shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="wscale_p"):
        conv_bwd_input(g, np.array([-9]), w, ConvGeom(1, 1, 0, 0), (4, 4), q, EXP_LIMIT + 1)


def test_recipe_delta_left_shift_limit():
    # Prepare: a bias sum of up to 2^22 times a 15-bit multiplier, shifted left by exponent + 12 bits
    acc, mult = np.array([2**22 - 1]), np.array([2**15 - 1])
    edge = 62 - ACC_MAX_BITS[ACC_BITS_B] - 15 - ACC_BITS_B  # the widest exponent whose shift stays below 2^62
    # Execute
    at_limit = fixed_delta(acc, mult, np.array([edge]), ACC_BITS_B)
    # Assert: saturated, exact int32 (no int64 wrap), and one more bit refused (C: TF_ERR_OVERFLOW)
    assert at_limit.tolist() == [2**31 - 1]
    with pytest.raises(ValueError, match="could pass"):
        fixed_delta(acc, mult, np.array([edge + 1]), ACC_BITS_B)
    with pytest.raises(ValueError, match="could pass"):
        fixed_delta(np.array([0]), mult, np.array([249 - ACC_BITS_B]), ACC_BITS_B)  # the fuzzed 2^249 shift

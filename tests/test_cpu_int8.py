"""The fused C++ int8 layers (kernels/cpu_int8.cc) against their numpy reference (kernels/cpu_int8.py: the same
quantization in float32, exact integer sums, the rest in float64), which is itself checked against the
hand-written reference of tests/test_int8.py. Both product routes run: AMX tiles (where the CPU has them; else the
call falls back to the plain loops) and the plain loops (`portable=True`); their outputs must be identical."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import quant
from sce_jax.kernels import cpu_int8

from test_int8 import _ref_int8_linear

pytestmark = pytest.mark.skipif(not cpu_int8.available()[0], reason=f"no CPU kernel: {cpu_int8.available()[1]}")


def _weights(rng, inputs, outputs, smooth=False):
    w = (rng.standard_normal((inputs, outputs)) * 0.1).astype(np.float32)
    w[:, 3] = 0  # an all-zero output channel
    q, r, scale = quant.quantize_kernel(w)
    linear = {"kernel": q, "residual": r, "scale": scale,
              "bias": (rng.standard_normal(outputs) * 0.1).astype(np.float32)}
    if smooth:
        linear["smooth"] = rng.uniform(0.5, 3, inputs).astype(np.float32)
    return linear


def _operands(linear):
    inv = (1 / linear.get("smooth", np.ones(linear["kernel"].shape[0], np.float32))).astype(np.float32)
    return (jnp.asarray(cpu_int8.pack_kernel(linear["kernel"], linear["residual"])), jnp.asarray(linear["scale"]),
            jnp.asarray(linear["bias"]), jnp.asarray(inv))


def _inputs(rng, tokens, width):
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    x[:, 5] *= 20  # an outlier channel
    x[7] = 0  # an all-zero token
    return x


def test_packing_puts_each_weight_where_the_tiles_read_it():
    rng = np.random.default_rng(0)
    q, r = (rng.integers(-127, 128, (70, 20)).astype(np.int8) for _ in range(2))  # pads to 128 inputs, 32 outputs
    tiles = cpu_int8.pack_tiles(q)
    assert tiles.shape == (2, 2, 1024) and tiles.dtype == np.int8
    for n, k, i, c, j in [(0, 0, 0, 0, 0), (0, 0, 3, 7, 2), (1, 0, 15, 3, 3), (0, 1, 1, 15, 1), (1, 1, 0, 2, 1)]:
        row, column = 64 * k + 4 * i + j, 16 * n + c
        want = q[row, column] if row < 70 and column < 20 else 0
        assert tiles[n, k, 64 * i + 4 * c + j] == want
    assert not tiles[1, :, :].reshape(2, 16, 16, 4)[:, :, 4:].any()  # outputs 20..31: padding
    assert not tiles[:, 1].reshape(2, 16, 16, 4)[:, 2:].any()  # inputs 72..127: padding
    # Both passes: q's tiles of each block of 16 outputs, then r's.
    packed = cpu_int8.pack_kernel(q, r)
    assert packed.shape == (4, 2, 1024) == quant.packed_shape(70, 20) and packed.dtype == np.int8
    assert packed[1, 0, 64 * 3 + 4 * 7 + 2] == r[14, 7] and packed[2, 1, 64 * 1 + 4 * 2 + 1] == q[69, 18]
    np.testing.assert_array_equal(packed[0::2], tiles)
    np.testing.assert_array_equal(packed[1::2], cpu_int8.pack_tiles(r))


def test_the_numpy_reference_is_the_documented_scheme():
    """reference_linear = tests/test_int8.py's hand-written reference (quantization, two-pass rows)."""
    rng = np.random.default_rng(1)
    linear = _weights(rng, 48, 24, smooth=True)
    x = _inputs(rng, 37, 48)
    inv = (1 / linear["smooth"]).astype(np.float32)
    for rows in (0, 9):
        got = cpu_int8.reference_linear(x, linear["kernel"], linear["residual"], linear["scale"], linear["bias"], inv,
                                        rows)
        _, want = _ref_int8_linear(x, linear["kernel"], linear["residual"], linear["scale"], linear["bias"],
                                   linear["smooth"], rows)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("float_rows", [0, 5, 40, 200])
@pytest.mark.parametrize("columns", [None, (16, 37), (5, 40)])
def test_int8_linear_matches_the_reference(float_rows, columns):
    rng = np.random.default_rng(2)
    linear = _weights(rng, 96, 40, smooth=True)  # 96 inputs: two 64-deep blocks, padded; 40 outputs: 3 blocks
    x = _inputs(rng, 150, 96)  # 5 blocks of 32 tokens, the last partial
    inv = (1 / linear["smooth"]).astype(np.float32)
    want = cpu_int8.reference_linear(x, linear["kernel"], linear["residual"], linear["scale"], linear["bias"], inv,
                                     float_rows)
    start, stop = columns or (0, 40)
    outputs = [np.asarray(cpu_int8.int8_linear(jnp.asarray(x), *_operands(linear), float_rows=float_rows,
                                               columns=columns, portable=portable)) for portable in (False, True)]
    np.testing.assert_array_equal(outputs[0], outputs[1])  # AMX tiles and plain loops: the same sums
    # One-pass rows: float32 rounding only. Two-pass rows: the residual's rounding may also differ by a step
    # (|step| ~ 1/(127 · 254) of the row's range).
    scale = np.abs(want).max()
    np.testing.assert_allclose(outputs[0][float_rows:], want[float_rows:, start:stop], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(outputs[0][:float_rows], want[:float_rows, start:stop], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(outputs[0][7], linear["bias"][start:stop], rtol=0, atol=1e-6)  # a zero token: bias


def test_int8_linear_sums_the_largest_products_exactly():
    """1536 products of 127 · 127 per output and pass: 24.8M, exact in int32 (and in float32, being a multiple of
    512); the second pass adds 1/254 of it."""
    q = np.full((1536, 16), 127, np.int8)
    r = np.full((1536, 16), -127, np.int8)
    scale, bias = np.full(16, 0.01, np.float32), np.zeros(16, np.float32)
    x = np.full((3, 1536), 2.0, np.float32)  # quantizes to 127 everywhere, scale 2/127
    operands = (jnp.asarray(cpu_int8.pack_kernel(q, r)), jnp.asarray(scale), jnp.asarray(bias), jnp.ones(1536))
    for portable in (False, True):
        y = np.asarray(cpu_int8.int8_linear(jnp.asarray(x), *operands, portable=portable))
        np.testing.assert_allclose(y, 1536 * 127 * 127 * (1 - 1 / 254) * np.float32(2 / 127) * 0.01, rtol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("float_rows", [0, 33, 150])
def test_int8_layer_tail_matches_the_reference(activation, float_rows):
    rng = np.random.default_rng(3)
    hidden, inter = 64, 160  # 160: an intermediate padded to 192 inputs for the second product
    # Every input smoothed here (the model smooths only the intermediate's and QKV's; ones elsewhere).
    layer = {"attention_output": _weights(rng, hidden, hidden, True), "intermediate": _weights(rng, hidden, inter, True),
             "output": _weights(rng, inter, hidden, True)}
    for name in ("attention_norm", "output_norm"):
        layer[name] = {"scale": rng.uniform(0.5, 1.5, hidden).astype(np.float32),
                       "bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32)}
    weights = {name: _operands(layer[name]) for name in ("attention_output", "intermediate", "output")}
    weights.update({name: (jnp.asarray(layer[name]["scale"]), jnp.asarray(layer[name]["bias"]))
                    for name in ("attention_norm", "output_norm")})
    x, attended = _inputs(rng, 150, hidden), _inputs(rng, 150, hidden)
    want = cpu_int8.reference_layer_tail(x, attended, layer, float_rows=float_rows, eps=1e-12, activation=activation)
    outputs = [np.asarray(jax.jit(lambda x, a: cpu_int8.int8_layer_tail(
        x, a, weights, float_rows=float_rows, eps=1e-12, activation=activation, portable=portable))(x, attended))
        for portable in (False, True)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    # Layer-normed outputs (O(1)). The kernel's erf is within 1.5e-7 of the exact one, and float32 rounding in
    # another order may move a value across a rounding boundary: one int8 step of one input of a token.
    error = np.abs(outputs[0] - want)
    assert np.median(error) < 1e-6 and (error > 1e-4).mean() < 0.01 and error.max() < 0.02, (np.median(error), error.max())
    assert np.abs(want).max() > 1  # (the comparison is on O(1) values)


def test_inconsistent_weights_are_an_error_not_a_crash():
    rng = np.random.default_rng(4)
    linear = _weights(rng, 96, 40)
    packed, scale, bias, inv = _operands(linear)
    x = jnp.asarray(_inputs(rng, 10, 96))
    with pytest.raises(Exception, match="inconsistent shapes of the linear"):
        cpu_int8.int8_linear(x, packed[:, :1], scale, bias, inv).block_until_ready()
    with pytest.raises(Exception, match="output columns do not match"):
        cpu_int8.int8_linear(x, packed, scale, bias, inv, columns=(30, 50)).block_until_ready()

"""The fused C++ int8 layers (kernels/cpu_int8.cc) against their numpy reference (kernels/cpu_int8.py: the same
quantization in float32, exact integer sums, the rest in float64), which is itself checked against the
hand-written reference of tests/test_int8.py. Every build of the kernels that this CPU runs is checked against the
reference (`cpu_variant`: AMX tiles with two int8 weight passes; AVX-512 VNNI, AVX2 and the baseline with one int16
weight); a build this CPU cannot run is skipped, saying so."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import quant
from sce_jax.kernels import cpu_int8, cpu_library

from test_int8 import _ref_int8_linear


def _weights(rng, inputs, outputs, smooth=False):
    w = (rng.standard_normal((inputs, outputs)) * 0.1).astype(np.float32)
    w[:, 3] = 0  # an all-zero output channel
    q, r, scale = quant.quantize_kernel(w)
    linear = {"kernel": q, "residual": r, "scale": scale,
              "bias": (rng.standard_normal(outputs) * 0.1).astype(np.float32)}
    if smooth:
        linear["smooth"] = rng.uniform(0.5, 3, inputs).astype(np.float32)
    return linear


def _operands(linear, variant):
    inv = (1 / linear.get("smooth", np.ones(linear["kernel"].shape[0], np.float32))).astype(np.float32)
    packed = cpu_int8.pack_kernel(linear["kernel"], linear["residual"], variant)
    return jnp.asarray(packed), jnp.asarray(linear["scale"]), jnp.asarray(linear["bias"]), jnp.asarray(inv)


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
    packed = cpu_int8.pack_kernel(q, r, "amx")
    assert packed.shape == (4, 2, 1024) == quant.packed_shape(70, 20, "amx") and packed.dtype == np.int8
    assert packed[1, 0, 64 * 3 + 4 * 7 + 2] == r[14, 7] and packed[2, 1, 64 * 1 + 4 * 2 + 1] == q[69, 18]
    np.testing.assert_array_equal(packed[0::2], tiles)
    np.testing.assert_array_equal(packed[1::2], cpu_int8.pack_tiles(r))


@pytest.mark.parametrize("variant", [v for v in cpu_library.VARIANTS if cpu_library.INT8_LAYOUTS[v] == "pairs"])
def test_pair_packing_puts_each_weight_where_the_products_read_it(variant):
    """One int16 weight 254·q + r per input and output (|.| <= 32385, q and r recoverable from it), in pairs of
    inputs per block of 16 outputs, little-endian."""
    rng = np.random.default_rng(0)
    q, r = (rng.integers(-127, 128, (71, 20)).astype(np.int8) for _ in range(2))  # pads to 72 inputs, 32 outputs
    q[0, 0], r[0, 0], q[1, 0], r[1, 0] = 127, 127, -127, -127
    packed = cpu_int8.pack_kernel(q, r, variant)
    assert packed.shape == (2, 36, 64) == quant.packed_shape(71, 20, variant) and packed.dtype == np.int8
    w = packed.view("<i2").reshape(2, 36, 16, 2)  # (block n, pair k, output c, input 2k + t)
    assert w[0, 0, 0, 0] == 32385 and w[0, 0, 0, 1] == -32385
    for n, k, c, t in [(0, 0, 0, 0), (0, 3, 7, 1), (1, 10, 3, 0), (1, 35, 3, 0), (0, 17, 15, 1)]:
        row, column = 2 * k + t, 16 * n + c
        want = int(q[row, column]) * 254 + int(r[row, column]) if row < 71 and column < 20 else 0
        assert w[n, k, c, t] == want, (n, k, c, t)
    assert not w[1, :, 4:].any() and not w[:, 35, :, 1].any()  # outputs 20..31, input 71: padding


@pytest.mark.parametrize("variant", [v for v in cpu_library.VARIANTS if cpu_library.INT8_LAYOUTS[v] == "quads"])
def test_quad_packing_puts_each_weight_where_the_products_read_it(variant):
    """q's and r's int8 weights in quads of inputs per block of 16 outputs (64 bytes each), then 128 times each
    output's column sums of q and of r as little-endian int32 (what the unsigned activation offset adds)."""
    rng = np.random.default_rng(0)
    q, r = (rng.integers(-127, 128, (70, 20)).astype(np.int8) for _ in range(2))  # pads to 72 inputs, 32 outputs
    packed = cpu_int8.pack_kernel(q, r, variant)
    assert packed.shape == (2, 19, 128) == quant.packed_shape(70, 20, variant) and packed.dtype == np.int8
    for n, k, c, t in [(0, 0, 0, 0), (0, 3, 7, 1), (1, 10, 3, 2), (1, 17, 3, 1), (0, 12, 15, 3), (1, 17, 3, 3)]:
        row, column = 4 * k + t, 16 * n + c
        inside = row < 70 and column < 20
        assert packed[n, k, 4 * c + t] == (q[row, column] if inside else 0), (n, k, c, t)
        assert packed[n, k, 64 + 4 * c + t] == (r[row, column] if inside else 0), (n, k, c, t)
    offsets = packed[:, 18].copy().view("<i4").reshape(2, 2, 16)  # (block, q or r, output)
    for n, c in [(0, 0), (0, 15), (1, 3), (1, 4)]:
        column = 16 * n + c
        want_q = 128 * int(q[:, column].astype(np.int64).sum()) if column < 20 else 0
        want_r = 128 * int(r[:, column].astype(np.int64).sum()) if column < 20 else 0
        assert (offsets[n, 0, c], offsets[n, 1, c]) == (want_q, want_r), (n, c)


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
def test_int8_linear_matches_the_reference(float_rows, columns, cpu_variant):
    rng = np.random.default_rng(2)
    linear = _weights(rng, 96, 40, smooth=True)  # 96 inputs: two 64-deep blocks, padded; 40 outputs: 3 blocks
    x = _inputs(rng, 150, 96)  # 5 blocks of 32 tokens, the last partial
    inv = (1 / linear["smooth"]).astype(np.float32)
    want = cpu_int8.reference_linear(x, linear["kernel"], linear["residual"], linear["scale"], linear["bias"], inv,
                                     float_rows)
    start, stop = columns or (0, 40)
    got = np.asarray(cpu_int8.int8_linear(jnp.asarray(x), *_operands(linear, cpu_variant), float_rows=float_rows,
                                          columns=columns, variant=cpu_variant))
    # One-pass rows: float32 rounding only. Two-pass rows: the residual's rounding may also differ by a step
    # (|step| ~ 1/(127 · 254) of the row's range).
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[float_rows:], want[float_rows:, start:stop], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(got[:float_rows], want[:float_rows, start:stop], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(got[7], linear["bias"][start:stop], rtol=0, atol=1e-6)  # a zero token: bias


@pytest.mark.parametrize("x_sign", [1, -1])
@pytest.mark.parametrize("sign", [1, -1])
def test_int8_linear_sums_the_largest_products_without_overflow(sign, x_sign, cpu_variant):
    """1536 inputs at the largest products: 127 · 127 per input and pass (tiles: 24.8M per int32 sum), 255 · 127
    with the activations offset to unsigned bytes (quads: 49.7M before the offset is taken out), or 127 · 32385 with
    one int16 weight (6.3e9 over all inputs: past int32, so summed in int32 over 512 inputs at a time). Also the
    second output block with the other sign of r, and activations at both ends of the range."""
    q = np.full((1536, 32), 127, np.int8)
    r = np.full((1536, 32), sign * 127, np.int8)
    r[:, 16:] *= -1
    scale, bias = np.full(32, 0.01, np.float32), np.zeros(32, np.float32)
    x = np.full((3, 1536), 2.0 * x_sign, np.float32)  # quantizes to ±127 everywhere, scale 2/127
    operands = (jnp.asarray(cpu_int8.pack_kernel(q, r, cpu_variant)), jnp.asarray(scale), jnp.asarray(bias),
                jnp.ones(1536))
    y = np.asarray(cpu_int8.int8_linear(jnp.asarray(x), *operands, variant=cpu_variant))
    per_weight = 127 + np.array([sign] * 16 + [-sign] * 16) * 127 / 254
    np.testing.assert_allclose(y, np.broadcast_to(x_sign * 1536 * 127 * per_weight * np.float32(2 / 127) * 0.01, y.shape),
                               rtol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("float_rows", [0, 33, 150])
def test_int8_layer_tail_matches_the_reference(activation, float_rows, cpu_variant):
    rng = np.random.default_rng(3)
    hidden, inter = 64, 160  # 160: an intermediate padded to 192 inputs for the second product
    # Every input smoothed here (the model smooths only the intermediate's and QKV's; ones elsewhere).
    layer = {"attention_output": _weights(rng, hidden, hidden, True), "intermediate": _weights(rng, hidden, inter, True),
             "output": _weights(rng, inter, hidden, True)}
    for name in ("attention_norm", "output_norm"):
        layer[name] = {"scale": rng.uniform(0.5, 1.5, hidden).astype(np.float32),
                       "bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32)}
    weights = {name: _operands(layer[name], cpu_variant) for name in ("attention_output", "intermediate", "output")}
    weights.update({name: (jnp.asarray(layer[name]["scale"]), jnp.asarray(layer[name]["bias"]))
                    for name in ("attention_norm", "output_norm")})
    x, attended = _inputs(rng, 150, hidden), _inputs(rng, 150, hidden)
    want = cpu_int8.reference_layer_tail(x, attended, layer, float_rows=float_rows, eps=1e-12, activation=activation)
    got = np.asarray(jax.jit(lambda x, a: cpu_int8.int8_layer_tail(
        x, a, weights, float_rows=float_rows, eps=1e-12, activation=activation, variant=cpu_variant))(x, attended))
    # Layer-normed outputs (O(1)). The kernel's erf is within 1.5e-7 of the exact one, and float32 rounding in
    # another order may move a value across a rounding boundary: one int8 step of one input of a token.
    error = np.abs(got - want)
    assert np.median(error) < 1e-6 and (error > 1e-4).mean() < 0.01 and error.max() < 0.02, (np.median(error), error.max())
    assert np.abs(want).max() > 1  # (the comparison is on O(1) values)


def test_inconsistent_weights_are_an_error_not_a_crash(cpu_variant):
    rng = np.random.default_rng(4)
    linear = _weights(rng, 96, 40)
    packed, scale, bias, inv = _operands(linear, cpu_variant)
    x = jnp.asarray(_inputs(rng, 10, 96))
    with pytest.raises(Exception, match="inconsistent shapes of the linear"):
        cpu_int8.int8_linear(x, packed[:, :1], scale, bias, inv, variant=cpu_variant).block_until_ready()
    with pytest.raises(Exception, match="output columns do not match"):
        cpu_int8.int8_linear(x, packed, scale, bias, inv, columns=(30, 50), variant=cpu_variant).block_until_ready()
    other = "avx2" if cpu_library.INT8_LAYOUTS[cpu_variant] == "tiles" else "amx"
    if other in cpu_library.VARIANTS:  # weights packed for another layout
        wrong = jnp.asarray(cpu_int8.pack_kernel(linear["kernel"], linear["residual"], other))
        with pytest.raises(Exception, match="inconsistent shapes of the linear"):
            cpu_int8.int8_linear(x, wrong, scale, bias, inv, variant=cpu_variant).block_until_ready()

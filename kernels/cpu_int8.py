"""The int8 model's linear layers on CPU as fused C++ kernels (XLA FFI custom calls; source cpu_int8.cc, built at
install with the attention kernel into one library per instruction set: kernels/cpu_library.py).

Two ops, each over the model's flat token matrix in blocks of 32 tokens that stay in cache from the input to the
output (XLA's version of the same writes and re-reads every intermediate: int32 sums, dequantized values, the
activation, the layer-norm statistics):

- `int8_linear(x, packed, scale, bias, inv_smooth, float_rows, columns)`: y = dq(q(x · inv_smooth) W) + b, the
  QKV projection (or a range of its output channels).
- `int8_layer_tail(x, attended, weights, float_rows, eps, activation)`: everything a layer does after attention:
  x1 = LN(x + dq(q(attended) Wo) + bo); out = LN(x1 + dq(q(act(dq(q(x1 · inv_smooth) W1) + b1)) W2) + b2).

q is symmetric int8 per token (scale = max|row| / 127, round half to even), W int8 in two passes per output channel
(W ≈ scale · (Q + R / 254), `sce_jax.quant.quantize_kernel`), the products exact integer sums x·Q + x·R / 254,
combined in float32. The first `float_rows` rows (the [CLS] and query tokens) are quantized in two passes (the
row, then the residual x - q·scale with a scale of its own; both products summed): about 15 bits for the few rows
every score reads directly. `reference_linear` and `reference_layer_tail` are the numpy statement of the same
arithmetic, every variant's oracle.

How a variant multiplies (`cpu_library.INT8_LAYOUTS`), with the weights packed for it once, at load
(`pack_kernel`):
- `amx`: AMX tiles, int8 x int8, Q and R as two int8 passes (layout "tiles", `pack_tiles`).
- `avx512_vnni`: Q and R as two int8 passes with vpdpbusd (unsigned x signed bytes, four products per int32 lane):
  the activations are stored as q + 128 (unsigned), and 128 times each output's column sums of Q and R, packed
  after the weights, take the offset back out of the int32 sums (layout "quads", `pack_quads`).
- `avx2`, `generic`: Q and R as one int16 weight 254·Q + R (|.| <= 32385, the same ~15 bits), times the int8
  activations widened to int16: one product instead of two (layout "pairs", `pack_pairs`): vpmaddwd, or plain
  loops; the int32 sums run over at most 512 inputs before they are added up in float32.

On AVX-512 VNNI both schemes fit; two int8 passes with vpdpbusd ran the feed-forward shape faster than one int16
pass with vpdpwssd (`benchmarks/int8_matmul.py`, docs/int8.md).
"""

from __future__ import annotations

from math import erf

import jax
import jax.numpy as jnp
import numpy as np

from sce_jax.kernels import cpu_library

# The C++ kernel's activation codes, by the config's `hidden_act`.
ACTIVATIONS = {"gelu": 0, "gelu_new": 1, "relu": 2}
_DEPTH, _WIDTH = 64, 16  # tiles: inputs per tile row, output channels per tile
RESIDUAL_STEPS = 254  # R's unit in Q's steps (sce_jax.quant.RESIDUAL_STEPS)


def available(variant: str | None = None) -> tuple[bool, str]:
    """(True, "") when the kernels of `variant` (default: the selected one) run here (`cpu_library.available`)."""
    return cpu_library.available(variant)


def packed_shape(in_features: int, out_features: int, variant: str) -> tuple[int, int, int]:
    """The shape of `pack_kernel`'s int8 output for an [in, out] kernel in `variant`'s layout."""
    blocks, layout = -(-out_features // _WIDTH), cpu_library.INT8_LAYOUTS[variant]
    if layout == "tiles":
        return 2 * blocks, -(-in_features // _DEPTH), 1024
    if layout == "quads":
        return blocks, -(-in_features // 4) + 1, 8 * _WIDTH
    return blocks, -(-in_features // 2), 4 * _WIDTH


def pack_tiles(q_IxO) -> np.ndarray:
    """int8 weights [I, O] in the AMX tiles' layout: [ceil(O/16), ceil(I/64), 1024] int8, zero padded; tile (n, k)
    holds W[64k + 4i + j, 16n + c] at byte 64i + 4c + j."""
    q_IxO = np.asarray(q_IxO, np.int8)
    inputs, outputs = q_IxO.shape
    depth, width = -(-inputs // _DEPTH) * _DEPTH, -(-outputs // _WIDTH) * _WIDTH
    padded = np.zeros((depth, width), np.int8)
    padded[:inputs, :outputs] = q_IxO
    tiles = padded.reshape(depth // _DEPTH, 16, 4, width // _WIDTH, _WIDTH)  # (k, i, j, n, c)
    return np.ascontiguousarray(tiles.transpose(3, 0, 1, 4, 2)).reshape(width // _WIDTH, depth // _DEPTH, 1024)


def pack_pairs(q_IxO, r_IxO) -> np.ndarray:
    """A two-pass int8 kernel as one int16 weight w = 254·q + r, in pairs of inputs: [ceil(O/16), ceil(I/2), 64]
    int8 (the bytes of [ceil(O/16), ceil(I/2), 16, 2] int16, little-endian, zero padded): block n, pair k holds
    w[2k + t, 16n + c] at int16 2c + t."""
    w_IxO = np.asarray(q_IxO, np.int16) * np.int16(RESIDUAL_STEPS) + np.asarray(r_IxO, np.int16)
    inputs, outputs = w_IxO.shape
    depth, width = -(-inputs // 2) * 2, -(-outputs // _WIDTH) * _WIDTH
    padded = np.zeros((depth, width), "<i2")
    padded[:inputs, :outputs] = w_IxO
    pairs = padded.reshape(depth // 2, 2, width // _WIDTH, _WIDTH).transpose(2, 0, 3, 1)  # (n, k, c, t)
    return np.ascontiguousarray(pairs).view(np.int8).reshape(width // _WIDTH, depth // 2, 4 * _WIDTH)


def pack_quads(q_IxO, r_IxO) -> np.ndarray:
    """A two-pass int8 kernel in quads of inputs for vpdpbusd: [ceil(O/16), ceil(I/4) + 1, 128] int8, zero padded.
    Block n, quad k holds q[4k + t, 16n + c] at byte 4c + t and r's at 64 + 4c + t; the last row holds 128 · the
    column sums of q (bytes 0-63) and of r (64-127) of the block's 16 outputs as little-endian int32: the kernel
    stores activations as x + 128 (unsigned), and sum((x + 128) · w) - 128 · sum(w) = sum(x · w)."""
    q, r = np.asarray(q_IxO, np.int8), np.asarray(r_IxO, np.int8)
    inputs, outputs = q.shape
    depth, width = -(-inputs // 4) * 4, -(-outputs // _WIDTH) * _WIDTH
    blocks = []
    for w in (q, r):
        padded = np.zeros((depth, width), np.int8)
        padded[:inputs, :outputs] = w
        quads = padded.reshape(depth // 4, 4, width // _WIDTH, _WIDTH).transpose(2, 0, 3, 1)  # (n, k, c, t)
        offsets = (128 * padded.astype(np.int32).sum(axis=0)).astype("<i4").reshape(width // _WIDTH, 1, _WIDTH)
        blocks.append((quads.reshape(width // _WIDTH, depth // 4, 4 * _WIDTH), offsets.view(np.int8)))
    (q_quads, q_offsets), (r_quads, r_offsets) = blocks
    body = np.concatenate([q_quads, r_quads], axis=2)
    tail = np.concatenate([q_offsets, r_offsets], axis=2)
    return np.ascontiguousarray(np.concatenate([body, tail], axis=1))


def pack_kernel(q_IxO, r_IxO, variant: str) -> np.ndarray:
    """A two-pass int8 kernel (W ≈ scale · (q + r / 254), `sce_jax.quant.quantize_kernel`) in `variant`'s layout
    (`packed_shape`). "tiles": [2 · ceil(O/16), ceil(I/64), 1024], q's tiles of each block of 16 outputs
    (`pack_tiles`) followed by r's; "quads": `pack_quads`; "pairs": `pack_pairs`."""
    layout = cpu_library.INT8_LAYOUTS[variant]
    if layout == "pairs":
        return pack_pairs(q_IxO, r_IxO)
    if layout == "quads":
        return pack_quads(q_IxO, r_IxO)
    q, r = pack_tiles(q_IxO), pack_tiles(r_IxO)
    return np.stack([q, r], axis=1).reshape(2 * q.shape[0], *q.shape[1:])


def int8_linear(x_TxI, packed, scale_O, bias_O, inv_smooth_I, *, float_rows: int = 0, columns=None,
                variant: str | None = None) -> jax.Array:
    """dq(q(x · inv_smooth) W) + b for output channels `columns` = (start, stop) (default all): float32 [T, stop -
    start]. The first `float_rows` rows are quantized in two passes. `packed`: `pack_kernel` for `variant`
    (default: the selected one)."""
    variant = cpu_library.require(variant)
    start, stop = columns or (0, scale_O.shape[0])
    out = jax.ShapeDtypeStruct((x_TxI.shape[0], stop - start), jnp.float32)
    call = jax.ffi.ffi_call(cpu_library.target(variant, "int8_linear"), out)
    return call(x_TxI.astype(jnp.float32), packed, scale_O, bias_O, inv_smooth_I, float_rows=np.int64(float_rows),
                col_begin=np.int64(start), col_end=np.int64(stop))


def int8_layer_tail(x_TxF, attended_TxF, weights: dict, *, float_rows: int, eps: float, activation: str,
                    variant: str | None = None) -> jax.Array:
    """A layer's attention output projection, residual and layer norm, then its feed-forward block with residual
    and layer norm, in int8: float32 [T, F]. `weights`: {attention_output, intermediate, output: (packed, scale,
    bias, inv_smooth)}, attention_norm / output_norm: (scale, bias)}, packed for `variant` (default: the selected
    one)."""
    variant = cpu_library.require(variant)
    out = jax.ShapeDtypeStruct(x_TxF.shape, jnp.float32)
    call = jax.ffi.ffi_call(cpu_library.target(variant, "int8_layer_tail"), out)
    linears = [weights[k] for k in ("attention_output", "intermediate", "output")]
    (g1, beta1), (g2, beta2) = weights["attention_norm"], weights["output_norm"]
    return call(x_TxF.astype(jnp.float32), attended_TxF.astype(jnp.float32), *linears[0], g1, beta1, *linears[1],
                *linears[2], g2, beta2, float_rows=np.int64(float_rows), eps=np.float32(eps),
                activation=np.int64(ACTIVATIONS[activation]))


# The numpy reference: the same quantization in float32, the int8 products as exact integer sums, the rest in
# float64.

def reference_quantize(x_TxI: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 (q, scale): q = round_half_even(x · (127 / max|row|)), scale = max|row| / 127 (1 for a zero
    row), in float32 as the kernel computes them."""
    x = np.asarray(x_TxI, np.float32)
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 1).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(127), 1).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _reference_sums(q_TxI, q_IxO, r_IxO) -> np.ndarray:
    """q @ (Q + R / 254) from the exact integer products, in float64."""
    q = np.asarray(q_TxI, np.int64)
    return q @ np.asarray(q_IxO, np.int64) + (q @ np.asarray(r_IxO, np.int64)) / 254


def reference_linear(x_TxI, q_IxO, r_IxO, scale_O, bias_O, inv_smooth_I=None, float_rows: int = 0) -> np.ndarray:
    """`int8_linear` in numpy (unpacked weights Q and R [I, O])."""
    x = np.asarray(x_TxI, np.float32)
    if inv_smooth_I is not None:
        x = x * np.asarray(inv_smooth_I, np.float32)
    q, sx = reference_quantize(x)
    y = _reference_sums(q, q_IxO, r_IxO) * (sx.astype(np.float64)[:, None] * np.asarray(scale_O, np.float64))
    if float_rows > 0:
        n = min(float_rows, x.shape[0])
        residual = x[:n] - q[:n].astype(np.float32) * sx[:n, None]
        q2, sx2 = reference_quantize(residual)
        y[:n] += _reference_sums(q2, q_IxO, r_IxO) * (sx2.astype(np.float64)[:, None] * np.asarray(scale_O, np.float64))
    return (y + np.asarray(bias_O, np.float64)).astype(np.float32)


def _reference_norm(x: np.ndarray, scale, bias, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * scale + bias).astype(np.float32)


def reference_activation(u: np.ndarray, activation: str) -> np.ndarray:
    u = np.asarray(u, np.float64)
    if activation == "gelu":
        return (0.5 * u * (1 + np.vectorize(erf)(u / np.sqrt(2)))).astype(np.float32)
    if activation == "gelu_new":
        return (0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))).astype(np.float32)
    return np.maximum(u, 0).astype(np.float32)


def reference_layer_tail(x_TxF, attended_TxF, layer: dict, *, float_rows: int, eps: float,
                         activation: str) -> np.ndarray:
    """`int8_layer_tail` in numpy. `layer`: {attention_output, intermediate, output: {kernel, residual (int8
    [I, O]), scale, bias[, smooth]}, attention_norm / output_norm: {scale, bias}}."""
    def linear(name, x):
        p = layer[name]
        inv = None if "smooth" not in p else (1 / np.asarray(p["smooth"], np.float32)).astype(np.float32)
        return reference_linear(x, p["kernel"], p["residual"], p["scale"], p["bias"], inv, float_rows)

    norm1, norm2 = layer["attention_norm"], layer["output_norm"]
    x1 = _reference_norm(np.asarray(x_TxF, np.float32) + linear("attention_output", attended_TxF), norm1["scale"],
                         norm1["bias"], eps)
    hidden = reference_activation(linear("intermediate", x1), activation)
    return _reference_norm(x1 + linear("output", hidden), norm2["scale"], norm2["bias"], eps)

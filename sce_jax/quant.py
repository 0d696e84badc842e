"""int8 inference for the linear layers (`dtype="int8"`).

The encoder's linear layers (QKV, attention output, feed-forward in and out) hold int8 weights in two passes
with one float32 scale per output channel (symmetric: w ≈ scale · (q + r / 254), q and r in [-127, 127]: q the
weight rounded, r what that rounding leaves, in steps of 1/254 of q's; about 15 bits), quantized once when the
model is built or stored that way by `convert_torch_checkpoint.py --quantize int8`. Each call quantizes its
input per token (one scale per row, the row's max |x| / 127), multiplies int8 by int8 into exact int32 sums
against q and r, and scales them back to float32: y = (acc_q + acc_r / 254) · (x_scale ⊗ w_scale) + bias.
Two implementations compute this: fused C++ kernels next to the C++ attention kernel
(`sce_jax.kernels.cpu_int8`: the QKV projection, and everything after attention in one pass per block of 32
tokens; one build per instruction set: AMX tiles, AVX-512 VNNI, AVX2, plain loops), and XLA (`int8_linear`:
`jax.lax.dot_general` with `preferred_element_type=int32`, which XLA's CPU backend runs in YNNPACK).
`fused_int8_variant` picks, once, when the model is built; `$SCE_JAX_INT8_KERNEL` (auto, cpu, xla) overrides.

BERT's layer-norm outputs (the inputs of QKV and of the feed-forward) have a few outlier channels (MiniLM-L6:
channel 99 reaches ~28 where most stay below ~2), which would set every token's scale and crush the other
channels. So those two layers are smoothed first (SmoothQuant, Xiao et al. 2023): input channel c is divided by
s_c = max|x_c|^α / max|w_c|^(1-α) (α = 0.65) and the weight row multiplied by it, an exact rewrite in float
that moves the outliers into the (per-channel quantized) weights. max|x_c| comes from one float32 pass over
a fixed calibration batch of random vocabulary tokens (`calibrate`), when the weights are quantized.

The [CLS] rows (one per document, read directly by the score) and the query tokens (encoded once per query)
are quantized in two passes (`float_rows`): the row, then what its int8 copy leaves (x - q · scale) with a
scale of its own, both products summed: about 15 bits, as good as float32 for these rows at int8 speed. They are
~1% of a document's tokens and ~2% of a passage batch's, and they carried most of int8's score error: per-token
rounding of a [CLS] row moves that document's score alone, while the rounding of thousands of document tokens
averages out in [CLS]'s attention. Everything else stays float32: embeddings, layer norms, attention (scores,
softmax and value sums), GELU, the pooler and the classifier. docs/int8.md has the measurements behind these
choices.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The sub-trees of a layer's parameters that become int8 (`SparseCrossEncoderModel.layers[i].<name>`).
QUANTIZED_LINEARS = ("qkv", "attention_output", "intermediate", "output")
# A converted directory holding int8 weights carries this file (its content documents the scheme).
QUANTIZATION_FILE = "quantization.json"
SCHEME = {"dtype": "int8", "weights": "symmetric, per output channel, two passes: scale * (kernel + residual / 254)",
          "activations": "symmetric, per token",
          "smoothing": "SmoothQuant alpha 0.65 on qkv and intermediate, calibrated on random vocabulary tokens",
          "two-pass rows": "[CLS] and query tokens: the row and its residual, each int8 per token"}
# The linears whose inputs are smoothed (layer-norm outputs), and SmoothQuant's migration strength.
SMOOTHED_LINEARS = ("qkv", "intermediate")
SMOOTH_ALPHA = 0.65

_CONTRACT_LAST_FIRST = (((1,), (0,)), ((), ()))
logger = logging.getLogger("sce_jax.quant")


# The second weight pass's unit, in steps of the first: r = round((w / scale - q) · 254), |w / scale - q| <= 1/2.
RESIDUAL_STEPS = 254


def quantize_kernel(kernel_IxO) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 in two passes: (q [I, O] int8, r [I, O] int8, scale [O] float32) with
    kernel ≈ scale · (q + r / RESIDUAL_STEPS): q = round(kernel / scale), r = round((kernel / scale - q) · 254)
    (float64, round half to even), scale = max |column| / 127 (1 for a zero column)."""
    kernel_IxO = np.asarray(kernel_IxO, np.float32)
    amax_O = np.abs(kernel_IxO).max(axis=0)
    scale_O = np.where(amax_O > 0, amax_O / 127, 1).astype(np.float32)
    steps_IxO = kernel_IxO.astype(np.float64) / scale_O
    q_IxO = np.clip(np.rint(steps_IxO), -127, 127)
    r_IxO = np.clip(np.rint((steps_IxO - q_IxO) * RESIDUAL_STEPS), -127, 127)
    return q_IxO.astype(np.int8), r_IxO.astype(np.int8), scale_O


def quantize_rows(x_TxI: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (per-token) symmetric int8: (q [T, I] int8, scale [T] float32), x ≈ q · scale[:, None], with
    q = round_half_even(x · (127 / max|row|)) and scale = max|row| / 127 (the C++ kernel's arithmetic, exactly).

    Rows of zeros get scale 1 and q 0."""
    amax_T = jnp.max(jnp.abs(x_TxI), axis=1)
    return _round_rows(x_TxI, amax_T)


def _round_rows(x_TxI, bound_T):
    """q = round(x · 127 / bound), scale = bound / 127, per row (bound >= max |row|; 0 for a zero row)."""
    positive = bound_T > 0
    inverse_T = jnp.where(positive, 127 / jnp.where(positive, bound_T, 1), 1.0)
    scale_T = jnp.where(positive, bound_T / 127, 1.0)
    q_TxI = jnp.clip(jnp.round(x_TxI * inverse_T[:, None]), -127, 127).astype(jnp.int8)
    return q_TxI, scale_T


# For activations f that increase from their minimum on: max |f(u)| over a row is f(max u) unless that is below
# |min f| (GELU's minimum is -0.16997 at u = -0.7518; tanh-GELU's -0.16996; ReLU's 0).
ACTIVATION_FLOOR = {"gelu": 0.17, "gelu_new": 0.17, "relu": 0.0}


def quantize_activated_rows(u_TxI: jax.Array, activation, floor: float) -> tuple[jax.Array, jax.Array]:
    """`quantize_rows(activation(u))` for an activation with `ACTIVATION_FLOOR` `floor`, evaluating it once per
    element: the row's scale comes from activation(max u), which is the row's max |activation(u)| whenever it
    is at least `floor`; otherwise `floor` (an upper bound, so a coarser scale, never a clipped value). Same
    q and scale as `quantize_rows(activation(u))` for every row whose largest output reaches `floor` (with the
    first layer of BERT's feed-forward, every real token's). XLA would otherwise compute the activation twice
    (once for the row maximum, once for the division): for the exact GELU that was ~20% of an int8 forward."""
    bound_T = jnp.maximum(activation(jnp.max(u_TxI, axis=1)), floor)
    return _round_rows(activation(u_TxI), bound_T)


def int8_matmul(q_TxI: jax.Array, q_IxO: jax.Array) -> jax.Array:
    """int8 x int8 -> exact int32 sums [T, O]."""
    return jax.lax.dot_general(q_TxI, q_IxO, _CONTRACT_LAST_FIRST, preferred_element_type=jnp.int32)


def two_pass_matmul(xq_TxI: jax.Array, q_IxO: jax.Array, r_IxO: jax.Array) -> jax.Array:
    """xq @ (q + r / RESIDUAL_STEPS) from the two exact int32 products: float32 [T, O]."""
    return (int8_matmul(xq_TxI, q_IxO).astype(jnp.float32)
            + int8_matmul(xq_TxI, r_IxO).astype(jnp.float32) * (1 / RESIDUAL_STEPS))


def int8_linear(x_TxI, q_IxO, r_IxO, scale_O, bias_O, smooth_I=None, *, quantized=None,
                float_rows: int = 0) -> jax.Array:
    """(x / smooth) @ (scale · (q + r / 254)) + bias with x / smooth quantized per token: float32 [T, O].
    `quantized`: the input already quantized, (q [T, I] int8, scale [T]), instead of x (then `float_rows` needs x
    too).

    The first `float_rows` rows are quantized in two passes: the row, then its residual x - q · scale with a
    scale of its own; the two products are summed (about 15 bits: the [CLS] and query rows)."""
    if smooth_I is not None:
        x_TxI = x_TxI.astype(jnp.float32) * (1 / smooth_I)
    if quantized is None:
        quantized = quantize_rows(x_TxI.astype(jnp.float32))
    xq_TxI, x_scale_T = quantized
    y_TxO = two_pass_matmul(xq_TxI, q_IxO, r_IxO) * (x_scale_T[:, None] * scale_O) + bias_O
    n = min(float_rows, y_TxO.shape[0])
    if n <= 0:
        return y_TxO
    residual_NxI = x_TxI[:n].astype(jnp.float32) - xq_TxI[:n].astype(jnp.float32) * x_scale_T[:n, None]
    rq_NxI, r_scale_N = quantize_rows(residual_NxI)
    # Written in place: slicing and concatenating would copy whole activations (25% slower on passages).
    return y_TxO.at[:n].add(two_pass_matmul(rq_NxI, q_IxO, r_IxO) * (r_scale_N[:, None] * scale_O))


class Int8Linear(nnx.Module):
    """A linear layer with two-pass int8 weights (`kernel` + `residual` / 254, per-output-channel scales) and
    per-token int8 activations.

    `float_rows`: the input's first rows are quantized in two passes (`int8_linear`; the model passes the count of
    its [CLS] and query rows). `variant`: the build of the fused C++ kernels that runs the layer
    (`fused_int8_variant`), or None for XLA's; `packed` holds the weights in that build's layout
    (`sce_jax.kernels.cpu_int8.pack_kernel`, made at load by `with_packed_kernels`, never stored; empty for
    None), and `fused` runs the layer through them. Built with placeholder weights; the model builder replaces
    them with `quantize_kernel`'s output.
    """

    def __init__(self, in_features: int, out_features: int, variant: str | None = None):
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), jnp.int8))
        self.residual = nnx.Param(jnp.zeros((in_features, out_features), jnp.int8))
        self.scale = nnx.Param(jnp.ones((out_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        # Per input channel: the input is divided by it (SmoothQuant); ones where not smoothed.
        self.smooth = nnx.Param(jnp.ones((in_features,), jnp.float32))
        self.variant = variant
        self.packed = nnx.Param(jnp.zeros(packed_shape(in_features, out_features, variant), jnp.int8))

    def __call__(self, x_TxI: jax.Array, float_rows: int = 0) -> jax.Array:
        return self.columns(x_TxI, 0, self.kernel.shape[1], float_rows)

    def columns(self, x_TxI: jax.Array, start: int, stop: int, float_rows: int = 0) -> jax.Array:
        """Output channels start:stop only (the last layer's keys and values, or its [CLS] queries)."""
        q_IxO, r_IxO = self.kernel[...][:, start:stop], self.residual[...][:, start:stop]
        scale_O, bias_O = self.scale[...][start:stop], self.bias[...][start:stop]
        return int8_linear(x_TxI, q_IxO, r_IxO, scale_O, bias_O, self.smooth[...], float_rows=float_rows)

    def activated(self, u_TxI: jax.Array, activation, floor: float, float_rows: int = 0) -> jax.Array:
        """This layer applied to activation(u) (`quantize_activated_rows`: the activation once per element).
        For layers without smoothing only (the feed-forward's second linear: not in `SMOOTHED_LINEARS`)."""
        u_TxI = u_TxI.astype(jnp.float32)
        quantized = quantize_activated_rows(u_TxI, activation, floor)
        n = min(float_rows, u_TxI.shape[0])
        # The two-pass rows' residual needs activation(u) itself: evaluated again for those few rows only.
        x_TxI = activation(u_TxI[:n]) if n > 0 else None
        return int8_linear(x_TxI, self.kernel[...], self.residual[...], self.scale[...], self.bias[...],
                           quantized=quantized, float_rows=n)

    def fused(self, x_TxI: jax.Array, float_rows: int = 0, columns=None) -> jax.Array:
        """The same layer by the C++ kernel (`sce_jax.kernels.cpu_int8.int8_linear`)."""
        from sce_jax.kernels import cpu_int8

        return cpu_int8.int8_linear(x_TxI, self.packed[...], self.scale[...], self.bias[...], 1 / self.smooth[...],
                                    float_rows=float_rows, columns=columns, variant=self.variant)

    def weights(self) -> tuple:
        """(packed, scale, bias, 1 / smooth) for `sce_jax.kernels.cpu_int8.int8_layer_tail`."""
        return self.packed[...], self.scale[...], self.bias[...], 1 / self.smooth[...]


# SCE_JAX_INT8_KERNEL: which implementation runs the int8 layers on CPU.
INT8_KERNEL_ENV = "SCE_JAX_INT8_KERNEL"
INT8_KERNELS = ("auto", "cpu", "xla")


def int8_kernel_choice() -> str:
    """`$SCE_JAX_INT8_KERNEL` (default "auto"); an InputError naming it when it is none of `INT8_KERNELS`."""
    from sce_jax.errors import InputError

    choice = os.environ.get(INT8_KERNEL_ENV, "auto") or "auto"
    if choice not in INT8_KERNELS:
        raise InputError(f"${INT8_KERNEL_ENV}={choice!r}: expected one of {', '.join(INT8_KERNELS)}")
    return choice


# The builds of the C++ kernels whose fused int8 layers beat XLA's int8 layers and float32 (docs/int8.md): `auto`
# takes them; with the `generic` build (plain loops) XLA's int8 dot runs instead.
FAST_INT8_VARIANTS = ("amx", "avx512_vnni", "avx2")


def fused_int8_variant(impl: str, hidden_act: str) -> str | None:
    """Which build of the fused C++ int8 kernels (`sce_jax.kernels.cpu_library` variant) runs the int8 layers of
    a model with attention `impl` and activation `hidden_act`, or None for XLA's int8 layers. The kernels need the
    CPU attention kernel (`impl == "cpu"`) and an activation they implement; then `$SCE_JAX_INT8_KERNEL` decides:
    "auto" (the default) takes them with a build in `FAST_INT8_VARIANTS`, "cpu" with any build, "xla" never."""
    from sce_jax.kernels import cpu_int8, cpu_library

    choice = int8_kernel_choice()
    if choice == "xla" or impl != "cpu" or hidden_act not in cpu_int8.ACTIVATIONS:
        return None
    variant = cpu_library.selected()
    if variant is None or (choice == "auto" and variant not in FAST_INT8_VARIANTS):
        return None
    return variant


def int8_path(variant: str | None) -> str:
    """One line saying which implementation runs the int8 layers (`fused_int8_variant`'s answer), and where it is
    slower than float32 on this CPU, that it is."""
    from sce_jax.kernels import cpu_library

    if variant in FAST_INT8_VARIANTS:
        return f"int8 layers: fused C++ kernels, {variant} build"
    slower = "slower than float32 on this CPU (docs/int8.md): --dtype float32 scores faster"
    if variant is not None:
        return f"int8 layers: fused C++ kernels, {variant} build (plain loops): {slower}"
    if jax.default_backend() != "cpu" or "amx_int8" in cpu_library.cpu_features():
        return "int8 layers: XLA's int8 dot"
    return f"int8 layers: XLA's int8 dot, {slower}"


@functools.cache
def log_int8_path(variant: str | None) -> None:
    """`int8_path` at INFO, once per process and answer."""
    logger.info("%s", int8_path(variant))


def packed_shape(in_features: int, out_features: int, variant: str | None) -> tuple[int, ...]:
    """The shape of `sce_jax.kernels.cpu_int8.pack_kernel`'s output for an [in, out] kernel and `variant`; (0,)
    without one (XLA's int8 layers read the unpacked weights)."""
    if variant is None:
        return (0,)
    from sce_jax.kernels import cpu_int8

    return cpu_int8.packed_shape(in_features, out_features, variant)


def dequantized_kernel(linear: dict) -> np.ndarray:
    """The float32 kernel a quantized linear ({kernel, residual, scale, smooth, ...}) stands for: scale · (q + r /
    254), divided back by the smoothing, [I, O]."""
    steps = np.asarray(linear["kernel"], np.float64) + np.asarray(linear["residual"], np.float64) / RESIDUAL_STEPS
    kernel = (steps * np.asarray(linear["scale"], np.float64)).astype(np.float32)
    return kernel / np.asarray(linear["smooth"], np.float32)[:, None]


def is_quantized(params: dict) -> bool:
    return any("scale" in layer[QUANTIZED_LINEARS[0]] for layer in params["layers"].values())


def int8_params_problem(params: dict) -> str | None:
    """What is wrong with stored int8 parameters, or None: every weight scale and smoothing factor must be finite
    and positive (a NaN scale would silently act as 0, a zero or negative one flip or erase a channel)."""
    for i, layer in sorted(params["layers"].items(), key=lambda item: int(item[0])):
        for name in QUANTIZED_LINEARS:
            for field in ("scale", "smooth"):
                values = np.asarray(layer[name][field], np.float32)
                bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
                if bad.size:
                    return (f"layers.{i}.{name}.{field} has {bad.size} values that are not finite and positive "
                            f"(e.g. {values[bad[0]]} at index {bad[0]})")
    return None


def smoothing_factors(amax_x_I, kernel_IxO, alpha: float = SMOOTH_ALPHA) -> np.ndarray:
    """SmoothQuant's per-input-channel s = max|x|^α / max|w|^(1-α) (1 where a channel is all zero)."""
    amax_x_I = np.asarray(amax_x_I, np.float64)
    amax_w_I = np.abs(np.asarray(kernel_IxO, np.float64)).max(axis=1)
    smooth_I = amax_x_I**alpha / np.maximum(amax_w_I, 1e-12) ** (1 - alpha)
    return np.where((amax_x_I > 0) & (amax_w_I > 0), smooth_I, 1).astype(np.float32)


class _Capture(nnx.Module):
    """Wraps a float linear layer and passes max |x| per input channel of each input to `record`."""

    def __init__(self, linear, record):
        self.linear = linear
        self.record = record

    def __call__(self, x_TxI):
        self.record(jnp.max(jnp.abs(x_TxI.astype(jnp.float32)), axis=0))
        return self.linear(x_TxI)


def calibration_batch(config, *, rows: int = 4, length: int = 256, seed: int = 0):
    """A fixed batch of random vocabulary tokens (one query, `rows` documents), for `calibrate`."""
    from sce_jax.batch import make_batch

    rng = np.random.default_rng(seed)
    # Skip the low ids, where BERT vocabularies keep special and unused tokens.
    low = min(1000, config.vocab_size // 2)
    words = lambda n: rng.integers(low, config.vocab_size, n).tolist()
    sep = [config.sep_token_id] * 2
    length = min(length, config.max_position_embeddings - 16)
    return make_batch([words(8) + sep], [words(length - 2) + sep for _ in range(rows)], [0] * rows,
                      query_length=16, doc_length=length, pad_id=config.pad_token_id)


def calibrate(model: nnx.Module, batch) -> dict[tuple[int, str], np.ndarray]:
    """max |input| per channel of every layer's `SMOOTHED_LINEARS`, from one pass of `model` (a float32
    `SparseCrossEncoderModel`, or any module with such `layers` that `model(batch, return_hidden_states=True)`
    runs in full) over `batch` (`calibration_batch`): {(layer, name): [I]}."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def amax_per_channel(state, batch):
        model = nnx.merge(graphdef, state)
        amax = {}

        def recorder(key):
            return lambda amax_I: amax.__setitem__(key, jnp.maximum(amax.get(key, 0.0), amax_I))

        for i, layer in enumerate(model.layers):
            for name in SMOOTHED_LINEARS:
                setattr(layer, name, _Capture(getattr(layer, name), recorder((i, name))))
        # Every layer in full (hidden states), so the last layer's feed-forward sees every token too.
        model(batch, return_hidden_states=True)
        return {f"{i}/{name}": value for (i, name), value in amax.items()}

    found = amax_per_channel(state, batch)
    return {(int(key.split("/")[0]), key.split("/")[1]): np.asarray(value) for key, value in found.items()}


def quantize_params(params: dict, amax: dict[tuple[int, str], np.ndarray] | None = None) -> dict:
    """The parameter tree with every layer's `QUANTIZED_LINEARS` as {kernel: int8, scale, bias, smooth} (a
    new tree; the rest is shared). The inputs of the linears in `amax` (`calibrate`'s answer) are smoothed;
    without it, no layer is. Already quantized parameters come back unchanged."""
    if is_quantized(params):
        return params
    amax = amax or {}
    layers = {}
    for i, layer in params["layers"].items():
        layer = dict(layer)
        for name in QUANTIZED_LINEARS:
            kernel = np.asarray(layer[name]["kernel"], np.float32)
            smooth = np.ones(kernel.shape[0], np.float32)
            if (int(i), name) in amax:
                smooth = smoothing_factors(amax[int(i), name], kernel)
            q, r, scale = quantize_kernel(kernel * smooth[:, None])
            layer[name] = {"kernel": q, "residual": r, "scale": scale,
                           "bias": np.asarray(layer[name]["bias"], np.float32), "smooth": smooth}
        layers[i] = layer
    return {**params, "layers": layers}


def dequantize_params(params: dict) -> dict:
    """float32 kernels (q · scale) for quantized parameters, e.g. to run or export an int8 directory in float32."""
    if not is_quantized(params):
        return params
    layers = {}
    for i, layer in params["layers"].items():
        layer = dict(layer)
        for name in QUANTIZED_LINEARS:
            layer[name] = {"kernel": dequantized_kernel(layer[name]), "bias": layer[name]["bias"]}
        layers[i] = layer
    return {**params, "layers": layers}


def with_packed_kernels(params: dict, variant: str | None) -> dict:
    """Quantized parameters plus each int8 linear's `packed` kernel in the layout of the C++ kernels' `variant`
    (`sce_jax.kernels.cpu_int8.pack_kernel`; empty for None): made at load, never stored."""
    from sce_jax.kernels import cpu_int8

    layers = {}
    for i, layer in params["layers"].items():
        layer = dict(layer)
        for name in QUANTIZED_LINEARS:
            linear = layer[name]
            packed = (np.zeros((0,), np.int8) if variant is None
                      else cpu_int8.pack_kernel(linear["kernel"], linear["residual"], variant))
            layer[name] = {**linear, "packed": packed}
        layers[i] = layer
    return {**params, "layers": layers}


def quantized_target(target: dict) -> dict:
    """A restore target of float32 ShapeDtypeStructs turned into the int8 directory's (int8 kernels + scales)."""
    layers = {}
    for i, layer in target["layers"].items():
        layer = dict(layer)
        for name in QUANTIZED_LINEARS:
            kernel, bias = layer[name]["kernel"], layer[name]["bias"]
            layer[name] = {
                "kernel": jax.ShapeDtypeStruct(kernel.shape, np.int8, sharding=kernel.sharding),
                "residual": jax.ShapeDtypeStruct(kernel.shape, np.int8, sharding=kernel.sharding),
                "scale": jax.ShapeDtypeStruct(bias.shape, np.float32, sharding=bias.sharding),
                "bias": bias,
                "smooth": jax.ShapeDtypeStruct(kernel.shape[:1], np.float32, sharding=bias.sharding),
            }
        layers[i] = layer
    return {**target, "layers": layers}

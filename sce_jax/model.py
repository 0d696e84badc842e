"""The sparse cross-encoder in Flax NNX.

All per-token work (embeddings, projections, feed-forward, layer norms) runs on one flat token matrix holding the
three groups back to back — [CLS] of every document, the query tokens, the document tokens — so each layer is a
few large matmuls; only attention looks at the groups separately (`sce_jax.attention.sparse_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sce_jax.attention import (
    Groups,
    ProbDropout,
    TokenLayout,
    cpu_layer_attention,
    pattern_cls_attention,
    sparse_attention,
    supports_cpu_kernel,
    training_attention_impl,
)
from sce_jax.batch import Batch
from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.kernels import cpu_library
from sce_jax.quant import ACTIVATION_FLOOR, Int8Linear

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# On CPU the feed-forward block runs on token chunks of about this size, so its [tokens, intermediate] activations
# stay in cache between the two matmuls (a few percent faster on batches of documents; batches of passages have
# fewer tokens and are not split). Other backends take the whole batch at once.
CPU_TOKEN_CHUNK = 2048


def default_token_chunk() -> int | None:
    """The feed-forward token chunk for the default backend (`CPU_TOKEN_CHUNK` on CPU, None: no chunks), chosen
    when a model is built, so that it is part of the model's static configuration."""
    return CPU_TOKEN_CHUNK if jax.default_backend() == "cpu" else None


# Folded into a forward pass's dropout key to derive the attention-probability keys (then the layer index).
_ATTENTION_DROPOUT_STREAM = 0x41545450


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def doc_segments(doc_lengths_DxC: jax.Array, row_length: int) -> tuple[jax.Array, jax.Array]:
    """For rows of documents packed back to back: each token's document slot (-1 for padding) and its offset
    within that document."""
    slots = doc_lengths_DxC.shape[1]
    ends_DxC = jnp.cumsum(doc_lengths_DxC, axis=1)
    token_L = jnp.arange(row_length)
    slot_DxL = (token_L[None, :, None] >= ends_DxC[:, None, :]).sum(-1)
    starts_DxC = ends_DxC - doc_lengths_DxC
    offset_DxL = token_L[None, :] - jnp.take_along_axis(starts_DxC, jnp.minimum(slot_DxL, slots - 1), axis=1)
    return jnp.where(slot_DxL < slots, slot_DxL, -1), offset_DxL


class Embeddings(nnx.Module):
    def __init__(self, config: SparseCrossEncoderConfig, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        kw = dict(dtype=dtype, param_dtype=jnp.float32, embedding_init=init, rngs=rngs)
        self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, **kw)
        self.layer_norm = nnx.LayerNorm(
            config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, ids_T, positions_T, types_T):
        x = self.word_embeddings(ids_T) + self.position_embeddings(positions_T) + self.token_type_embeddings(types_T)
        return self.layer_norm(x)


def _is_int8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def _linear(linear, x_TxI, float_rows: int) -> jax.Array:
    """A linear layer (float, or int8 with its first `float_rows` rows in two int8 passes) applied to x."""
    return linear(x_TxI, float_rows) if isinstance(linear, Int8Linear) else linear(x_TxI)


def _linear_columns(linear, x_TxI, start: int, stop: int, float_rows: int) -> jax.Array:
    """Output channels start:stop of a linear layer (float or int8, as `_linear`)."""
    if isinstance(linear, Int8Linear):
        return linear.columns(x_TxI, start, stop, float_rows)
    x, kernel, bias = linear.promote_dtype((x_TxI, linear.kernel[...], linear.bias[...]), dtype=linear.dtype)
    return x @ kernel[:, start:stop] + bias[start:stop]


class Layer(nnx.Module):
    """A post-LayerNorm BERT layer whose attention follows the sparse pattern.

    With dtype int8 the four linear layers are `Int8Linear` (int8 weights and activations, int32 sums); the
    [CLS] and query rows, which every score reads directly and which are few, go through them in two int8 passes
    (the row, then what its int8 copy leaves: about 15 bits), and everything else computes in float32
    (`sce_jax.quant`). `token_chunk`: see `default_token_chunk`."""

    def __init__(self, config: SparseCrossEncoderConfig, *, dtype, rngs: nnx.Rngs, cpu_kernels: str | None = None,
                 int8_kernel: str | None = None, token_chunk: int | None = None):
        hidden = config.hidden_size
        int8 = _is_int8(dtype)
        dtype = jnp.float32 if int8 else dtype
        dense = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        norm = dict(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        linear = (lambda i, o: Int8Linear(i, o, int8_kernel)) if int8 else (lambda i, o: nnx.Linear(i, o, **dense))
        self.config = config
        # The C++ kernels' build for attention and for the int8 linears
        # (`sce_jax.quant.fused_int8_variant`; None: XLA's int8 layers).
        self.cpu_kernels = cpu_kernels
        self.int8_kernel = int8_kernel if int8 else None
        self.token_chunk = token_chunk
        # Query, key and value in one matmul.
        self.qkv = linear(hidden, 3 * hidden)
        self.attention_output = linear(hidden, hidden)
        self.attention_norm = nnx.LayerNorm(hidden, **norm)
        self.intermediate = linear(hidden, config.intermediate_size)
        self.output = linear(config.intermediate_size, hidden)
        self.output_norm = nnx.LayerNorm(hidden, **norm)

    def __call__(self, x_TxF, layout: TokenLayout, masks, *, impl, interpret, dropout_rngs,
                 attention_dropout: ProbDropout | None = None):
        cfg = self.config
        float_rows = layout.query_end  # the [CLS] and query rows, quantized in two passes (int8 model only)
        fused = self._fused()
        qkv_TxO = self.qkv.fused(x_TxF, float_rows) if fused else _linear(self.qkv, x_TxF, float_rows)
        qkv_Tx3xHxK = qkv_TxO.reshape(x_TxF.shape[0], 3, cfg.num_attention_heads, cfg.head_dim)
        if impl == "cpu":
            attended_TxHxK = cpu_layer_attention(qkv_Tx3xHxK, qkv_Tx3xHxK, *masks, cfg, layout, variant=self.cpu_kernels)
        else:
            q, k, v = (layout.split(qkv_Tx3xHxK[:, i]) for i in range(3))
            attended_TxHxK = layout.join(sparse_attention(q, k, v, *masks, cfg, impl=impl, interpret=interpret,
                                                          dropout=attention_dropout))
        if fused:
            return self._fused_tail(x_TxF, attended_TxHxK.reshape(x_TxF.shape), float_rows)
        return self._feed_forward(x_TxF, attended_TxHxK.reshape(x_TxF.shape), dropout_rngs, float_rows)

    def cls_states(self, x_TxF, layout: TokenLayout, masks, *, impl, dropout_rngs,
                   attention_dropout: ProbDropout | None = None):
        """The layer's output for the [CLS] rows only, [D·C, F]: all the last layer has to compute for the
        scores. Every token still gives keys and values (1/6 of a layer's matmul work), but only [CLS] gets
        queries, attention, the output projection and the feed-forward."""
        cfg = self.config
        hidden = cfg.hidden_size
        num_cls = layout.sizes[0]
        cls_TxF = x_TxF[:num_cls]
        heads = (cfg.num_attention_heads, cfg.head_dim)
        if fused := self._fused():
            kv_TxO = self.qkv.fused(x_TxF, layout.query_end, columns=(hidden, 3 * hidden))
            q_cls_NxF = self.qkv.fused(cls_TxF, num_cls, columns=(0, hidden))
        else:
            kv_TxO = _linear_columns(self.qkv, x_TxF, hidden, 3 * hidden, layout.query_end)
            q_cls_NxF = _linear_columns(self.qkv, cls_TxF, 0, hidden, num_cls)
        kv_Tx2xHxK = kv_TxO.reshape(x_TxF.shape[0], 2, *heads)
        q_cls_Nx1xHxK = q_cls_NxF.reshape(num_cls, 1, *heads)
        if impl == "cpu":
            attended = cpu_layer_attention(q_cls_Nx1xHxK, kv_Tx2xHxK, *masks, cfg, layout, cls_only=True,
                                           variant=self.cpu_kernels)
        else:
            k, v = (layout.split(kv_Tx2xHxK[:, i]) for i in range(2))
            attended = pattern_cls_attention(q_cls_Nx1xHxK.reshape(k.cls.shape), k, v, *masks, cfg, attention_dropout)
        if fused:
            return self._fused_tail(cls_TxF, attended.reshape(cls_TxF.shape), num_cls)
        return self._feed_forward(cls_TxF, attended.reshape(cls_TxF.shape), dropout_rngs, num_cls)

    def _fused(self) -> bool:
        """Whether this int8 layer runs through the fused C++ kernels (chosen at load: `int8_kernel`)."""
        return self.int8_kernel is not None

    def _fused_tail(self, x_TxF, attended_TxF, float_rows: int) -> jax.Array:
        """Output projection, residual, layer norm and the feed-forward block in one C++ call (int8, inference)."""
        from sce_jax.kernels import cpu_int8

        norms = {name: (norm.scale[...], norm.bias[...])
                 for name, norm in (("attention_norm", self.attention_norm), ("output_norm", self.output_norm))}
        weights = {name: getattr(self, name).weights() for name in ("attention_output", "intermediate", "output")}
        return cpu_int8.int8_layer_tail(x_TxF, attended_TxF, {**weights, **norms}, float_rows=float_rows,
                                        eps=self.config.layer_norm_eps, activation=self.config.hidden_act,
                                        variant=self.int8_kernel)

    def _feed_forward(self, x_TxF, attended_TxF, dropout_rngs, float_rows: int):
        """Attention output projection, then the feed-forward block, each with residual and layer norm; on CPU in
        chunks of at most `token_chunk` tokens (None: all at once). `float_rows`: as `_linear`."""
        num_tokens = x_TxF.shape[0]
        if self.token_chunk is None or num_tokens <= self.token_chunk * 3 // 2:
            return self._feed_forward_chunk(x_TxF, attended_TxF, dropout_rngs, float_rows)
        pieces = -(-num_tokens // self.token_chunk)
        step = -(-num_tokens // pieces)
        return jnp.concatenate([
            self._feed_forward_chunk(
                x_TxF[start : start + step], attended_TxF[start : start + step],
                [None if rng is None else jax.random.fold_in(rng, start) for rng in dropout_rngs],
                max(0, float_rows - start),
            )
            for start in range(0, num_tokens, step)
        ])

    def _feed_forward_chunk(self, x_TxF, attended_TxF, dropout_rngs, float_rows: int):
        rate = self.config.hidden_dropout_prob
        projected_TxF = _linear(self.attention_output, attended_TxF, float_rows)
        x_TxF = self.attention_norm(x_TxF + _dropout(projected_TxF, rate, dropout_rngs[0]))
        activation = _ACTIVATIONS[self.config.hidden_act]
        if isinstance(self.output, Int8Linear):
            intermediate_TxI = _linear(self.intermediate, x_TxF, float_rows)
            h = self.output.activated(intermediate_TxI, activation, ACTIVATION_FLOOR[self.config.hidden_act], float_rows)
        else:
            h = self.output(activation(self.intermediate(x_TxF)))
        return self.output_norm(x_TxF + _dropout(h, rate, dropout_rngs[1]))


# Precision of the float32 matmuls (jax's names): "highest" is full float32; "tensorfloat32" lets GPUs with tensor
# cores round the operands to TF32 (10-bit mantissas, ~1e-3 relative error; faster). JAX's own default on such GPUs
# is TF32, so it is always set explicitly. CPUs compute float32 either way; bfloat16 matmuls are unaffected.
MATMUL_PRECISIONS = ("highest", "tensorfloat32")


class SparseCrossEncoderModel(nnx.Module):
    """Scores (query, document) pairs: `model(batch) -> [D]` float32 logits."""

    def __init__(
        self,
        config: SparseCrossEncoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        attention_impl: str = "xla",
        interpret: bool = False,
        cpu_kernels: str | None = None,
        int8_kernel: str | None = None,
        matmul_precision: str = "highest",
        token_chunk: int | None | str = "auto",
    ):
        if matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}")
        self.config = config
        self.matmul_precision = matmul_precision
        # Patterns the C++ CPU kernel does not cover run the XLA path.
        self.attention_impl = "xla" if attention_impl == "cpu" and not supports_cpu_kernel(config) else attention_impl
        # The build of the C++ kernels (`sce_jax.kernels.cpu_library`) that runs the attention (None: the one
        # `cpu_library.selected()` names, asked here), and with dtype int8 the one that runs the linears (only
        # beside the C++ attention), or None for XLA's int8 layers (`sce_jax.quant.fused_int8_variant`): chosen
        # when the model is built, never while tracing.
        self.cpu_kernels = (cpu_kernels or cpu_library.selected()) if self.attention_impl == "cpu" else None
        self.int8_kernel = int8_kernel if _is_int8(dtype) and self.attention_impl == "cpu" else None
        # The feed-forward's token chunk: "auto" is `default_token_chunk()`, chosen here, never while tracing.
        self.token_chunk = default_token_chunk() if token_chunk == "auto" else token_chunk
        self.interpret = interpret
        # int8: the layers' linears are int8 (`sce_jax.quant`), everything else float32.
        float_dtype = jnp.float32 if _is_int8(dtype) else dtype
        dense = dict(dtype=float_dtype, param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.embeddings = Embeddings(config, dtype=float_dtype, rngs=rngs)
        self.layers = nnx.List([Layer(config, dtype=dtype, rngs=rngs, cpu_kernels=self.cpu_kernels,
                                      int8_kernel=self.int8_kernel, token_chunk=self.token_chunk)
                                for _ in range(config.num_hidden_layers)])
        self.pooler = nnx.Linear(config.hidden_size, config.hidden_size, **dense)
        self.classifier = nnx.Linear(config.hidden_size, 1, **dense)

    def __call__(self, batch: Batch, *, dropout_rng: jax.Array | None = None, return_hidden_states: bool = False):
        """Scores [D·C] (row-major over rows and document slots; [D] for one document per row)."""
        # Every matmul traced here (and its transposes in the backward pass) carries this precision.
        with jax.default_matmul_precision(self.matmul_precision):
            return self._forward(batch, dropout_rng, return_hidden_states)

    def _forward(self, batch: Batch, dropout_rng: jax.Array | None, return_hidden_states: bool):
        cfg = self.config
        query_ids, doc_ids, doc_query = (jnp.asarray(a) for a in batch[:3])
        num_rows, row_length = doc_ids.shape
        if batch.doc_lengths is None:
            doc_lengths = (doc_ids != cfg.pad_token_id).sum(axis=1, keepdims=True)
        else:
            doc_lengths = jnp.asarray(batch.doc_lengths)
        slots = doc_lengths.shape[1]
        slot_DxL, offset_DxL = doc_segments(doc_lengths, row_length)
        query_length = query_ids.shape[1]
        query_lengths_Q = (query_ids != cfg.pad_token_id).sum(axis=1)
        if not cfg.query_is_shared:
            if slots != 1:
                raise ValueError("rows of several documents need a query that sees neither [CLS] nor documents")
            # The query sees [CLS] or the document, so its encoding differs per document.
            query_ids, query_lengths_Q = query_ids[doc_query], query_lengths_Q[doc_query]
            doc_query = jnp.arange(num_rows)
        num_queries = query_ids.shape[0]
        layout = TokenLayout(num_rows, slots, num_queries, query_length, row_length)

        ids = Groups(jnp.full((num_rows, slots), cfg.cls_token_id, jnp.int32), query_ids, doc_ids)
        positions = Groups(
            jnp.zeros((num_rows, slots), jnp.int32),
            jnp.broadcast_to(1 + jnp.arange(query_length), query_ids.shape),
            1 + query_lengths_Q[doc_query][:, None] + offset_DxL,
        )
        types = Groups(jnp.zeros_like(ids.cls), jnp.zeros_like(query_ids), jnp.ones_like(doc_ids))
        # Padding rows may point past the position table; their results are discarded, so clamp them.
        positions_T = jnp.clip(layout.join(positions), 0, cfg.max_position_embeddings - 1)
        x_TxF = self.embeddings(layout.join(ids), positions_T, layout.join(types))

        # Two hidden-state dropout sites per layer, then the embeddings and the pooled output.
        rngs = [None] * (2 * cfg.num_hidden_layers + 2)
        if dropout_rng is not None:
            rngs = list(jax.random.split(dropout_rng, len(rngs)))
        x_TxF = _dropout(x_TxF, cfg.hidden_dropout_prob, rngs[-1])
        impl, attention_dropouts = self._attention_dropouts(dropout_rng)

        masks = (query_ids != cfg.pad_token_id, slot_DxL, doc_query)
        hidden = [layout.states(x_TxF)] if return_hidden_states else None
        cls_DxF = None
        for i, layer in enumerate(self.layers):
            layer_rngs = rngs[2 * i : 2 * i + 2]
            if hidden is None and i == len(self.layers) - 1:
                # The scores read only [CLS], so the last layer computes nothing else.
                cls_DxF = layer.cls_states(x_TxF, layout, masks, impl=impl, dropout_rngs=layer_rngs,
                                           attention_dropout=attention_dropouts[i])
                break
            x_TxF = layer(x_TxF, layout, masks, impl=impl, interpret=self.interpret, dropout_rngs=layer_rngs,
                          attention_dropout=attention_dropouts[i])
            if hidden is not None:
                hidden.append(layout.states(x_TxF))
        if cls_DxF is None:
            cls_DxF = x_TxF[: num_rows * slots]
        pooled = jnp.tanh(self.pooler(cls_DxF))
        scores_D = self.classifier(_dropout(pooled, cfg.hidden_dropout_prob, rngs[-2]))[:, 0].astype(jnp.float32)
        if return_hidden_states:
            return scores_D, tuple(hidden)
        return scores_D

    def _attention_dropouts(self, dropout_rng: jax.Array | None) -> tuple[str, list[ProbDropout | None]]:
        """The attention implementation and each layer's attention-probability dropout for this forward pass:
        without a dropout key or at rate 0, the model's implementation and no dropout; else the XLA path
        (`training_attention_impl`) and a key per layer, the layer index folded into the pass's key."""
        rate = self.config.attention_probs_dropout_prob
        layers = self.config.num_hidden_layers
        if dropout_rng is None or rate == 0.0:
            return self.attention_impl, [None] * layers
        stream = jax.random.fold_in(dropout_rng, _ATTENTION_DROPOUT_STREAM)
        return training_attention_impl(self.attention_impl), [
            ProbDropout(rate, jax.random.fold_in(stream, i)) for i in range(layers)
        ]

"""Training steps per second for the MiniLM-L6 shape (6 layers, hidden 384) at batch 32 (MarginMSE pairs).

    python benchmarks/train_throughput.py [--steps 5] [--doc-length 160] [--dtype float32] [--attention-dropout 0.1]

Times the jitted train step (after one warm-up/compile step) on synthetic token ids with the released model's
shape and attention pattern, and the same step with full attention (a standard cross-encoder) as the baseline,
in the same process. Prints the machine and both rates. Dropout is BERT's 0.1 on hidden states and attention
probabilities (`--attention-dropout` sets the second; at 0 the C++ CPU kernel runs the sparse attention's forward).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
from flax import nnx

from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.encoder import build_model
from sce_jax.train import TrainConfig, make_optimizer, make_train_step
from sce_jax.train_data import TrainBatch
from sce_jax.weights import param_shapes


def synthetic_batch(batch_size: int, query_length: int, doc_length: int, rng) -> TrainBatch:
    docs = 2 * batch_size
    query_ids = rng.integers(1000, 30000, (1, batch_size, query_length), dtype=np.int32)
    doc_ids = rng.integers(1000, 30000, (1, docs, doc_length), dtype=np.int32)
    return TrainBatch(
        query_ids=query_ids,
        doc_ids=doc_ids,
        doc_query=np.repeat(np.arange(batch_size, dtype=np.int32), 2)[None],
        labels=rng.normal(size=(1, batch_size, 2)).astype(np.float32),
        label_mask=np.ones((1, batch_size, 2), bool),
    )


def steps_per_second(config: SparseCrossEncoderConfig, batch: TrainBatch, *, steps: int, dtype: str) -> float:
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s).astype(np.float32), param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    model = build_model(config, params, dtype=dtype, attention_impl="auto")
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    optimizer = make_optimizer(TrainConfig(warmup_steps=0))
    opt_state = optimizer.init(params)
    step_fn = jax.jit(make_train_step(graphdef, "margin-mse", optimizer))
    key = np.asarray(jax.random.PRNGKey(0))
    params, opt_state, metrics = step_fn(params, opt_state, batch, key, 0)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        params, opt_state, metrics = step_fn(params, opt_state, batch, key, step)
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--doc-length", type=int, default=160, help="padded document length (passages: ~160)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-dropout", type=float, default=0.1, help="attention_probs_dropout_prob")
    args = parser.parse_args()

    batch = synthetic_batch(args.batch_size, args.query_length, args.doc_length, np.random.default_rng(0))
    # MiniLM-L6 shape, window 4, the released pattern
    sparse = SparseCrossEncoderConfig(attention_probs_dropout_prob=args.attention_dropout)
    full = sparse.replace(attention_window_size=None, query_cls_attention=True, query_doc_attention=True)
    print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"{len(jax.devices())} device(s), jax {jax.__version__}")
    print(f"batch {args.batch_size} x 2 docs, query {args.query_length}, doc {args.doc_length} tokens, {args.dtype}, "
          f"attention dropout {args.attention_dropout}")
    rates = {name: steps_per_second(cfg, batch, steps=args.steps, dtype=args.dtype)
             for name, cfg in (("full cross-encoder", full), ("sparse window 4", sparse))}
    for name, rate in rates.items():
        print(f"{name:>20}: {rate:.3f} steps/s ({rate * args.batch_size:.1f} samples/s)")
    print(f"sparse / full: {rates['sparse window 4'] / rates['full cross-encoder']:.2f}x")


if __name__ == "__main__":
    main()

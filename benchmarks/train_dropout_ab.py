"""The cost of attention-probability dropout in training, measured in one process.

    python benchmarks/train_dropout_ab.py [--patterns sparse,full] [--rounds 3]

Builds the train step of `benchmarks/train_throughput.py` (MiniLM-L6 shape, batch 32 MarginMSE pairs) with attention
dropout 0 (the C++ CPU kernel's forward) and 0.1 (the XLA attention path), for each pattern, then times them in
turn, ROUNDS rounds of 2 steps each: wall and process CPU seconds per step, and their medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx
from train_throughput import synthetic_batch

from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.encoder import build_model
from sce_jax.train import TrainConfig, make_optimizer, make_train_step
from sce_jax.weights import param_shapes


def compiled_step(config: SparseCrossEncoderConfig, batch):
    """[step_fn, params, opt_state] after one (compiling) step."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s).astype(np.float32), param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    graphdef, state = nnx.split(build_model(config, params, dtype="float32", attention_impl="auto"), nnx.Param)
    params = nnx.to_pure_dict(state)
    optimizer = make_optimizer(TrainConfig(warmup_steps=0))
    step_fn = jax.jit(make_train_step(graphdef, "margin-mse", optimizer))
    opt_state = optimizer.init(params)
    jax.block_until_ready(step_fn(params, opt_state, batch, np.asarray(jax.random.PRNGKey(0)), 0))
    return [step_fn, params, opt_state]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", default="sparse,full")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batch = synthetic_batch(32, 32, 160, np.random.default_rng(0))
    sparse = SparseCrossEncoderConfig()
    full = sparse.replace(attention_window_size=None, query_cls_attention=True, query_doc_attention=True)
    variants = {}
    for name in args.patterns.split(","):
        for rate in (0.0, 0.1):
            config = {"sparse": sparse, "full": full}[name].replace(attention_probs_dropout_prob=rate)
            variants[f"{name} attention dropout {rate}"] = (compiled_step(config, batch), [], [])
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__}", flush=True)
    key = np.asarray(jax.random.PRNGKey(0))
    for round_ in range(args.rounds):
        for label, (state, walls, cpus) in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for step in (1, 2):
                state[1], state[2], metrics = state[0](state[1], state[2], batch, key, step)
            jax.block_until_ready(metrics)
            walls.append((time.perf_counter() - wall) / 2)
            cpus.append((time.process_time() - cpu) / 2)
            print(f"round {round_} {label}: {walls[-1]:.2f} s/step wall, {cpus[-1]:.2f} CPU s/step", flush=True)
    for label, (_, walls, cpus) in variants.items():
        wall = statistics.median(walls)
        print(f"{label}: median {wall:.2f} s/step wall ({1 / wall:.3f} steps/s), median CPU "
              f"{statistics.median(cpus):.2f} s/step")


if __name__ == "__main__":
    main()

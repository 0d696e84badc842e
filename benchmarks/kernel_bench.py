"""Document-row attention on one accelerator: dense masked attention vs the XLA banded path vs the Pallas kernel.

Checks the kernel against the dense reference first (forward and gradients, exit code 1 on a mismatch), then
times forward and forward+backward at each sequence length and reports achieved memory bandwidth against a
measured device-to-device copy. Usage (GPU): `python benchmarks/kernel_bench.py`; CPU end-to-end check in
Pallas interpret mode: `python benchmarks/kernel_bench.py --cpu-smoke`. See docs/kernels.md.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sce_jax.kernels.block_config import BlockConfig, shipped_block_config
from sce_jax.kernels.windowed_attention import windowed_attention
from sce_jax.attention import doc_attention

IMPLS = ("dense", "xla", "pallas")
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    lengths: tuple[int, ...]
    tokens: int  # documents per length: tokens // length (fills the GPU at every length)
    window: int
    heads: int
    head_dim: int
    global_keys: int  # [CLS] + query tokens
    dtype: str
    repeats: int
    interpret: bool
    block: BlockConfig


def parse_args(argv) -> tuple[BenchConfig, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--tokens", type=int, default=65536, help="document tokens per batch (docs = tokens/L)")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=32, choices=[32, 64])
    parser.add_argument("--global-keys", type=int, default=33)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block-q", type=int, help="tiles and launch settings; default: the shipped ones for the "
                        "dtype and head size (sce_jax.kernels.block_config.shipped_block_config)")
    parser.add_argument("--block-k", type=int)
    parser.add_argument("--num-warps", type=int)
    parser.add_argument("--num-stages", type=int)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, Pallas interpret mode, on CPU")
    args = parser.parse_args(argv)
    try:
        block = shipped_block_config(args.dtype, args.head_dim)
        given = {"block_q": args.block_q, "block_k": args.block_k, "num_warps": args.num_warps,
                 "num_stages": args.num_stages}
        block = dataclasses.replace(block, **{k: v for k, v in given.items() if v is not None})
    except ValueError as error:
        parser.error(str(error))
    if args.cpu_smoke:
        config = BenchConfig(lengths=(40, 72), tokens=144, window=4, heads=2, head_dim=32, global_keys=5,
                             dtype="float32", repeats=2, interpret=True, block=BlockConfig(16, 16))
    else:
        config = BenchConfig(tuple(args.lengths), args.tokens, args.window, args.heads, args.head_dim,
                             args.global_keys, args.dtype, args.repeats, interpret=False, block=block)
    return config, args.json


def make_inputs(config: BenchConfig, num_docs: int, length: int, seed: int = 0):
    """Random q, k, v and global keys; documents of varied real length, all global keys valid."""
    rng = np.random.default_rng(seed)
    doc_shape = (num_docs, length, config.heads, config.head_dim)
    global_shape = (num_docs, config.global_keys, config.heads, config.head_dim)
    arrays = [rng.standard_normal(s, np.float32) for s in [doc_shape] * 3 + [global_shape] * 2]
    real_lengths = rng.integers(length // 2, length + 1, num_docs)
    doc_mask = np.arange(length)[None, :] < real_lengths[:, None]
    global_mask = np.ones((num_docs, config.global_keys), bool)
    return [jnp.asarray(a, config.dtype) for a in arrays] + [jnp.asarray(doc_mask), jnp.asarray(global_mask)]


def attention_fn(config: BenchConfig, impl: str):
    if impl == "pallas":
        return lambda *a: windowed_attention(*a, window=config.window, config=config.block, interpret=config.interpret)
    return lambda *a: doc_attention(*a, window=config.window, impl=impl)


def forward(fn):
    return lambda *args: fn(*args[:7])


def forward_and_backward(fn):
    """Forward plus the gradients w.r.t. q, k, v and the global keys/values, for a fixed cotangent (last arg)."""

    def run(*args):
        out, vjp = jax.vjp(lambda *x: fn(*x, *args[5:7]), *args[:5])
        return out, vjp(args[7])

    return run


def check_correctness(config: BenchConfig, length: int) -> float:
    """Largest deviation of the kernel from the dense reference (forward and gradients) on a few documents,
    relative to 1 + |reference|."""
    args = make_inputs(config, 2, length, seed=1)
    args.append(jnp.asarray(np.random.default_rng(2).standard_normal(args[0].shape, np.float32), config.dtype))
    kernel = jax.jit(forward_and_backward(attention_fn(config, "pallas")))(*args)
    reference = jax.jit(forward_and_backward(attention_fn(config, "dense")))(*args)
    worst = 0.0
    for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(reference)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        worst = max(worst, float(np.max(np.abs(a - b) / (1 + np.abs(b)))))
    return worst


def median_seconds(step, args, repeats: int) -> float | None:
    """Median wall time of a compiled step; None when the device runs out of memory."""
    try:
        jax.block_until_ready(step(*args))  # compile and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times.append(time.perf_counter() - start)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the ceiling for a memory-bound kernel."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    seconds = median_seconds(jax.jit(jnp.copy), [x], repeats)
    return 2 * x.nbytes / seconds


def minimum_bytes(args, with_backward: bool) -> int:
    """Least memory traffic of the computation: read q, k, v and the global keys/values, write the output; the
    backward also reads q, k, v, out, dout and writes dq, dk, dv and the global gradients. Same model for every
    implementation, so the bandwidth columns compare like with like."""
    doc_bytes, global_bytes = args[0].nbytes, args[3].nbytes
    if with_backward:
        return 12 * doc_bytes + 4 * global_bytes
    return 4 * doc_bytes + 2 * global_bytes


def run_benchmark(config: BenchConfig) -> list[dict]:
    copy_bytes_per_s = copy_bandwidth(4 << 20 if config.interpret else 1 << 30, config.repeats)
    print(f"device-to-device copy: {copy_bytes_per_s / 1e9:.1f} GB/s")
    rows = []
    cases = [(length, impl) for length in config.lengths for impl in IMPLS]
    for length, impl in tqdm(cases, desc="timing", unit="case"):
        num_docs = max(1, config.tokens // length)
        args = make_inputs(config, num_docs, length)
        args.append(jnp.asarray(np.random.default_rng(3).standard_normal(args[0].shape, np.float32), config.dtype))
        row = dict(length=length, docs=num_docs, impl=impl)
        for name, wrap, with_backward in (("fwd", forward, False), ("fwd_bwd", forward_and_backward, True)):
            seconds = median_seconds(jax.jit(wrap(attention_fn(config, impl))), args, config.repeats)
            row[f"{name}_ms"] = None if seconds is None else 1e3 * seconds
            bandwidth = None if seconds is None else minimum_bytes(args, with_backward) / seconds
            row[f"{name}_copy_fraction"] = None if bandwidth is None else bandwidth / copy_bytes_per_s
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(value, fmt, scale=1.0):
        return "OOM".rjust(len(format(0.0, fmt))) if value is None else format(scale * value, fmt)

    lines = ["    L  docs  impl     fwd ms  fwd %copy  fwd+bwd ms  fwd+bwd %copy  fwd+bwd speed-up vs dense"]
    dense = {r["length"]: r["fwd_bwd_ms"] for r in rows if r["impl"] == "dense"}
    for r in rows:
        base = dense[r["length"]]
        speedup = None if base is None or r["fwd_bwd_ms"] is None else base / r["fwd_bwd_ms"]
        lines.append(
            f"{r['length']:5d} {r['docs']:5d}  {r['impl']:7s} {cell(r['fwd_ms'], '8.3f')} "
            f"{cell(r['fwd_copy_fraction'], '9.1f', 100)}  {cell(r['fwd_bwd_ms'], '10.3f')} "
            f"{cell(r['fwd_bwd_copy_fraction'], '14.1f', 100)}  {'n/a' if speedup is None else f'{speedup:.2f}x':>8s}"
        )
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2)
    os.replace(handle.name, path)


def main(argv=None) -> int:
    config, json_path = parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {config}")
    for length in config.lengths:
        deviation = check_correctness(config, length)
        print(f"correctness L={length}: max |kernel - dense| / (1 + |dense|) = {deviation:.2e}")
        if deviation > TOLERANCE[config.dtype]:
            print(f"kernel_bench: kernel deviates from the dense reference at L={length}; not timing", file=sys.stderr)
            return 1
    rows = run_benchmark(config)
    print(format_table(rows))
    if json_path:
        write_json(json_path, dict(device=device.device_kind, jax=jax.__version__,
                                   config=dataclasses.asdict(config), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

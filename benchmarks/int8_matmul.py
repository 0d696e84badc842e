"""Which int8 variant pays on this CPU: XLA's float32 dot against its int8 x int8 -> int32 dot, alone and with the
per-token quantization and the dequantization around it (what `sce_jax.quant.int8_linear` runs), and the fused C++
kernel (`sce_jax.kernels.cpu_int8.int8_linear`: all three in one pass) in every build this CPU runs (AMX tiles,
AVX-512 VNNI, AVX2, plain loops: `sce_jax.kernels.cpu_library`).

    python benchmarks/int8_matmul.py [--tokens 2048] [--rounds 5] [--no-torch]

At the model's feed-forward shape ([tokens, 384] @ [384, 1536]), in one process, alternating rounds of 20 calls
each; prints medians and ratios to the float32 dot. For the question whether a C++ route through a well-kept
int8 GEMM library would pay, the same products also run in PyTorch's CPU int8 kernels, on the same threads:
`torch._int_mm` (int8 x int8 -> int32, oneDNN) and a dynamically quantized `nn.Linear` (per-token activation
quantization + int8 GEMM + dequantization in one call, torch's "x86" engine: FBGEMM/oneDNN), what such a route
would call.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from sce_jax import quant


warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch's int8 kernels")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.tokens, 384)), jnp.float32)
    w = rng.standard_normal((384, 1536)).astype(np.float32) * 0.05
    q, r, scale = (jnp.asarray(a) for a in quant.quantize_kernel(w))
    bias = jnp.zeros(1536, jnp.float32)
    xq, x_scale = quant.quantize_rows(x)
    acc = quant.int8_matmul(xq, q)
    cases = {
        "float32 dot": (jax.jit(lambda x, w: x @ w + bias), (x, jnp.asarray(w))),
        "int8 dot (int32 out)": (jax.jit(quant.int8_matmul), (xq, q)),
        "per-token quantization": (jax.jit(quant.quantize_rows), (x,)),
        "dequantization": (jax.jit(lambda a, s: a.astype(jnp.float32) * (s[:, None] * scale) + bias), (acc, x_scale)),
        "two-pass int8 dot (float32 out)": (jax.jit(quant.two_pass_matmul), (xq, q, r)),
        "int8_linear (all three, two-pass weights)": (jax.jit(lambda x: quant.int8_linear(x, q, r, scale, bias)), (x,)),
    }
    from sce_jax.kernels import cpu_int8, cpu_library

    ones = jnp.ones(384, jnp.float32)
    for variant in cpu_library.VARIANTS:
        if cpu_int8.available(variant)[0]:
            packed = jnp.asarray(cpu_int8.pack_kernel(np.asarray(q), np.asarray(r), variant))
            fused = lambda x, packed=packed, variant=variant: cpu_int8.int8_linear(x, packed, scale, bias, ones,
                                                                                   variant=variant)
            cases[f"C++ fused linear ({variant})"] = (jax.jit(fused), (x,))
    torch = None
    if not args.no_torch:
        with contextlib.suppress(ImportError):
            import torch
    if torch is not None:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        a_t, w_t = torch.from_numpy(np.asarray(xq)), torch.from_numpy(np.asarray(q))
        linear = torch.nn.Sequential(torch.nn.Linear(384, 1536))
        linear[0].weight.data = torch.from_numpy(w.T.copy())
        dynamic = torch.ao.quantization.quantize_dynamic(linear, {torch.nn.Linear}, dtype=torch.qint8)
        x_t = torch.from_numpy(np.asarray(x))
        cases["torch._int_mm (int32 out)"] = (lambda a, b: torch._int_mm(a, b), (a_t, w_t))
        cases["torch dynamic int8 Linear"] = (lambda v: dynamic(v), (x_t,))
        cases["torch float32 Linear"] = (lambda v: linear(v), (x_t,))
    for fn, inputs in cases.values():
        jax.block_until_ready(fn(*inputs))
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (fn, inputs) in cases.items():
            start = time.perf_counter()
            with torch.inference_mode() if torch is not None else contextlib.nullcontext():
                for _ in range(20):
                    jax.block_until_ready(fn(*inputs))
            times[name].append((time.perf_counter() - start) / 20)
    print(f"{cpu_library.describe()}; jax {jax.__version__}; [{args.tokens}, 384] @ [384, 1536], median of "
          f"{args.rounds} rounds")
    base = np.median(times["float32 dot"])
    for name, values in times.items():
        print(f"{name:30s} {np.median(values) * 1e3:7.2f} ms   float32 dot / this: {base / np.median(values):5.2f}")


if __name__ == "__main__":
    main()

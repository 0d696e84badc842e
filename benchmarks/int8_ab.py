"""int8 against float32 in one process, for every build of the C++ kernels this CPU runs.

    python benchmarks/int8_ab.py [--workload passages|documents] [--count 256] [--rounds 5] [--variants avx2 ...]
                                 [--cpu-time]

Loads the benchmark model of rerank_throughput.py as float32 (the best build's attention kernel) and as int8 once
per build of the fused int8 kernels (`sce_jax.kernels.cpu_library`: amx, avx512_vnni, avx2, generic, as this CPU
runs them; each model keeps its build) and once with XLA's int8 layers, then times full scoring passes of each
in alternating rounds (so all see the same machine speed) and prints docs/s per round, the median per-round
ratio to float32 and each one's largest score difference from float32 (as a fraction of the score spread).
The avx2 build on an AVX-512 CPU stands in for an AVX2-only CPU (the same kernels; XLA's float32 still uses
AVX-512 there, so the ratio is lower than on an AVX2 CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import rerank_throughput as bench  # noqa: E402


def load(model_dir: Path, max_length: int, dtype: str, cpu_kernels: str, int8_kernel: str = "auto"):
    """A SparseCrossEncoder whose model keeps the C++ kernels' build `cpu_kernels` (and the int8 layers' choice)."""
    from sce_jax.encoder import SparseCrossEncoder
    from sce_jax.kernels import cpu_library

    os.environ.update(SCE_JAX_CPU_KERNELS=cpu_kernels, SCE_JAX_INT8_KERNEL=int8_kernel)
    cpu_library.selected.cache_clear()
    return SparseCrossEncoder.load(model_dir, max_length=max_length, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(bench.WORKLOADS), default="passages")
    parser.add_argument("--count", type=int, default=256, help="documents to score")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", help="builds of the int8 kernels to time (default: all this CPU runs)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this process's CPU time (all its threads) instead of the wall clock: on a "
                             "machine shared with other jobs it counts only this process's work")
    args = parser.parse_args()

    from sce_jax.kernels import cpu_library

    runnable = [v for v in cpu_library.VARIANTS if cpu_library.available(v)[0]]
    variants = [v for v in (args.variants or runnable) if v in runnable]
    directory = Path(tempfile.mkdtemp(prefix="int8-ab-"))
    try:
        bench.make_model_dir(directory / "model")
        max_length, batch_size, _ = bench.WORKLOADS[args.workload]
        model = directory / "model"
        encoders = {"float32": load(model, max_length, "float32", runnable[0])}
        for variant in variants:
            encoders[f"int8 {variant}"] = load(model, max_length, "int8", variant, int8_kernel="cpu")
        encoders["int8 XLA layers"] = load(model, max_length, "int8", runnable[0], int8_kernel="xla")
        queries, docs, doc_query = bench.synthetic_texts(str(model), args.workload, args.count)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    tokenizer = encoders["float32"].tokenizer
    query_tokens = tokenizer.encode_queries(queries)
    doc_tokens = tokenizer.encode_docs([query_tokens[q] for q in doc_query], docs)

    def score(name):
        return encoders[name].score_tokens(query_tokens, doc_tokens, doc_query, batch_size=batch_size, progress=False)

    scores = {name: score(name) for name in encoders}  # also compiles every shape
    seconds = {name: [] for name in encoders}
    clock = time.process_time if args.cpu_time else time.perf_counter
    for _ in range(args.rounds):
        for name in encoders:
            start = clock()
            score(name)
            seconds[name].append(clock() - start)
    print(f"Machine: {bench.machine()}")
    spread = scores["float32"].max() - scores["float32"].min()
    unit = "CPU seconds (all threads)" if args.cpu_time else "wall seconds"
    print(f"{args.workload}, {len(docs)} documents, batch {batch_size}, {args.rounds} rounds, docs per {unit}")
    for name, times in seconds.items():
        ratio = np.median(np.divide(seconds["float32"], times))
        error = np.abs(scores[name] - scores["float32"]).max() / spread
        model = encoders[name].model
        print(f"  {name:>16} (attention {model.cpu_kernels}, int8 layers {model.int8_kernel}): docs/s per round "
              + " ".join(f"{len(docs) / t:.1f}" for t in times)
              + f"; / float32: {ratio:.2f}x; max |score - float32| / spread {error:.3f}")


if __name__ == "__main__":
    main()

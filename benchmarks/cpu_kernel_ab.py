"""The C++ CPU attention kernel against the XLA attention path, in one process.

    python benchmarks/cpu_kernel_ab.py [--workload passages|documents] [--count 256] [--rounds 5]

Loads the benchmark model of rerank_throughput.py twice (attention_impl "xla" and "cpu"), checks that both give
the same scores, then times full scoring passes of each in alternating rounds (so both see the same machine
speed) and prints docs/s per round and the median per-round speed-up.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import rerank_throughput as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(bench.WORKLOADS), default="passages")
    parser.add_argument("--count", type=int, default=256, help="documents to score")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from sce_jax.encoder import SparseCrossEncoder

    directory = Path(tempfile.mkdtemp(prefix="cpu-kernel-ab-"))
    try:
        bench.make_model_dir(directory / "model")
        max_length, batch_size, _ = bench.WORKLOADS[args.workload]
        encoders = {impl: SparseCrossEncoder.load(directory / "model", max_length=max_length, attention_impl=impl)
                    for impl in ("xla", "cpu")}
        queries, docs, doc_query = bench.synthetic_texts(str(directory / "model"), args.workload, args.count)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    tokenizer = encoders["xla"].tokenizer
    query_tokens = tokenizer.encode_queries(queries)
    doc_tokens = tokenizer.encode_docs([query_tokens[q] for q in doc_query], docs)

    def score(impl):
        return encoders[impl].score_tokens(query_tokens, doc_tokens, doc_query, batch_size=batch_size, progress=False)

    scores = {impl: score(impl) for impl in encoders}  # also compiles every shape
    seconds = {impl: [] for impl in encoders}
    for _ in range(args.rounds):
        for impl in encoders:
            start = time.perf_counter()
            score(impl)
            seconds[impl].append(time.perf_counter() - start)
    print(f"Machine: {bench.machine()}")
    print(f"{args.workload}, {len(docs)} documents; max |score difference| "
          f"{np.abs(scores['xla'] - scores['cpu']).max():.2e}")
    for impl, times in seconds.items():
        print(f"  {impl:>3}: docs/s per round " + " ".join(f"{len(docs) / t:.2f}" for t in times))
    print(f"  speed-up of cpu over xla, median of rounds: {np.median(np.divide(seconds['xla'], seconds['cpu'])):.2f}x")


if __name__ == "__main__":
    main()

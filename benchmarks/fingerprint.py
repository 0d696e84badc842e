"""The cost of `sce_jax.files.content_fingerprint` (what `--resume` and the training data caches compare) on a
kd-docpairs-shaped file of 40M pairs (~1.4 GB): `python benchmarks/fingerprint.py [--path FILE] [--pairs N]`.

The file is generated once; as root the page cache is dropped first, so the first timing is a cold read."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sce_jax.files import content_fingerprint


def generate(path: str, pairs: int, chunk: int = 1_000_000) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for start in range(0, pairs, chunk):
            n = min(chunk, pairs - start)
            columns = (rng.integers(0, 1_000_000, n), rng.integers(0, 8_800_000, n), rng.integers(0, 8_800_000, n),
                       rng.normal(size=n).round(3), rng.normal(size=n).round(3))
            f.write("".join(f"{q}\t{a}\t{b}\t{x}\t{y}\n" for q, a, b, x, y in zip(*columns)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", default="/tmp/sce-jax-fingerprint-pairs.tsv")
    parser.add_argument("--pairs", type=int, default=40_000_000)
    args = parser.parse_args()
    if not os.path.exists(args.path):
        generate(args.path, args.pairs)
    print(f"{args.path}: {os.path.getsize(args.path)} bytes")
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        print("page cache dropped")
    except OSError as error:
        print(f"page cache kept ({error.strerror})")
    for _ in range(3):
        started = time.perf_counter()
        fingerprint = content_fingerprint(args.path)
        print(f"content_fingerprint: {time.perf_counter() - started:.4f} s {fingerprint}")


if __name__ == "__main__":
    main()

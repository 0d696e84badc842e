"""`SparseCrossEncoder`: load a model and score documents for queries, in bucketed fixed-shape batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from sce_jax import distributed
from sce_jax.attention import resolve_attention_impl
from sce_jax.batch import (
    PACKED_SLOTS,
    Batch,
    Row,
    length_buckets,
    pack_documents,
    pack_rows,
    plan_batches,
    plan_slots,
    plan_steps,
)
from sce_jax.checkpoint import load_params, read_model_config, resolve_model_dir
from sce_jax.config import ATTENTION_IMPLS, DTYPE_NAMES, SparseCrossEncoderConfig
from sce_jax.errors import InputError, NonFiniteScoresError, SettingsError
from sce_jax.frames import frame_queries
from sce_jax.kernels import cpu_library
from sce_jax.model import SparseCrossEncoderModel
from sce_jax.quant import (calibrate, calibration_batch, dequantize_params, fused_int8_variant, int8_kernel_choice,
                           is_quantized, log_int8_path, quantize_params, with_packed_kernels)
from sce_jax.runs import rank_by_score
from sce_jax.tokenization import QueryDocTokenizer, check_lengths

# Compute dtypes by name. float32 multiplies in full float32 everywhere, GPUs included; tf32 is float32 whose matmuls
# may use TF32 tensor cores on GPU (faster, ~1e-3 relative error; the same as float32 on CPU); int8: int8 linear
# layers, float32 for the rest (sce_jax.quant, docs/int8.md).
DTYPES = {name: {"tf32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}.get(name, jnp.float32)
          for name in DTYPE_NAMES}
_MATMUL_PRECISION = {"tf32": "tensorfloat32"}  # the others: "highest" (full float32 for whatever is float32)

# How far one document's float32 score may move with its batch mates: a batch's shapes (document slots per row,
# query slots) set where each token sits in the model's flat token matrix, and XLA:CPU's
# matmuls then sum in another order. The change is float32 rounding carried through the layers, so it scales
# with the logits' size, not with the score itself (a score near 0 can change by ~1e-4 relative): scores of one
# document in any two batches agree to within BATCH_TOLERANCE * max(1, |score|). Measured (scratch runs of
# random batch compositions, 2-layer tiny model and MiniLM-L6, "cpu" and "xla" attention, O(1) logits):
# <= 1.6e-6 * max(1, |score|) on an AMX Xeon. There, fixing a row length's shapes (8 document slots,
# as many query slots as rows, the longest query length) made scores bit-identical, but costs ~13% more tokens
# for a query's passages (twice as many for a single pair), and another CPU's matmul kernels may split sums by
# other rules; hence a bound rather than invariance.
BATCH_TOLERANCE = 1e-5


def build_model(
    config: SparseCrossEncoderConfig,
    params: dict,
    *,
    dtype: str = "float32",
    attention_impl: str = "auto",
    interpret: bool = False,
) -> SparseCrossEncoderModel:
    """A model holding `params` (a pure parameter tree), without initialising random weights first.

    A bad `dtype` or `attention_impl` (or one this machine cannot run) is a SettingsError naming it.
    """
    check_compute_settings(dtype, attention_impl)
    try:
        impl = resolve_attention_impl(attention_impl)
    except RuntimeError as error:  # e.g. attention_impl='cpu' where the C++ kernel cannot be built
        raise SettingsError("attention_impl", str(error)) from None
    # The C++ kernels' build, chosen once here and kept by the model (`sce_jax.kernels.cpu_library`).
    cpu_kernels = cpu_library.selected() if impl == "cpu" else None
    int8_kernel = fused_int8_variant(impl, config.hidden_act) if dtype == "int8" else None
    abstract = nnx.eval_shape(
        lambda: SparseCrossEncoderModel(
            config, rngs=nnx.Rngs(0), dtype=DTYPES[dtype], attention_impl=impl, interpret=interpret,
            cpu_kernels=cpu_kernels, int8_kernel=int8_kernel,
            matmul_precision=_MATMUL_PRECISION.get(dtype, "highest"),
        )
    )
    if dtype == "int8":
        # The model keeps the kernels' build only beside the C++ attention (patterns it covers).
        params = with_packed_kernels(quantized_params(params, config), abstract.int8_kernel)
        log_int8_path(abstract.int8_kernel)
    else:
        params = dequantize_params(params)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def quantized_params(params: dict, config: SparseCrossEncoderConfig) -> dict:
    """`params` quantized to int8 (`sce_jax.quant.quantize_params`), smoothed by a float32 pass of the model over
    `calibration_batch` (`sce_jax.quant.calibrate`); int8 parameters come back unchanged."""
    if is_quantized(params):
        return params
    model = build_model(config, params, dtype="float32", attention_impl="auto")
    return quantize_params(params, calibrate(model, calibration_batch(config)))


def check_compute_settings(dtype: str, attention_impl: str, devices: int | None = None) -> None:
    """SettingsError (naming the setting) for an unknown dtype or attention_impl, or a device count this
    machine does not have."""
    if dtype not in DTYPES:
        raise SettingsError("dtype", f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if attention_impl not in ATTENTION_IMPLS:
        raise SettingsError(
            "attention_impl", f"unknown attention_impl {attention_impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}"
        )
    if dtype == "int8":
        int8_kernel_choice()
    if attention_impl in ("auto", "cpu"):
        cpu_library.selected()  # an InputError for a bad $SCE_JAX_CPU_KERNELS
    if problem := distributed.local_device_problem(devices):
        raise SettingsError("devices", f"devices={problem}")


def check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise SettingsError("batch_size", f"batch_size must be a positive integer, got {batch_size!r}")


def check_texts(name: str, texts) -> None:
    """A TypeError unless `texts` is a sequence (list, tuple, array) of strings: a string where a list belongs
    would otherwise be scored character by character."""
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__") or not hasattr(texts, "__getitem__"):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}" +
                        (f" {texts[:40]!r}" if isinstance(texts, (str, bytes)) else ""))
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(text).__name__}")


def maxp_chunk_starts(length: int, size: int) -> range:
    """Starts of the `size`-token chunks, overlapping by half, that cover `length` tokens (MaxP).

    Unlike the original, whose last chunk could end before the document does, the last chunk reaches the end.
    """
    stride = max(1, size // 2)
    return range(0, stride * (1 + max(0, -(-(length - size) // stride))), stride)


class WindowScores(NamedTuple):
    scores: np.ndarray  # float32, one per document
    truncated: int  # documents cut to fit max_length with their query (0 with MaxP)


class ModelCardData:
    """Where sentence-transformers' evaluators store their results on a model (`model.model_card_data.
    set_evaluation_metrics(evaluator, metrics, epoch, step)`), kept as its `CrossEncoderModelCardData` keeps them:
    each evaluator's last metrics, and per step the primary metrics. sce_jax writes no model card from them."""

    def __init__(self):
        self.eval_results_dict: dict[Any, dict[str, Any]] = {}
        self.training_logs: list[dict[str, Any]] = []

    def set_evaluation_metrics(self, evaluator: Any, metrics: Mapping[str, Any], epoch: int = 0, step: int = 0) -> None:
        self.eval_results_dict[evaluator] = dict(metrics)
        parts = getattr(evaluator, "evaluators", None) or [evaluator]  # a SequentialEvaluator: its parts' metrics
        primary = {getattr(part, "primary_metric", None) for part in parts} - {None}
        logged = {key: value for key, value in metrics.items() if key in primary}
        if not logged:
            return
        if self.training_logs and self.training_logs[-1]["Step"] == step:
            self.training_logs[-1].update(logged)
        else:
            self.training_logs.append({"Epoch": epoch, "Step": step, **logged})


def load_for_command(model: str | Path, **settings) -> SparseCrossEncoder:
    """`SparseCrossEncoder.load(model, **settings)` for the commands: a setting it rejects is an InputError naming
    its flag (`--max-length: ...`), a model that cannot be read one naming the model."""
    try:
        return SparseCrossEncoder.load(model, **settings)
    except SettingsError as error:
        raise InputError(f"--{error.setting.replace('_', '-')}: {error}") from None
    except InputError:
        raise
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load model {str(model)!r}: {error}") from None


class SparseCrossEncoder:
    """A loaded re-ranker: tokenizer + model + a jitted, shape-bucketed scoring loop."""

    # sentence-transformers' CrossEncoder attributes that its evaluators read: one output (a relevance logit).
    num_labels = 1

    def __init__(
        self, model: SparseCrossEncoderModel, tokenizer: QueryDocTokenizer, *, source: str = "", devices: int | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        if problem := distributed.local_device_problem(devices):
            raise ValueError(f"devices={problem}")
        local = jax.local_devices()
        # Data parallelism: document slots are split over a 1-D mesh; parameters and queries are replicated.
        self.mesh = Mesh(np.array(local[: devices or len(local)]), ("docs",))
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
        # A step stacks one batch per device (queries and documents); `doc_query` indexes the device's own queries.
        self._forward = jax.jit(
            jax.shard_map(
                lambda state, batch: nnx.merge(graphdef, state)(batch),
                mesh=self.mesh,
                in_specs=(P(), Batch(P("docs"), P("docs"), P("docs"), P("docs"))),
                out_specs=P("docs"),
                # Pallas kernels in interpret mode do not annotate varying manual axes; outputs vary anyway.
                check_vma=False,
            )
        )
        # Distinct batch shapes run or compiled ahead (`compile_tokens`) so far; each one cost an XLA compilation.
        self.compiled_shapes: set[tuple] = set()
        # What sentence-transformers' evaluators write to (see ModelCardData).
        self.model_card_data = ModelCardData()

    def set_params(self, params: dict) -> None:
        """Score with `params` from now on: a pure parameter tree of this model's shapes (e.g. a training step's,
        as host arrays). The jitted scoring function is kept, so nothing is traced or compiled again."""
        graphdef, state = nnx.split(self.model)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dequantize_params(params)))
        self.model = nnx.merge(graphdef, state)
        self._state = jax.device_put(state, NamedSharding(self.mesh, P()))

    @property
    def config(self) -> SparseCrossEncoderConfig:
        return self.model.config

    @classmethod
    def load(
        cls,
        path_or_hub_id: str | Path,
        *,
        max_length: int | None = None,
        max_query_length: int = 32,
        attention_impl: str = "auto",
        dtype: str = "float32",
        interpret: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        devices: int | None = None,
    ) -> SparseCrossEncoder:
        """Load a converted directory, a training output directory, a Hugging Face directory or a hub id.

        A relative path is relative to the working directory (`~` is expanded). `max_length` (tokens per
        query-document input) defaults to the model's positions (`max_position_embeddings`: 512 or 4096 for the
        released models). `config_overrides` changes the attention pattern (e.g. {"attention_window_size": 4,
        ...}) so a full cross-encoder can be run or fine-tuned as a sparse one. `devices`: how many local devices
        to split documents over (default: all).

        Settings are checked before the weights are read: a bad one is a `SettingsError` whose `setting` names
        it; a model that cannot be found or read is an `InputError`.
        """
        check_compute_settings(dtype, attention_impl, devices)
        if max_length is not None:
            check_lengths(max_length, max_query_length)
        directory = resolve_model_dir(path_or_hub_id)
        config = read_model_config(directory)
        if config_overrides:
            unknown = sorted(set(config_overrides) - set(SparseCrossEncoderConfig.__dataclass_fields__))
            if unknown:
                raise SettingsError("config_overrides", f"unknown config field(s) {', '.join(unknown)}")
            try:
                config = config.replace(**config_overrides)
            except InputError as error:
                raise SettingsError("config_overrides", str(error)) from None
        if max_length is None:
            max_length = config.max_position_embeddings
        if max_length > config.max_position_embeddings:
            raise SettingsError(
                "max_length",
                f"max_length {max_length} exceeds the model's {config.max_position_embeddings} positions "
                "(extend them with `python -m sce_jax.convert --extend-positions`)",
            )
        check_lengths(max_length, max_query_length)
        tokenizer = QueryDocTokenizer.from_dir(directory, max_length=max_length, max_query_length=max_query_length)
        if tokenizer.vocab_size > config.vocab_size:  # larger ids would silently read clamped embeddings
            raise InputError(
                f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, but config.json's vocab_size is "
                f"{config.vocab_size}"
            )
        params = load_params(directory, config)
        model = build_model(config, params, dtype=dtype, attention_impl=attention_impl, interpret=interpret)
        return cls(model, tokenizer, source=str(path_or_hub_id), devices=devices)

    def score(self, query: str, docs: Sequence[str], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """float32 logits of `docs` (a list of strings) for `query`, in input order."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        check_texts("docs", docs)
        return self.score_pairs([query], docs, [0] * len(docs), batch_size=batch_size, progress=progress)

    def score_pairs(
        self,
        queries: Sequence[str],
        docs: Sequence[str],
        doc_query: Sequence[int],
        *,
        batch_size: int = 32,
        max_p: bool = False,
        progress: bool = True,
    ) -> np.ndarray:
        """Scores of `docs[i]` for `queries[doc_query[i]]`; each query is tokenized (and encoded) once.

        A document longer than fits in max_length with its query is truncated, or with `max_p` split into
        chunks that overlap by half (`maxp_chunk_starts`) and scored by its best chunk, as the original's MaxP.
        """
        return self.score_window(queries, docs, doc_query, batch_size=batch_size, max_p=max_p,
                                 progress=progress).scores

    def score_window(
        self,
        queries: Sequence[str],
        docs: Sequence[str],
        doc_query: Sequence[int],
        *,
        batch_size: int = 32,
        max_p: bool = False,
        progress: bool = False,
        on_step: Callable[[], None] | None = None,
    ) -> WindowScores:
        """`score_pairs`, also counting truncated documents; `on_step` is called after every step (it may raise to
        stop after the batch in flight)."""
        check_texts("queries", queries)
        check_texts("docs", docs)
        check_batch_size(batch_size)
        if not len(docs):
            return WindowScores(np.zeros(0, np.float32), 0)
        query_tokens = self.tokenizer.encode_queries(queries)
        doc_query = np.asarray(doc_query, np.int64)
        pieces = self.tokenizer.encode_docs([query_tokens[q] for q in doc_query], docs, truncate=False)
        sep = self.tokenizer.sep_token_id
        budgets = [self.tokenizer.doc_budget(query_tokens[q]) for q in doc_query.tolist()]
        if not max_p:
            truncated = sum(len(ids) > size for ids, size in zip(pieces, budgets))
            doc_tokens = [ids[:size] + [sep, sep] for ids, size in zip(pieces, budgets)]
            del pieces
            scores = self.score_tokens(query_tokens, doc_tokens, doc_query, batch_size=batch_size,
                                       progress=progress, on_step=on_step)
            return WindowScores(scores, int(truncated))
        chunks, chunk_doc = [], []
        for doc, (ids, size) in enumerate(zip(pieces, budgets)):
            for start in maxp_chunk_starts(len(ids), size):
                chunks.append(ids[start : start + size] + [sep, sep])
                chunk_doc.append(doc)
        del pieces
        chunk_scores = self.score_tokens(
            query_tokens, chunks, doc_query[chunk_doc], batch_size=batch_size, progress=progress, on_step=on_step
        )
        scores = np.full(len(docs), -np.inf, np.float32)
        np.maximum.at(scores, chunk_doc, chunk_scores)
        return WindowScores(scores, 0)

    def rerank(
        self, frame: pd.DataFrame, *, batch_size: int = 32, max_p: bool = False, progress: bool = True
    ) -> pd.DataFrame:
        """Re-rank a PyTerrier-style frame (`qid`, `query`, `docno`, `text`, one row per document).

        Returns its rows with `score` (float32 logits) and `rank` (from 0, as PyTerrier numbers them), sorted by
        query (in order of first appearance) and descending score; equal scores keep their input order. A qid
        whose rows carry different query texts, or a row without qid, docno, query or text, is a ValueError.
        """
        doc_query, queries = frame_queries(frame)
        if frame.empty:
            return frame.assign(score=pd.Series(dtype=np.float32), rank=pd.Series(dtype=np.int64))
        scores = self.score_pairs(
            queries, frame["text"].tolist(), doc_query, batch_size=batch_size, max_p=max_p, progress=progress
        )
        return rank_by_score(frame.assign(score=scores), first_rank=0)

    def score_tokens(
        self,
        query_tokens: Sequence[Sequence[int]],
        doc_tokens: Sequence[Sequence[int]],
        doc_query: Sequence[int],
        *,
        batch_size: int = 32,
        max_tokens_per_batch: int = 32768,
        progress: bool = True,
        on_step: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """The batched scoring loop over encoded tokens (see QueryDocTokenizer for their layout).

        Documents go into rows (`pack_documents`): with the sparse pattern, several documents of one query share
        a row, back to back, so little compute goes to padding; otherwise (full attention, a query that sees the
        documents, the Pallas kernel) each document has its own row. Rows are batched by length, rows of the
        same query together so a batch needs few query slots. Shapes come from a small fixed set: row length
        from `length_buckets`, document slots per row and query slots a power of two (one each per row length),
        rows: about `batch_size` documents (a power of two of rows; fewer for long rows, so a batch holds at most
        `max_tokens_per_batch` tokens; for the last batch of a length, the smallest power of two that holds its
        rows). A document's score depends on its batch and row mates only through float32 rounding (other shapes
        reorder float sums): within `BATCH_TOLERANCE * max(1, |score|)`. With several devices, each device scores
        whole batches, so scores are bit-identical for any device count.
        """
        scores = np.zeros(len(doc_tokens), np.float32)
        bar = tqdm(total=len(doc_tokens), unit="doc", desc="scoring", disable=not progress, smoothing=0.1)
        steps = self._steps(query_tokens, doc_tokens, doc_query, batch_size, max_tokens_per_batch)
        for step, arrays, num_rows, slots in steps:
            self.compiled_shapes.add(tuple(a.shape for a in arrays))
            step_scores = np.asarray(self._forward(self._state, arrays)).reshape(self.mesh.size, num_rows, slots)
            for batch, device_scores in zip(step, step_scores):
                for row, row_scores in zip(batch, device_scores):
                    scores[row.docs] = row_scores[: len(row.docs)]
            bar.update(sum(len(row.docs) for batch in step for row in batch))
            if on_step is not None:
                on_step()
        bar.close()
        self._check_finite(scores)
        return scores

    def compile_tokens(self, query_tokens, doc_tokens, doc_query, *, batch_size=32, max_tokens_per_batch=32768) -> int:
        """Compile, without running them, the batch shapes that `score_tokens` with the same arguments would run
        (XLA's compilation, or a read from jax's persistent compilation cache where it is on); returns how many
        were new. A later `score_tokens` of those shapes compiles nothing. The server's warm-up uses it: running
        its larger batches would cost as much as compiling them, or more where the cache has them."""
        new = 0
        for _, arrays, _, _ in self._steps(query_tokens, doc_tokens, doc_query, batch_size, max_tokens_per_batch):
            shapes = tuple(a.shape for a in arrays)
            if shapes not in self.compiled_shapes:
                self._forward.lower(self._state, arrays).compile()
                self.compiled_shapes.add(shapes)
                new += 1
        return new

    def _steps(self, query_tokens, doc_tokens, doc_query, batch_size: int, max_tokens_per_batch: int):
        """(the step's batches of rows, one per device; the step's stacked arrays; rows per device; document
        slots per row) of `score_tokens`, in order."""
        check_batch_size(batch_size)
        if len(doc_tokens) == 0:
            return
        doc_query = np.asarray(doc_query, np.int64)
        if doc_query.min() < 0 or doc_query.max() >= len(query_tokens):
            raise ValueError(f"doc_query refers to queries outside 0..{len(query_tokens) - 1}")
        max_length = self.tokenizer.max_length
        lengths = np.array([len(t) for t in doc_tokens])
        too_long = np.flatnonzero(1 + np.array([len(query_tokens[q]) for q in doc_query]) + lengths > max_length)
        if too_long.size:
            raise ValueError(f"documents {too_long[:5].tolist()} exceed max_length {max_length} with their query")
        cfg = self.config
        packed = (cfg.query_is_shared and cfg.attention_window_size is not None
                  and self.model.attention_impl not in ("pallas", "triton"))
        rows: list[Row] = pack_documents(
            lengths, doc_query, length_buckets(max_length, step=16), max_slots=PACKED_SLOTS if packed else 1
        )
        query_length = -(-max(len(t) for t in query_tokens) // 8) * 8
        batches = plan_batches(rows, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch)
        slots, query_slots = plan_slots(batches)
        # With several devices, each scores one batch per step, exactly as a single device would (same shapes,
        # same batch mates), so scores do not depend on the device count. Steps hold batches of one length.
        num_devices = self.mesh.size
        for step, length, num_rows in plan_steps(batches, num_devices):
            parts = []
            for batch in step + [[]] * (num_devices - len(step)):
                queries, row_query = np.unique(np.array([row.query for row in batch], np.int64), return_inverse=True)
                parts.append(pack_rows(
                    [query_tokens[q] for q in queries],
                    [[doc_tokens[i] for i in row.docs] for row in batch],
                    row_query,
                    query_length=query_length,
                    row_length=length,
                    slots=slots[length],
                    num_queries=query_slots[length],
                    num_rows=num_rows,
                    pad_id=cfg.pad_token_id,
                ))
            yield step, Batch(*(np.concatenate(fields) for fields in zip(*parts))), num_rows, slots[length]

    def _check_finite(self, scores: np.ndarray) -> None:
        """NonFiniteScoresError (an InputError: exit 2 from the commands) naming the model, if any score is NaN or
        infinite: such scores are never written or returned."""
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        if bad:
            raise NonFiniteScoresError(f"model {self.source!r} gave non-finite scores (NaN or infinity) for {bad} of "
                                       f"{len(scores)} documents: its weights are probably damaged")

    # --- sentence-transformers-style API (`sentence_transformers.CrossEncoder.predict` / `.rank`) ---------------

    def predict(
        self,
        inputs: Sequence[Sequence[str]] | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Any = None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        max_p: bool = False,
    ) -> Any:
        """Scores of (query, document) pairs, as `sentence_transformers.CrossEncoder.predict`.

        `inputs`: a list of `(query, document)` pairs, or one pair (then one score is returned). Same argument
        names, order and return shapes as sentence-transformers: a float32 numpy array of shape (len(inputs),)
        (`convert_to_tensor=True`: a JAX array; `convert_to_numpy=False`: a list of float32 scalars). Scores are
        this model's raw logits, as `score` gives them (sentence-transformers applies the model's stored
        activation, a sigmoid when none is stored); `activation_fn` (a function of a numpy array) maps them.
        `apply_softmax` only acts on multi-label models in sentence-transformers; here (one label) it is a no-op.
        Pairs that share a query are scored with one query encoding. `max_p`: see `score_pairs`.
        """
        if prompt_name is not None or prompt is not None:
            raise ValueError("prompts are not supported: sparse cross-encoders take the query as it is")
        check_batch_size(batch_size)
        if isinstance(inputs, (str, bytes)):
            raise TypeError(f"inputs must be a list of (query, document) pairs, got a string {inputs[:40]!r}")
        single = isinstance(inputs, (list, tuple)) and len(inputs) > 0 and isinstance(inputs[0], str)
        pairs = [inputs] if single else list(inputs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"inputs[{i}] is not a (query, document) pair of strings: {pair!r:.80}")
        query_ids: dict[str, int] = {}
        doc_query = [query_ids.setdefault(query, len(query_ids)) for query, _ in pairs]
        scores = np.zeros(0, np.float32)
        if pairs:
            scores = self.score_pairs(list(query_ids), [doc for _, doc in pairs], doc_query, batch_size=batch_size,
                                      max_p=max_p, progress=bool(show_progress_bar))
        if activation_fn is not None:
            scores = np.asarray(activation_fn(scores), np.float32)
        if convert_to_tensor:
            result = jnp.asarray(scores)
        elif convert_to_numpy:
            result = scores
        else:
            result = list(scores)
        return result[0] if single else result

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Any = None,
        apply_softmax: bool | None = False,
        *,
        max_p: bool = False,
    ) -> list[dict[str, Any]]:
        """`documents` ranked for `query`, as `sentence_transformers.CrossEncoder.rank`.

        Returns `[{"corpus_id": i, "score": float, "text"?: documents[i]}, ...]` by descending score (equal
        scores keep input order), the first `top_k` if given; `text` only with `return_documents`.
        """
        check_texts("documents", documents)
        scores = self.predict([(query, doc) for doc in documents], prompt_name=prompt_name, prompt=prompt,
                              batch_size=batch_size, show_progress_bar=show_progress_bar,
                              activation_fn=activation_fn, apply_softmax=apply_softmax, max_p=max_p)
        order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
        results = []
        for i in order[:top_k].tolist():
            results.append({"corpus_id": i, "score": float(scores[i])})
            if return_documents:
                results[-1]["text"] = documents[i]
        return results

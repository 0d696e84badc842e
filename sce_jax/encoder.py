"""`SparseCrossEncoder`: load a model and score documents for queries, in bucketed fixed-shape batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

from sce_jax.attention import resolve_attention_impl
from sce_jax.batch import Batch, bucket_length, length_buckets, pack_rows
from sce_jax.checkpoint import load_model_dir
from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.model import SparseCrossEncoderModel
from sce_jax.quant import dequantize_params, quantize_params
from sce_jax.runs import rank_by_score
from sce_jax.tokenization import QueryDocTokenizer

# int8: int8 linear layers, float32 for the rest (sce_jax.quant, docs/int8.md).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


def build_model(
    config: SparseCrossEncoderConfig,
    params: dict,
    *,
    dtype: str = "float32",
    attention_impl: str = "auto",
    interpret: bool = False,
) -> SparseCrossEncoderModel:
    """A model holding `params` (a pure parameter tree), without initialising random weights first.

    dtype "int8" quantizes the linear layers' weights here, unless `params` already holds int8 weights (a
    directory converted with `--quantize int8`); other dtypes run such weights dequantized."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    params = quantize_params(params, config) if dtype == "int8" else dequantize_params(params)
    abstract = nnx.eval_shape(
        lambda: SparseCrossEncoderModel(
            config,
            rngs=nnx.Rngs(0),
            dtype=DTYPES[dtype],
            attention_impl=resolve_attention_impl(attention_impl),
            interpret=interpret,
        )
    )
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def maxp_chunk_starts(length: int, size: int) -> range:
    """Starts of the `size`-token chunks, overlapping by half, that cover `length` tokens (MaxP).

    Unlike the original, whose last chunk could end before the document does, the last chunk reaches the end.
    """
    stride = max(1, size // 2)
    return range(0, stride * (1 + max(0, -(-(length - size) // stride))), stride)


# Documents per row when short documents are packed together: enough to fill rows with passages (~4 per row of
# 304 tokens) while the [CLS] slots, computed whether filled or not, stay a small part of a row.
PACKED_SLOTS = 8
# Rows of packed documents are at least this long (then rounded up to a length bucket).
PACKED_ROW_LENGTH = 256


class Row(NamedTuple):
    length: int  # padded row length
    query: int
    docs: list[int]  # document indices, in row order


def pack_documents(
    lengths: np.ndarray, doc_query: np.ndarray, buckets: Sequence[int], *, max_slots: int
) -> list[Row]:
    """Rows of documents, sorted by (length, query).

    With `max_slots` 1, each document has its own row, padded to its length bucket. Otherwise each query's
    documents, longest first, go into the first of its rows with room and a free slot (first-fit decreasing);
    the query's rows are as long as the bucket of its longest document, and at least `PACKED_ROW_LENGTH`.
    """
    rows = []
    if max_slots == 1:
        rows = [Row(bucket_length(n, buckets), int(q), [i]) for i, (n, q) in enumerate(zip(lengths, doc_query))]
    else:
        for query in dict.fromkeys(doc_query.tolist()):
            docs = np.flatnonzero(doc_query == query)
            docs = docs[np.argsort(-lengths[docs], kind="stable")]
            length = bucket_length(max(int(lengths[docs[0]]), min(PACKED_ROW_LENGTH, buckets[-1])), buckets)
            free, members = [], []
            for doc in docs.tolist():
                n = lengths[doc]
                target = next((r for r, room in enumerate(free) if room >= n and len(members[r]) < max_slots), None)
                if target is None:
                    free.append(length)
                    members.append([])
                    target = len(free) - 1
                free[target] -= n
                members[target].append(doc)
            rows += [Row(length, query, m) for m in members]
    return sorted(rows, key=lambda row: (row.length, row.query))


class SparseCrossEncoder:
    """A loaded re-ranker: tokenizer + model + a jitted, shape-bucketed scoring loop."""

    def __init__(
        self, model: SparseCrossEncoderModel, tokenizer: QueryDocTokenizer, *, source: str = "", devices: int | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        local = jax.local_devices()
        if devices is not None and not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices}, but there are {len(local)} local devices")
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
        # Distinct batch shapes run so far; each one cost an XLA compilation.
        self.compiled_shapes: set[tuple] = set()

    @property
    def config(self) -> SparseCrossEncoderConfig:
        return self.model.config

    @classmethod
    def load(
        cls,
        path_or_hub_id: str | Path,
        *,
        max_length: int = 512,
        max_query_length: int = 32,
        attention_impl: str = "auto",
        dtype: str = "float32",
        interpret: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        devices: int | None = None,
    ) -> SparseCrossEncoder:
        """Load a converted directory, a training output directory, a Hugging Face directory or a hub id.

        `config_overrides` changes the attention pattern (e.g. {"attention_window_size": 4, ...}) so a full
        cross-encoder can be run or fine-tuned as a sparse one. `devices`: how many local devices to split
        documents over (default: all).
        """
        config, params, directory = load_model_dir(path_or_hub_id)
        if config_overrides:
            config = config.replace(**config_overrides)
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's {config.max_position_embeddings} positions "
                "(extend them with convert_torch_checkpoint.py --extend-positions)"
            )
        tokenizer = QueryDocTokenizer.from_dir(directory, max_length=max_length, max_query_length=max_query_length)
        model = build_model(config, params, dtype=dtype, attention_impl=attention_impl, interpret=interpret)
        return cls(model, tokenizer, source=str(path_or_hub_id), devices=devices)

    def score(self, query: str, docs: Sequence[str], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """float32 logits of `docs` for `query`, in input order."""
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
        query_tokens = self.tokenizer.encode_queries(queries)
        doc_query = np.asarray(doc_query, np.int64)
        if not max_p:
            doc_tokens = self.tokenizer.encode_docs([query_tokens[q] for q in doc_query], docs)
            return self.score_tokens(query_tokens, doc_tokens, doc_query, batch_size=batch_size, progress=progress)
        pieces = self.tokenizer.encode_docs([query_tokens[q] for q in doc_query], docs, truncate=False)
        sep = self.tokenizer.sep_token_id
        chunks, chunk_doc = [], []
        for doc, (q, ids) in enumerate(zip(doc_query, pieces)):
            size = self.tokenizer.doc_budget(query_tokens[q])
            for start in maxp_chunk_starts(len(ids), size):
                chunks.append(ids[start : start + size] + [sep, sep])
                chunk_doc.append(doc)
        chunk_scores = self.score_tokens(
            query_tokens, chunks, doc_query[chunk_doc], batch_size=batch_size, progress=progress
        )
        scores = np.full(len(docs), -np.inf, np.float32)
        np.maximum.at(scores, chunk_doc, chunk_scores)
        return scores

    def rerank(
        self, frame: pd.DataFrame, *, batch_size: int = 32, max_p: bool = False, progress: bool = True
    ) -> pd.DataFrame:
        """Re-rank a PyTerrier-style frame (`qid`, `query`, `docno`, `text`, one row per document).

        Returns its rows with `score` (float32 logits) and `rank` (from 0, as PyTerrier numbers them), sorted by
        query (in order of first appearance) and descending score; equal scores keep their input order.
        """
        missing = [c for c in ("qid", "query", "docno", "text") if c not in frame]
        if missing:
            raise ValueError(f"frame lacks column(s) {', '.join(missing)}")
        no_text = frame[frame[["query", "text"]].isna().any(axis=1)]
        if len(no_text):
            raise ValueError(f"rows without query or text, e.g. qid {no_text.qid.iloc[0]} docno {no_text.docno.iloc[0]}")
        doc_query, _ = pd.factorize(frame["qid"])
        queries = frame.drop_duplicates("qid")["query"].tolist()
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
    ) -> np.ndarray:
        """The batched scoring loop over encoded tokens (see QueryDocTokenizer for their layout).

        Documents go into rows (`pack_documents`): with the sparse pattern, several documents of one query share
        a row, back to back, so little compute goes to padding; otherwise (full attention, a query that sees the
        documents, the Pallas kernel) each document has its own row. Rows are batched by length, rows of the
        same query together so a batch needs few query slots. Shapes come from a small fixed set: row length
        from `length_buckets`, document slots per row and query slots a power of two (one each per row length),
        rows: about `batch_size` documents (a power of two of rows; fewer for long rows, so a batch holds at most
        `max_tokens_per_batch` tokens; for the last batch of a length, the smallest power of two that holds its
        rows). A document's score does not depend on its batch or row mates (other shapes reorder float sums:
        differences ~1e-7 relative, never more); with several devices, each device scores whole batches, so
        scores are bit-identical for any device count.
        """
        num_docs = len(doc_tokens)
        scores = np.zeros(num_docs, np.float32)
        if num_docs == 0:
            return scores
        doc_query = np.asarray(doc_query, np.int64)
        if doc_query.min() < 0 or doc_query.max() >= len(query_tokens):
            raise ValueError(f"doc_query refers to queries outside 0..{len(query_tokens) - 1}")
        max_length = self.tokenizer.max_length
        lengths = np.array([len(t) for t in doc_tokens])
        too_long = np.flatnonzero(1 + np.array([len(query_tokens[q]) for q in doc_query]) + lengths > max_length)
        if too_long.size:
            raise ValueError(f"documents {too_long[:5].tolist()} exceed max_length {max_length} with their query")
        cfg = self.config
        packed = cfg.query_is_shared and cfg.attention_window_size is not None and self.model.attention_impl != "pallas"
        rows = pack_documents(
            lengths, doc_query, length_buckets(max_length, step=16), max_slots=PACKED_SLOTS if packed else 1
        )
        query_length = -(-max(len(t) for t in query_tokens) // 8) * 8

        row_lengths = np.array([row.length for row in rows])
        # Rows per batch, per row length: about `batch_size` documents (a power of two of rows).
        docs_per_row = {length: np.mean([len(row.docs) for row in rows if row.length == length])
                        for length in set(row_lengths.tolist())}
        batches = []  # (rows, row slots)
        start = 0
        while start < len(rows):
            length = rows[start].length
            left = np.searchsorted(row_lengths, length, side="right") - start
            full = min(_power_of_two_at_most(batch_size / docs_per_row[length]),
                       _power_of_two_at_most(max_tokens_per_batch // length))
            # The last batch of a length gets the fewest (power-of-two) rows that hold its rows, so rare lengths
            # do not pad to a full batch: a few more shapes, much less wasted compute.
            size = min(full, _power_of_two_at_least(left))
            batches.append((rows[start : start + min(size, left)], size))
            start += min(size, left)
        # Document slots per row and query slots: one count per row length, so a batch's shapes do not depend on
        # its neighbours.
        slots, query_slots = {}, {}
        for batch, _ in batches:
            length = batch[0].length
            slots[length] = max(slots.get(length, 1), _power_of_two_at_least(max(len(row.docs) for row in batch)))
            needed = _power_of_two_at_least(len({row.query for row in batch}))
            query_slots[length] = max(query_slots.get(length, 1), needed)
        # With several devices, each scores one batch per step, exactly as a single device would (same shapes,
        # same batch mates), so scores do not depend on the device count. Steps hold batches of one length.
        num_devices = self.mesh.size
        steps = []  # (batches, row length, row slots)
        for batch, size in batches:
            shape = (batch[0].length, size)
            if steps and len(steps[-1][0]) < num_devices and steps[-1][1:] == shape:
                steps[-1][0].append(batch)
            else:
                steps.append(([batch], *shape))

        bar = tqdm(total=num_docs, unit="doc", desc="scoring", disable=not progress, smoothing=0.1)
        for step, length, num_rows in steps:
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
            arrays = Batch(*(np.concatenate(fields) for fields in zip(*parts)))
            self.compiled_shapes.add(tuple(a.shape for a in arrays))
            step_scores = np.asarray(self._forward(self._state, arrays)).reshape(num_devices, num_rows, slots[length])
            for batch, device_scores in zip(step, step_scores):
                for row, row_scores in zip(batch, device_scores):
                    scores[row.docs] = row_scores[: len(row.docs)]
            bar.update(sum(len(row.docs) for batch in step for row in batch))
        bar.close()
        return scores

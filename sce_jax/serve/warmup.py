"""Compile the common batch shapes before the server reports ready, so that first requests do not pay for it.

The documented example request (README and docs/serve.md) goes through the server's own path (tokenization, the
batcher, scoring). Then passages and documents of several lengths, alone and in groups, are tokenized the same way
and their batch shapes compiled without being run (`SparseCrossEncoder.compile_tokens`, with the batcher's own
arguments): running the larger ones took longer than compiling them, and on a restart, where JAX's persistent
compilation cache has them, most of the warm-up. Its texts are fixed, so every start compiles the same shapes.
"""

from __future__ import annotations

import logging
import time

from sce_jax.serve.batcher import Batcher, group_arguments
from sce_jax.serve.checks import ServeSettings
from sce_jax.serve.tokens import prepare

logger = logging.getLogger("sce_jax.serve")

# The request of the curl examples in README.md and docs/serve.md (a test checks that they still send it).
EXAMPLE_QUERY = "how do bees make honey"
EXAMPLE_TEXTS = ("Bees turn nectar into honey.", "Wasps build nests.")


def warm_up_requests(max_length: int, settings: ServeSettings) -> list[tuple[str, str, list[str]]]:
    """(what, query, documents) of each warm-up request, the documented example first."""
    requests = [("the documented example (2 passages)", EXAMPLE_QUERY, list(EXAMPLE_TEXTS))]
    lengths = sorted({n for n in (24, 48, 96, 160, 256, 384, max_length) if n <= max_length})
    # "a" is one wordpiece in BERT vocabularies; other tokenizers land on other lengths, which is harmless.
    # Two full batches per length compile the full-batch shapes; 1 and 8 documents some of the partial ones.
    for count in sorted({min(n, settings.max_batch_docs) for n in (1, 8, 2 * settings.batch_size)}):
        for length in lengths:
            docs = [" ".join(["a"] * (length - 8 - i % 7)) for i in range(count)]
            requests.append((f"{count} document{'s' * (count > 1)} of ~{length} tokens", "warm up", docs))
    return requests


def warm_up(encoder, batcher: Batcher, settings: ServeSettings) -> float:
    """Score the documented example through the batcher, then compile the other warm-up requests' batch shapes,
    one request after the other, logging each; returns the seconds it took."""
    start = time.monotonic()
    requests = warm_up_requests(encoder.tokenizer.max_length, settings)
    for n, (what, query, docs) in enumerate(requests, 1):
        before = len(encoder.compiled_shapes)
        logger.info("warm-up %d/%d: %s", n, len(requests), what)
        if n == 1:
            batcher.admit(len(docs))
            try:
                prepared = prepare(encoder.tokenizer, query, docs, max_p=settings.max_p)
            except BaseException:
                batcher.withdraw(len(docs))
                raise
            batcher.submit(prepared).future.result()
        else:
            prepared = prepare(encoder.tokenizer, query, docs, max_p=settings.max_p)
            encoder.compile_tokens(*group_arguments([prepared]), batch_size=settings.batch_size)
        logger.debug("warm-up %d/%d: %d new batch shapes", n, len(requests), len(encoder.compiled_shapes) - before)
    return time.monotonic() - start

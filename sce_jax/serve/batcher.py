"""Dynamic batching: tokenized requests queue; one worker thread scores them in groups."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from sce_jax.errors import NonFiniteScoresError
from sce_jax.serve.checks import ServeSettings
from sce_jax.serve.tokens import Prepared

logger = logging.getLogger("sce_jax.serve")


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


@dataclasses.dataclass(eq=False)
class Job:
    prepared: Prepared
    future: concurrent.futures.Future
    arrived: float

    @property
    def docs(self) -> int:
        return self.prepared.num_docs


def take_group(sizes: Sequence[int], max_docs: int) -> int:
    """How many of the queued jobs (document counts `sizes`, in arrival order) the next scoring call takes:
    the longest prefix within `max_docs` documents, and at least one job."""
    total, count = 0, 0
    for size in sizes:
        if count and total + size > max_docs:
            break
        total += size
        count += 1
    return count


def group_arguments(group: Sequence[Prepared]) -> tuple[list, list, list[int]]:
    """`score_tokens`'s (query tokens, rows, each row's query) for the requests of `group`, each with its own
    query (so each request's rows are packed as they would be alone)."""
    rows = [row for prepared in group for row in prepared.rows]
    row_query = [q for q, prepared in enumerate(group) for _ in prepared.rows]
    return [prepared.query_tokens for prepared in group], rows, row_query


def score_group(encoder, group: Sequence[Prepared], batch_size: int) -> list[np.ndarray]:
    """One `score_tokens` call for the requests of `group`; the scores of each request's documents."""
    scores = encoder.score_tokens(*group_arguments(group), batch_size=batch_size, progress=False)
    results, start = [], 0
    for prepared in group:
        results.append(prepared.doc_scores(scores[start : start + len(prepared.rows)]))
        start += len(prepared.rows)
    return results


class Batcher:
    """Scores queued requests in groups on one worker thread.

    A request is first admitted (`admit`: its documents count against `max_queue_docs` from then on, while it is
    tokenized), then queued (`submit`). A group is the longest prefix of the queue within `max_batch_docs`
    documents (at least one request); an idle worker waits up to `max_wait_ms` after the first request for more
    to arrive. A queued request whose client has gone is dropped (`cancel`) and never scored.
    `on_group(docs, requests, seconds)` is called after each scoring call.
    """

    def __init__(self, encoder, settings: ServeSettings,
                 on_group: Callable[[int, int, float], None] | None = None):
        self.encoder = encoder
        self.settings = settings
        self.on_group = on_group
        self._jobs: collections.deque[Job] = collections.deque()
        self._admitted_docs = 0  # admitted, not yet queued (being tokenized)
        self._queued_docs = 0
        self._scoring_docs = 0
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sce-jax-batcher", daemon=True)
        self._thread.start()

    @property
    def queued_docs(self) -> int:
        return self._queued_docs

    @property
    def admitted_docs(self) -> int:
        return self._admitted_docs

    @property
    def scoring_docs(self) -> int:
        return self._scoring_docs

    def admit(self, docs: int) -> None:
        """Reserve queue room for `docs` documents: QueueFull beyond `max_queue_docs`, Closed when closing."""
        with self._cond:
            if self._closing:
                raise Closed()
            if self._admitted_docs + self._queued_docs + docs > self.settings.max_queue_docs:
                raise QueueFull()
            self._admitted_docs += docs

    def withdraw(self, docs: int) -> None:
        """Give back the room of admitted documents that will not be submitted."""
        with self._cond:
            self._admitted_docs -= docs

    def submit(self, prepared: Prepared) -> Job:
        """Queue an admitted request; its `future` gets the documents' scores (float32, input order)."""
        job = Job(prepared, concurrent.futures.Future(), time.monotonic())
        with self._cond:
            if self._closing:  # the documents stay admitted: the caller withdraws them
                raise Closed()
            self._admitted_docs -= job.docs
            self._jobs.append(job)
            self._queued_docs += job.docs
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job that is still queued (True); one being scored runs on (False)."""
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            self._queued_docs -= job.docs
        job.future.cancel()
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, score the queued ones, stop the worker; False if it is still scoring after `timeout`."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_group(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._closing:
                self._cond.wait()
            if not self._jobs:
                return None
            deadline = self._jobs[0].arrived + self.settings.max_wait_ms / 1000
            while (self._queued_docs < self.settings.max_batch_docs and not self._closing
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            if not self._jobs:  # all cancelled while waiting
                return []
            count = take_group([job.docs for job in self._jobs], self.settings.max_batch_docs)
            group = [self._jobs.popleft() for _ in range(count)]
            docs = sum(job.docs for job in group)
            self._queued_docs -= docs
            self._scoring_docs = docs
            return group

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            group = [job for job in group if job.future.set_running_or_notify_cancel()]
            if not group:
                continue
            start = time.perf_counter()
            try:
                scores = score_group(self.encoder, [job.prepared for job in group], self.settings.batch_size)
            except Exception as error:  # every request of the group gets the error (a 500)
                if isinstance(error, NonFiniteScoresError):
                    logger.error("scoring failed: %s", error)
                else:
                    logger.exception("scoring failed")
                for job in group:
                    job.future.set_exception(error)
            else:
                for job, job_scores in zip(group, scores):
                    job.future.set_result(job_scores)
            finally:
                self._scoring_docs = 0
            if self.on_group is not None:
                self.on_group(sum(job.docs for job in group), len(group), time.perf_counter() - start)

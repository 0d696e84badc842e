"""Re-rank a run with a sparse cross-encoder: `python -m sce_jax.rerank --model M --run INPUT --output RUN`.

INPUT is a JSON/JSONL run with texts (the original's format), a TREC run whose texts come from local files
or an ir_datasets dataset (given, or inferred from the file name), or an ir_datasets id with scoreddocs.
Settings come from a YAML file (`--config`), then from flags; see configs/rerank.yaml and docs/rerank.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sce_jax import distributed, irds
from sce_jax.cache import enable_compilation_cache
from sce_jax.cli_config import PATH, PATH_OR_ID, add_dataclass_flags, resolve_dataclass
from sce_jax.config import ATTENTION_IMPLS, DTYPE_NAMES
from sce_jax.errors import EXIT_SIGINT, EXIT_SIGTERM, InputError, Interrupted, run_cli, user_path
from sce_jax.evaluation import DEFAULT_MEASURES, evaluate, format_results, parse_measures, read_qrels, write_results
from sce_jax.files import (
    atomic_write,
    check_readable,
    content_fingerprint,
    exclusive_lock,
    interrupts_exit_at_once,
    remove_stale_temporaries,
)
from sce_jax.progress import ProgressFile, settings_difference
from sce_jax.runs import (
    CompactRun,
    compact_from_frame,
    format_score,
    is_json_run,
    read_json_run,
    read_trec_run_compact,
)
from sce_jax.texts import RunTexts

logger = logging.getLogger("sce_jax.rerank")
_IMPORTED = time.perf_counter()  # about when the command started: "first score after ... s" counts from here


@dataclasses.dataclass
class RerankConfig:
    run: str | None = None
    output: str | None = None
    model: str = "webis/sparse-cross-encoder-4-512"
    depth: int = 100
    batch_size: int = 32
    max_length: int | None = None
    max_query_length: int = 32
    max_p: bool = False
    qrels: str | None = None
    measures: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MEASURES))
    dataset: str | None = None
    queries: str | None = None
    docs: str | None = None
    devices: int | None = None
    attention_impl: str = "auto"
    dtype: str = "float32"
    run_tag: str = "sce_jax"
    eval_output: str | None = None
    window: int = 2048
    resume: bool = False
    progress: bool = True
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


HELP = {
    "run": "input: JSON/JSONL run (optionally .gz), TREC run, or ir_datasets id with scoreddocs",
    "output": "re-ranked TREC run to write (.gz: compressed)",
    "model": "converted sce_jax directory, Hugging Face directory, or hub id",
    "depth": "documents per query taken from the input (by input rank, then score); 0 keeps all",
    "batch_size": "documents per forward pass",
    "max_length": "tokens per query-document input ([CLS] + query + document); default: the model's positions",
    "max_query_length": "query wordpieces + 2 [SEP]",
    "max_p": "score over-long documents by their best 50%%-overlapping chunk (MaxP) instead of truncating",
    "qrels": "TREC qrels file for evaluation (default: the dataset's qrels, if any)",
    "measures": "ir_measures measures",
    "dataset": "ir_datasets id for texts and qrels (default: inferred from a TREC run's file name)",
    "queries": "TSV file qid<TAB>text with the query texts",
    "docs": "TSV (docno<TAB>text) or JSONL file with the document texts (indexed once, see docs/rerank.md)",
    "devices": "local devices to split documents over (default: all)",
    "attention_impl": "attention implementation: auto (the C++ kernel on CPU, xla where it cannot be loaded; xla on "
                      "GPU and other backends, never pallas or triton), cpu, xla, dense, pallas or triton",
    "dtype": "float32, tf32 (float32 with TF32 matmuls on GPU), bfloat16 or int8 (int8 linear layers, docs/int8.md)",
    "run_tag": "tag in the output run's last column",
    "eval_output": "JSON file for the evaluation results (default: OUTPUT.eval.json)",
    "window": "documents scored (and saved to the progress file) at a time, whole queries",
    "resume": "continue an interrupted run from its progress file (OUTPUT.progress)",
    "progress": "show a progress bar",
    "coordinator": "multi-host: the coordinator's host:port (jax.distributed); default: the cluster's environment",
    "num_processes": "multi-host: number of processes",
    "process_id": "multi-host: this process's index",
}

# Settings that name files: in a config file, relative to its folder (cli_config.relative_to_config).
CONFIG_PATHS = {"run": PATH_OR_ID, "output": PATH, "model": PATH_OR_ID, "qrels": PATH, "queries": PATH,
                "docs": PATH, "eval_output": PATH}

# Settings that change the output's bytes: a resumed run must have the same (compared by flag name).
SCORE_SETTINGS = ("depth", "batch_size", "max_length", "max_query_length", "max_p", "dtype", "attention_impl",
                  "run_tag", "window")


def load_config(path: str | None, overrides: dict) -> RerankConfig:
    """Defaults, then the YAML file's values, then `overrides` (flags)."""
    config = resolve_dataclass(RerankConfig, path, overrides, InputError, CONFIG_PATHS)
    for name in ("run", "output"):
        if getattr(config, name) is None:
            raise InputError(f"no {name} given (--{name} or '{name}:' in the config)")
    for name in ("depth", "batch_size", "max_length", "max_query_length", "devices", "window", "num_processes",
                 "process_id"):
        value = getattr(config, name)
        lowest = 0 if name in ("depth", "process_id") else 1
        if value is not None and value < lowest:
            raise InputError(f"--{_flag(name)} must be {'>= 0' if lowest == 0 else 'positive'}, got {value}")
    if config.dtype not in DTYPE_NAMES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {config.dtype!r}")
    if config.attention_impl not in ATTENTION_IMPLS:
        raise InputError(f"--attention-impl must be one of {', '.join(ATTENTION_IMPLS)}, got {config.attention_impl!r}")
    if not config.run_tag or any(c.isspace() for c in config.run_tag):
        raise InputError(f"--run-tag {config.run_tag!r} must be a non-empty word without whitespace")
    if config.max_length is not None and config.max_length < config.max_query_length + 4:
        raise InputError(f"--max-length {config.max_length} leaves no room for documents after "
                         f"--max-query-length {config.max_query_length}")
    if config.max_query_length < 3:
        raise InputError(f"--max-query-length must be >= 3, got {config.max_query_length}")
    return config


def _flag(name: str) -> str:
    return name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sce-jax-rerank", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    add_dataclass_flags(parser, RerankConfig, HELP)
    return parser


# --- checks before any work ----------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_writable_target(path: Path, flag: str, inputs: dict[str, Path]) -> None:
    """`path` can be written: not a directory, its directory exists and is writable, it is no input."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory")
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        raise InputError(f"{flag} {path}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: directory {target.parent} is not writable")
    for input_flag, input_path in inputs.items():
        if input_path.exists() and _same_file(path, input_path):
            raise InputError(f"{flag} {path} is the {input_flag} file: it would be overwritten")


def check_paths(config: RerankConfig) -> RerankConfig:
    """User paths made absolute; inputs exist and are readable; outputs writable and distinct from the inputs."""
    paths = {}
    for name in ("output", "queries", "docs", "qrels", "eval_output"):
        value = getattr(config, name)
        paths[name] = None if value is None else str(user_path(value))
    run = config.run
    run_path = user_path(run)
    if run_path.exists():
        check_readable(run_path, "run file")
        run = str(run_path)
    elif not irds.is_dataset_id(run):
        raise irds.UnknownDatasetError(f"run {run!r} is neither a file nor a known ir_datasets id")
    config = dataclasses.replace(config, run=run, **paths)
    for name, what in (("queries", "queries file"), ("docs", "documents file"), ("qrels", "qrels file")):
        if getattr(config, name) is not None:
            check_readable(Path(getattr(config, name)), what)
    for name in ("queries", "docs"):  # indexed, then read line by line at their offsets
        value = getattr(config, name)
        if value is not None and not Path(value).is_file():
            raise InputError(f"--{name} {value} is not a regular file (a pipe?): its lines are looked up by offset, "
                             "so save it to a file first")
    inputs = {f"--{_flag(name)}": Path(getattr(config, name)) for name in ("run", "queries", "docs", "qrels")
              if getattr(config, name) is not None and Path(getattr(config, name)).exists()}
    _check_writable_target(Path(config.output), "--output", inputs)
    _check_writable_target(Path(eval_output_path(config)), "--eval-output",
                           {**inputs, "--output": Path(config.output)})
    return config


def eval_output_path(config: RerankConfig) -> str:
    return config.eval_output or f"{config.output}.eval.json"


# --- input ---------------------------------------------------------------------------------------------------


def load_input(config: RerankConfig) -> tuple[CompactRun, RunTexts, str | None, str | None]:
    """The run to re-rank (depth-cut while read), its texts (checked to exist), its ir_datasets id, if any, and
    the run file's content hash (blake2b, computed while it is read; None for an ir_datasets run)."""
    depth = config.depth or None
    path = Path(config.run)
    digest = hashlib.blake2b(digest_size=16)
    if path.exists():
        if is_json_run(path):
            run = compact_from_frame(read_json_run(path, digest), depth)
        else:
            run = read_trec_run_compact(path, depth, digest)
        dataset_id = config.dataset
        texts_missing = run.query_texts is None or None in run.query_texts or run.doc_texts is None or any(
            t is None for t in run.doc_texts)
        local_texts = config.queries is not None and config.docs is not None
        if dataset_id is None and texts_missing and not local_texts:
            dataset_id = irds.infer_dataset_id(path)
    else:
        if not irds.is_dataset_id(config.run):
            raise irds.UnknownDatasetError(f"run {config.run!r} is neither a file nor a known ir_datasets id")
        dataset_id = config.dataset or config.run
        run = irds.dataset_run_compact(config.run, depth)
        digest = None
    if dataset_id is not None:
        irds.load_dataset(dataset_id)
    if not len(run):
        raise InputError(f"{config.run}: the run is empty")
    texts = RunTexts(run, source=config.run, queries_file=config.queries, docs_file=config.docs,
                     dataset_id=dataset_id)
    return run, texts, dataset_id, None if digest is None else digest.hexdigest()


def load_qrels(config: RerankConfig, dataset_id: str | None):
    if config.qrels is not None:
        return read_qrels(config.qrels)
    if dataset_id is not None and irds.load_dataset(dataset_id).has_qrels():
        return irds.dataset_qrels(dataset_id)
    return None


def load_encoder(config: RerankConfig):
    """The model; settings it rejects (`SettingsError`, raised before the weights are read) name their flag."""
    from sce_jax.encoder import load_for_command  # imports JAX: only once the input has been checked

    if problem := distributed.local_device_problem(config.devices):  # before loading, in the flag's words
        raise InputError(f"--devices {problem}")
    return load_for_command(config.model, max_length=config.max_length, max_query_length=config.max_query_length,
                            attention_impl=config.attention_impl, dtype=config.dtype, devices=config.devices)


# --- planning: windows of whole queries, shares of windows per process (pure) ---------------------------------


def plan_windows(query_bounds: np.ndarray, window_docs: int) -> list[tuple[int, int]]:
    """Consecutive queries grouped into windows of about `window_docs` documents (at least one query each):
    (first query, end query) pairs. `query_bounds`: each query's first row and the end (as CompactRun gives)."""
    windows, start = [], 0
    num_queries = len(query_bounds) - 1
    while start < num_queries:
        end = int(np.searchsorted(query_bounds, query_bounds[start] + window_docs, "right")) - 1
        end = min(max(end, start + 1), num_queries)
        windows.append((start, end))
        start = end
    return windows


def share_windows(window_sizes: Sequence[int], num_processes: int, process_id: int) -> range:
    """The contiguous range of windows process `process_id` scores: shares of about equal document counts."""
    total = np.concatenate([[0], np.cumsum(window_sizes)])
    cuts = [int(np.searchsorted(total[1:], total[-1] * p / num_processes, "right")) if p else 0
            for p in range(num_processes + 1)]
    cuts[-1] = len(window_sizes)
    cuts = np.maximum.accumulate(cuts)
    return range(int(cuts[process_id]), int(cuts[process_id + 1]))


def window_payload(run: CompactRun, bounds: np.ndarray, first: int, end: int, scores: np.ndarray, tag: str) -> bytes:
    """The TREC lines of queries first..end-1, each ranked by descending score (ties: first-stage order)."""
    lines = []
    offset = bounds[first]
    for q in range(first, end):
        start, stop = int(bounds[q]), int(bounds[q + 1])
        s = scores[start - offset : stop - offset]
        order = np.lexsort((np.arange(len(s)), -s))
        docnos = run.docnos(start, stop)
        qid = run.qids[q]
        lines += [f"{qid} Q0 {docnos[i]} {rank} {format_score(s[i])} {tag}\n" for rank, i in
                  enumerate(order.tolist(), start=1)]
    return "".join(lines).encode("utf-8")


# --- progress, fingerprints, processes -------------------------------------------------------------------------


def _file_fingerprint(path: str | None, *, content: bool = True):
    """A file's path and content fingerprint (`files.content_fingerprint`; with `content=False` its size only, for
    the run, whose content hash is taken while it is read); a directory's files' names, sizes and modification
    times (a model); anything else (a hub or ir_datasets id) as it is."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return path
    if p.is_dir():
        digest = hashlib.blake2b(digest_size=12)
        for root, dirs, files in sorted(os.walk(p)):
            dirs.sort()
            for name in sorted(files):
                stat = (Path(root) / name).stat()
                digest.update(f"{os.path.relpath(Path(root) / name, p)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return {"path": str(p.resolve()), "files": digest.hexdigest()}
    if not content or not p.is_file():  # a pipe's content is hashed while it is read
        return {"path": str(p.resolve()), "size": p.stat().st_size}
    return {"path": str(p.resolve()), **content_fingerprint(p)}


def settings_fingerprint(config: RerankConfig, num_processes: int, process_id: int,
                         run_content: str | None = None) -> dict:
    """What decides the output's bytes, by flag name (`--resume` requires it unchanged). The run file's content
    hash (`run_content`, from `load_input`) is added once the run has been read."""
    settings = {f"--{_flag(name)}": getattr(config, name) for name in SCORE_SETTINGS}
    for name in ("model", "run", "queries", "docs"):
        settings[f"--{name}"] = _file_fingerprint(getattr(config, name), content=name != "run")
    if run_content is not None and isinstance(settings["--run"], dict):
        settings["--run"]["blake2b"] = run_content
    settings["--dataset"] = config.dataset
    settings["--num-processes"] = num_processes
    settings["--process-id"] = process_id
    return settings


def _refuse_changed_settings(progress_file: Path, settings: dict) -> None:
    """Before the heavy reading: `--resume` with settings (all but the run's content) that differ is an error."""
    saved = ProgressFile.read(progress_file, records=False)
    if saved is None:
        return
    then = {**saved.settings}
    if isinstance(then.get("--run"), dict):
        then["--run"] = {k: v for k, v in then["--run"].items() if k != "blake2b"}
    difference = settings_difference(then, settings)
    if difference:
        raise InputError(f"--resume: {difference}; run with the interrupted run's settings, or delete {progress_file} "
                         "to start over")


def progress_path(output: str, num_processes: int, process_id: int) -> Path:
    name = f"{output}.progress" if num_processes == 1 else f"{output}.progress.{process_id}-of-{num_processes}"
    return Path(name)


def lock_path(output: str, num_processes: int, process_id: int) -> Path:
    """The lock a process holds while it runs: process 0 (or the only one) writes the output and locks it
    (`OUTPUT.lock`, so two runs on one output exclude each other whatever their process counts); each other
    process locks its own progress file."""
    if process_id == 0:
        return Path(f"{output}.lock")
    return Path(f"{progress_path(output, num_processes, process_id)}.lock")


def initialize_processes(config: RerankConfig) -> tuple[int, int]:
    """Join a jax.distributed job when asked (flags) or when the cluster's environment says so; (count, index)."""
    if config.coordinator is not None or config.num_processes not in (None, 1):
        if config.coordinator is None or config.num_processes is None or config.process_id is None:
            raise InputError("multi-host re-ranking needs --coordinator, --num-processes and --process-id together "
                             "(or none of them, inside a cluster job JAX detects)")
        if config.process_id >= config.num_processes:
            raise InputError(f"--process-id {config.process_id} must be below --num-processes "
                             f"{config.num_processes}")
    return distributed.initialize(config.coordinator, config.num_processes, config.process_id)


class _Stop(Exception):
    """Raised after the batch in flight once SIGINT/SIGTERM arrived."""


class _Signals:
    """SIGINT/SIGTERM ask to stop after the batch in flight, instead of killing the process."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def check(self) -> None:
        if self.received is not None:
            raise _Stop

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- the command -------------------------------------------------------------------------------------------


def rerank(config: RerankConfig) -> int:
    """Re-rank, write the run, and evaluate if there are qrels; returns the exit status."""
    config = check_paths(config)
    measures = parse_measures(config.measures)
    with interrupts_exit_at_once():  # starting JAX's backend writes nothing (see _rerank_locked)
        num_processes, process_id = initialize_processes(config)
    lock = lock_path(config.output, num_processes, process_id)
    with exclusive_lock(lock, f"--output {config.output}"):  # a second run on this output stops here
        progress_file = progress_path(config.output, num_processes, process_id)
        for path in [progress_file] + ([config.output, eval_output_path(config)] if process_id == 0 else []):
            remove_stale_temporaries(path)
        ProgressFile.check_absent_or_resuming(progress_file, config.resume)
        if config.resume:  # refuse early, before the heavy reading and the model
            _refuse_changed_settings(progress_file, settings_fingerprint(config, num_processes, process_id))
        # Every process passes these in this order; one that fails releases the others at its next (one line each).
        barriers = distributed.Barriers(("sce_jax_rerank_scored", "sce_jax_rerank_written"), config.output,
                                        num_processes, process_id)
        with barriers.failing():
            return _rerank_locked(config, measures, barriers, progress_file, lock)


def _rerank_locked(config, measures, barriers: distributed.Barriers, progress_file: Path, lock: Path) -> int:
    num_processes, process_id = barriers.num_processes, barriers.process_id
    started = time.perf_counter()
    run, texts, dataset_id, run_content = load_input(config)
    settings = settings_fingerprint(config, num_processes, process_id, run_content)
    qrels = load_qrels(config, dataset_id)
    bounds = run.query_bounds()
    windows = plan_windows(bounds, config.window)
    window_sizes = [int(bounds[e] - bounds[s]) for s, e in windows]
    mine = share_windows(window_sizes, num_processes, process_id)
    logger.info("re-ranking %d documents of %d queries in %d windows (read in %.1f s)%s", len(run), len(run.qids),
                len(windows), time.perf_counter() - started,
                f"; process {process_id} of {num_processes} takes windows {mine.start}..{mine.stop - 1}"
                if num_processes > 1 else "")

    # Loading writes nothing, and an interrupt raised inside JAX's C++ callbacks could abort the process: an
    # interrupt here ends the process at once.
    with interrupts_exit_at_once(cleanup=lambda: lock.unlink(missing_ok=True)):
        encoder = load_encoder(config)
    progress = ProgressFile.open(progress_file, settings, mine.start, resume=config.resume)
    try:
        if len(progress.done) > len(mine):
            raise InputError(f"{progress_file} holds {len(progress.done)} windows, but this process's share has "
                             f"{len(mine)}; delete it to start over")
        code = _score_windows(config, encoder, run, texts, bounds, windows, mine, progress, barriers.check)
    except BaseException:
        _discard_if_empty(progress)
        raise
    finally:
        progress.close()
        texts.close()
    if code:  # stopped by a signal
        _discard_if_empty(progress)
        barriers.fail("stopped by a signal")
        return code
    logger.info("%d distinct batch shapes were compiled", len(encoder.compiled_shapes))

    barriers.wait()  # every share scored
    if process_id == 0:
        truncated = _write_output(config, windows, progress, num_processes)
        logger.info("wrote %s", config.output)
        if truncated and not config.max_p:
            logger.warning("%d of %d documents were longer than the max length (%d tokens with their query) and were "
                           "truncated; --max-p scores them by their best chunk instead", truncated, len(run),
                           encoder.tokenizer.max_length)
        if qrels is not None:
            _evaluate(config, run, qrels, measures)
    barriers.wait()  # the output written
    return 0


def _discard_if_empty(progress: ProgressFile) -> None:
    """A progress file this run started and saved nothing to is removed: a failed or stopped first window
    leaves nothing behind."""
    progress.close()
    if progress.created and not progress.done:
        progress.path.unlink(missing_ok=True)


def _score_windows(config, encoder, run, texts, bounds, windows, mine, progress: ProgressFile,
                   check: Callable[[], None]) -> int:
    """Score this process's windows not yet saved; `check` runs after every batch (it raises to stop: another
    process failed). Returns 0, or the exit status after SIGINT/SIGTERM."""
    from tqdm.auto import tqdm

    todo = [k for k in mine if k not in progress.done]
    docs_total = int(sum(bounds[windows[k][1]] - bounds[windows[k][0]] for k in mine))
    docs_done = docs_total - int(sum(bounds[windows[k][1]] - bounds[windows[k][0]] for k in todo))
    queries_total = sum(windows[k][1] - windows[k][0] for k in mine)
    queries_done = queries_total - sum(windows[k][1] - windows[k][0] for k in todo)
    if docs_done:
        logger.info("resuming: %d of %d queries already done", queries_done, queries_total)
    bar = tqdm(total=docs_total, initial=docs_done, unit="doc", desc="re-ranking", disable=not config.progress,
               smoothing=0.05, dynamic_ncols=True)
    bar.set_postfix_str(f"queries {queries_done}/{queries_total}")
    first_score_logged = False
    try:
        with _Signals() as signals:
            def on_step():
                nonlocal first_score_logged
                if not first_score_logged:
                    logger.info("first batch scored %.1f s after start", time.perf_counter() - _IMPORTED)
                    first_score_logged = True
                signals.check()
                check()

            for k in todo:
                first, end = windows[k]
                start, stop = int(bounds[first]), int(bounds[end])
                docs = texts.docs(start, stop)
                doc_query = run.query[start:stop] - first
                result = encoder.score_window(texts.queries[first:end], docs, doc_query,
                                              batch_size=config.batch_size, max_p=config.max_p,
                                              on_step=on_step)
                del docs
                payload = window_payload(run, bounds, first, end, result.scores, config.run_tag)
                progress.append(k, payload, docs=stop - start, queries=end - first, truncated=result.truncated)
                queries_done += end - first
                bar.update(stop - start)
                bar.set_postfix_str(f"queries {queries_done}/{queries_total}")
                signals.check()
    except _Stop:
        bar.close()
        name = "SIGINT" if signals.received == signal.SIGINT else "SIGTERM"
        if progress.created and not progress.done:
            print(f"stopped ({name}) before any query was saved; nothing was written", file=sys.stderr)
        else:
            print(f"stopped ({name}): {queries_done} of {queries_total} queries are saved in {progress.path}; run "
                  "the same command with --resume to continue", file=sys.stderr)
        return EXIT_SIGINT if signals.received == signal.SIGINT else EXIT_SIGTERM
    bar.close()
    return 0


def _write_output(config: RerankConfig, windows, progress: ProgressFile, num_processes: int) -> int:
    """The output from every process's saved windows, in window order, written atomically; then the progress
    files are removed. Returns the count of truncated documents. Fails (the progress kept) on a full disk."""
    parts = [progress] + [ProgressFile.read(progress_path(config.output, num_processes, p))
                          for p in range(1, num_processes)]
    resume = f"the scored windows are kept in {progress.path}: run the same command with --resume to write it"
    try:
        truncated = _assemble(config.output, windows, parts)
    except Interrupted as error:
        raise Interrupted(error.signum, f"{error.detail}; {resume}") from None
    except InputError as error:
        raise InputError(f"{error}; {resume}") from None
    for part in parts:
        part.path.unlink()
    return truncated


def _assemble(output: str, windows, parts: list[ProgressFile | None]) -> int:
    truncated = 0
    with atomic_write(output, "wb") as f:
        for k in range(len(windows)):
            part = next((p for p in parts if p is not None and k in p.done), None)
            if part is None:
                raise InputError(f"window {k} is in none of the progress files "
                                 f"({', '.join(str(p.path) for p in parts if p is not None)})")
            f.write(part.payload(k))
            truncated += int(part.done[k][2].get("truncated", 0))
    return truncated


def _evaluate(config: RerankConfig, run: CompactRun, qrels, measures) -> dict | None:
    # The input run is evaluated in its first-stage order (the order the depth cut left it in).
    # Both runs go to ir_measures in pieces of whole queries: memory stays bounded at 7M rows.
    bounds = run.query_bounds()
    position = np.arange(len(run)) - bounds[run.query]
    first_stage = run.frames(scores=-position.astype(float))
    reranked = read_trec_run_compact(config.output, None).frames()
    results = evaluate(qrels, {"input": first_stage, "reranked": reranked}, measures)
    if not results or not any(results.values()):
        logger.warning("none of the run's queries have qrels: nothing to evaluate")
        return None
    print(format_results(results))
    write_results(eval_output_path(config), results)
    logger.info("wrote %s", eval_output_path(config))
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sce_jax").setLevel(logging.INFO)
    args = vars(build_parser().parse_args(argv))
    return rerank(load_config(args.pop("config", None), args))


def cli() -> None:
    """The `sce-jax-rerank` console script (and `python -m sce_jax.rerank`)."""
    enable_compilation_cache()  # compiled programs are reused by the next run (docs/architecture.md)
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()

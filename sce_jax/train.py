"""Fine-tuning: `python -m sce_jax.train --config configs/train.yaml [--flag value ...]`.

The optimizer step is one jitted pure function over a global batch that a `Mesh` with one `data` axis splits
across devices (and hosts). `train` is a short loop around it that hands the step's results to three objects:
`MetricsLog` (metrics.jsonl, TensorBoard, the progress bar), `CheckpointStore` (sce_jax.train_checkpoints) and
`Evaluator` (re-ranks a validation run). See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from sce_jax import distributed
from sce_jax.batch import Batch
from sce_jax.cache import enable_compilation_cache
from sce_jax.checkpoint import CHECKPOINTS_DIR, copy_tokenizer_files, load_model_dir
from sce_jax.cli_config import PATH, PATH_OR_ID, add_dataclass_flags, resolve_dataclass
from sce_jax.config import PATTERN_FLAGS, SparseCrossEncoderConfig, released_pattern
from sce_jax.encoder import DTYPES, SparseCrossEncoder, build_model
from sce_jax.losses import LOSSES, REDUCTIONS, loss_sum_count
from sce_jax.errors import InputError, Interrupted, run_cli, user_path
from sce_jax.files import (DeferredSignals, atomic_write, deferred_signals, exclusive_lock, interrupts_exit_at_once,
                           is_write_error, sigterm_raises, write_error)
from sce_jax.tokenization import TOKENIZER_FILES, QueryDocTokenizer
from sce_jax.train_checkpoints import (CheckpointsOnDisk, CheckpointStore, TrainState, host_copy, remove_unfinished,
                                       set_aside, warn)
from sce_jax.train_data import BatchStream, TrainBatch, TrainDataError, load_samples
from sce_jax.weights import CheckpointError

SCHEDULES = ("constant", "linear")
# The released models' attention pattern (the config defaults), and a standard cross-encoder's.
PATTERNS = {
    "sparse": {flag: released_pattern()[flag] for flag in PATTERN_FLAGS},  # flags only: the window is separate
    "full": dict.fromkeys(PATTERN_FLAGS, True),
}
RESOLVED_CONFIG = "train_config.yaml"
# Settings that name files: in a config file, relative to its folder (cli_config.relative_to_config).
CONFIG_PATHS = {"model": PATH_OR_ID, "train_data": PATH_OR_ID, "queries": PATH, "docs": PATH, "output_dir": PATH,
                "eval_run": PATH, "eval_qrels": PATH}
METRICS = "metrics.jsonl"


class ConfigError(InputError):
    pass


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training option; YAML keys and command-line flags (`--learning-rate`) share these names."""

    model: str = "cross-encoder/ms-marco-MiniLM-L-6-v2"
    attention_window: int | str | None = None  # an int, "full" (no window), or None: keep the model's
    attention_pattern: str | None = None  # "sparse" or "full", or None: keep the model's
    attention_impl: str = "auto"
    train_data: str = "msmarco-passage/train/kd-docpairs"
    queries: str | None = None  # with a local pairs file: the queries' texts (TSV or JSONL, .gz too)
    docs: str | None = None  # with a local pairs file: the documents' texts (TSV or JSONL, .gz too)
    output_dir: str = "runs/train"
    steps: int = 100_000
    batch_size: int = 32  # global, over all devices and hosts
    grad_accum: int = 1
    learning_rate: float = 7e-6
    warmup_steps: int = 1000
    schedule: str = "constant"  # after warm-up: constant, or linear decay to 0 at `steps`
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the original used
    max_grad_norm: float | None = None
    loss: str = "margin-mse"
    loss_reduction: str = "batch"  # "batch": the original's means over terms; "sample": mean of per-sample losses
    max_length: int = 512
    max_query_length: int = 32
    save_every: int = 5000
    keep_checkpoints: int = 3
    devices: int | None = None  # local devices per host; None: all
    seed: int = 42
    resume: bool = False
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    dropout: float | None = None  # overrides the model's dropout probabilities (hidden and attention); None: keep
    attention_dropout: float | None = None  # overrides the attention-probability dropout alone (after `dropout`)
    log_every: int = 1
    eval_run: str | None = None
    eval_qrels: str | None = None
    eval_every: int = 5000
    eval_measure: str = "nDCG@10"
    eval_depth: int = 100
    tensorboard: bool = False

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        for name in ("steps", "batch_size", "grad_accum", "max_length", "max_query_length", "save_every",
                     "keep_checkpoints", "log_every", "eval_every", "eval_depth"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.loss in LOSSES, f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        need(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        need(self.dtype != "int8", "dtype int8 is for inference only (docs/int8.md); train in float32 or bfloat16")
        need(self.attention_pattern in (None, *PATTERNS), f"attention_pattern must be one of {', '.join(PATTERNS)}")
        need(self.attention_window in (None, "full") or isinstance(self.attention_window, int),
             f"attention_window must be an int, 'full' or null, got {self.attention_window!r}")
        need(self.devices is None or self.devices >= 1, f"devices must be >= 1, got {self.devices}")
        need(self.loss_reduction in REDUCTIONS,
             f"unknown loss_reduction {self.loss_reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            need(value is None or 0 <= value < 1, f"{name} must be in [0, 1), got {value}")
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        need((self.eval_run is None) == (self.eval_qrels is None), "eval_run and eval_qrels go together")

    @property
    def model_overrides(self) -> dict:
        overrides = dict(PATTERNS[self.attention_pattern]) if self.attention_pattern else {}
        if self.attention_window is not None:
            overrides["attention_window_size"] = None if self.attention_window == "full" else self.attention_window
        if self.dropout is not None:
            overrides.update(hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout)
        if self.attention_dropout is not None:
            overrides["attention_probs_dropout_prob"] = self.attention_dropout
        return overrides


HELP = {
    "model": "starting model: a converted sce_jax directory, a training output directory, a Hugging Face "
             "directory or hub id",
    "attention_window": "attention window in tokens, or 'full' (no window); default: the model's",
    "attention_pattern": "'sparse' (the released pattern) or 'full' (all edges); default: the model's",
    "attention_impl": "attention implementation: auto, xla, pallas, cpu (see docs/kernels.md)",
    "train_data": "training data: a JSONL file of samples, a TSV file of pairs (qid, docid_a, docid_b[, score_a, "
                  "score_b]; needs --queries and --docs), or an ir_datasets id with docpairs",
    "queries": "with a pairs file: the queries' texts (qid<TAB>text TSV, or JSONL; .gz too)",
    "docs": "with a pairs file: the documents' texts (docno<TAB>text TSV, or JSONL; .gz too)",
    "output_dir": "where config, tokenizer, checkpoints and metrics.jsonl go (relative paths and ~ work)",
    "steps": "optimizer steps to train for (in total, counting steps before a resume)",
    "batch_size": "samples per optimizer step, over all devices and hosts",
    "grad_accum": "micro-batches per step (gradient accumulation); divides --batch-size",
    "learning_rate": "AdamW's peak learning rate",
    "warmup_steps": "linear warm-up steps from 0 to --learning-rate",
    "schedule": "after warm-up: constant, or linear decay to 0 at --steps",
    "weight_decay": "AdamW's decoupled weight decay",
    "max_grad_norm": "clip gradients to this global norm; none: no clipping",
    "loss": "margin-mse, ranknet, listnet, listmle, approx-ndcg or localized-contrastive",
    "loss_reduction": "batch: the original's means (RankNet over all valid pairs of the batch, ListMLE over all "
                      "real list positions, MarginMSE over complete samples); sample: the mean of per-sample losses",
    "max_length": "tokens of [CLS] + query + document",
    "max_query_length": "tokens of the query",
    "save_every": "steps between checkpoints (the last step is always saved)",
    "keep_checkpoints": "how many checkpoints to keep",
    "devices": "local devices per host; default: all",
    "seed": "seed of the data order and dropout",
    "resume": "continue from the newest complete checkpoint in --output-dir (a fresh start if there is none)",
    "dtype": "compute dtype, float32, tf32 (float32 with TF32 matmuls on GPU) or bfloat16 (parameters and "
             "optimizer state stay float32)",
    "dropout": "override the model's dropout probabilities, hidden states and attention probabilities; "
               "default: the model's (0.1 in BERT configs)",
    "attention_dropout": "override the attention-probability dropout alone (after --dropout); default: the model's",
    "log_every": "steps between lines of metrics.jsonl",
    "eval_run": "a run (TREC or JSON) to re-rank for validation; needs --eval-qrels",
    "eval_qrels": "the qrels of --eval-run",
    "eval_every": "steps between validations (and the last step)",
    "eval_measure": "the validation measure (ir_measures syntax, e.g. nDCG@10)",
    "eval_depth": "documents per query of --eval-run to re-rank",
    "tensorboard": "also write TensorBoard events to OUTPUT_DIR/tensorboard",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sce-jax-train", description="Fine-tune a sparse cross-encoder "
                                     "(see docs/training.md). Flags override the --config YAML file.")
    parser.add_argument("--config", help="YAML file of options; flags override it")
    add_dataclass_flags(parser, TrainConfig, {
        name: f"{text} (default: {field.default})"
        for field in dataclasses.fields(TrainConfig) for name, text in [(field.name, HELP[field.name])]
    })
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the YAML file, then the flags given."""
    flags = dict(vars(args))
    return resolve_dataclass(TrainConfig, flags.pop("config", None), flags, ConfigError, CONFIG_PATHS)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, then constant or linear decay to 0 at the last step (as transformers' schedules)."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.steps - cfg.warmup_steps, 1))
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


def make_loss_and_grad(graphdef, loss_name: str, loss_reduction: str = "batch"):
    """`f(params, batch, dropout_key, step) -> (loss, grads)` for the global batch of `A` micro-batches.

    Each micro-batch gives the sum of its loss terms and their count (`sce_jax.losses.loss_sum_count`); a scan adds
    the sums, the count and the gradients of the sums over the micro-batches, and they are divided by the total
    count once. The arrays are global, so the sums also run over devices and hosts: the result is the loss of the
    whole batch whatever `A` and the number of devices (up to float rounding and the dropout masks).
    """
    sum_count = loss_sum_count(loss_name, loss_reduction)

    def micro_sum(params, micro: TrainBatch, key):
        model = nnx.merge(graphdef, params)
        scores_D = model(Batch(micro.query_ids, micro.doc_ids, micro.doc_query), dropout_rng=key)
        scores_BxN = scores_D.reshape(micro.labels.shape)
        return sum_count(scores_BxN, micro.labels, micro.label_mask)

    def loss_and_grad(params, batch: TrainBatch, dropout_key, step):
        keys = jax.random.split(jax.random.fold_in(dropout_key, step), batch.labels.shape[0])

        def accumulate(carry, xs):
            grads_sum, total_sum, count_sum = carry
            (total, count), grads = jax.value_and_grad(micro_sum, has_aux=True)(params, *xs)
            return (jax.tree.map(jnp.add, grads_sum, grads), total_sum + total, count_sum + count), None

        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
        (grads_sum, total, count), _ = jax.lax.scan(accumulate, zeros, (batch, keys))
        count = jnp.maximum(count, 1.0)  # no term at all (e.g. RankNet without a labelled pair): loss and grads 0
        return total / count, jax.tree.map(lambda g: g / count, grads_sum)

    return loss_and_grad


def make_train_step(graphdef, loss_name: str, optimizer: optax.GradientTransformation, loss_reduction: str = "batch"):
    """`step(params, opt_state, batch, dropout_key, step) -> (params, opt_state, metrics)`, pure: the gradient of
    the whole batch's loss (`make_loss_and_grad`), then one optimizer update."""
    loss_and_grad = make_loss_and_grad(graphdef, loss_name, loss_reduction)

    def train_step(params, opt_state, batch: TrainBatch, dropout_key, step):
        loss, grads = loss_and_grad(params, batch, dropout_key, step)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_mesh(devices_per_host: int | None) -> Mesh:
    """A 1-D `data` mesh over the first `devices_per_host` devices of every host (all hosts make the same)."""
    by_host: dict[int, list] = {}
    for device in jax.devices():
        by_host.setdefault(device.process_index, []).append(device)
    if problem := distributed.local_device_problem(devices_per_host):
        raise ConfigError(f"--devices {problem}")
    count = devices_per_host or len(by_host[jax.process_index()])
    return Mesh(np.array([d for host in sorted(by_host) for d in by_host[host][:count]]), ("data",))


def _resolve_model(cfg: TrainConfig, output_dir: Path) -> tuple[SparseCrossEncoderConfig, dict, Path]:
    """The starting model, and on resume a check that it has the shape and pattern of the one being trained."""
    config, params, tokenizer_dir = load_model_dir(cfg.model)
    config = config.replace(**cfg.model_overrides)
    saved = output_dir / "config.json"
    if cfg.resume and saved.exists():
        trained = SparseCrossEncoderConfig.from_json(saved)
        differences = [
            f"{f.name} {getattr(trained, f.name)} -> {getattr(config, f.name)}"
            for f in dataclasses.fields(SparseCrossEncoderConfig)
            if f.name not in ("hidden_dropout_prob", "attention_probs_dropout_prob")
            and getattr(trained, f.name) != getattr(config, f.name)
        ]
        if differences:
            raise ConfigError(f"cannot resume {output_dir}: it trains a different model ({'; '.join(differences)})")
    return config, params, tokenizer_dir


class MetricsLog:
    """A step's record (loss, gradient norm, learning rate, samples, steps/s) checked finite, shown on the progress
    bar and written to OUTPUT_DIR/metrics.jsonl and, if asked, TensorBoard (process 0 only)."""

    def __init__(self, output_dir: Path, cfg: TrainConfig, *, step: int, enabled: bool):
        self.enabled, self.path, self.writer = enabled, output_dir / METRICS, None
        self.batch_size, self.log_every, self.schedule = cfg.batch_size, cfg.log_every, make_schedule(cfg)
        if enabled and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="training", disable=not enabled,
                        dynamic_ncols=True)
        # Steps per second since the previous line (or since training started in this process: the first line
        # includes compilation), measured when the step's metrics arrived, i.e. the step had finished.
        self._clock = (step, time.perf_counter())

    def read(self, step: int, metrics) -> dict:
        """The step's record (waits for the device); a non-finite loss or gradient norm stops training."""
        record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                  "learning_rate": float(self.schedule(step - 1)), "samples": step * self.batch_size}
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            raise NonFiniteLossError(f"loss {record['loss']} / gradient norm {record['grad_norm']} at step {step}; "
                                     "stopped.")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
        self.bar.update(step - self.bar.n)
        return record

    def write(self, record: dict, *, always: bool = False) -> None:
        if not self.enabled or not (always or record["step"] % self.log_every == 0):
            return
        now = time.perf_counter()
        last_step, last_time = self._clock
        record["steps_per_second"] = (record["step"] - last_step) / max(now - last_time, 1e-9)
        self._clock = (record["step"], now)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            raise write_error(self.path, error) if is_write_error(error) else error from None
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def note(self, text: str) -> None:
        self.bar.write(text)

    def drop_after(self, step: int) -> None:
        """Forget lines logged after `step` (by a run that was interrupted after its last checkpoint), and a line
        torn by a crash while it was written."""
        if not (self.enabled and self.path.exists()):
            return
        kept, torn = [], 0
        for line in self.path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                line_step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if line_step <= step:
                kept.append(line)
        if torn:
            warn(f"{self.path}: dropped {torn} unreadable line(s) (torn by an interrupted write)")
        with atomic_write(self.path) as f:
            f.writelines(line + "\n" for line in kept)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _write_model_files(output_dir: Path, cfg: TrainConfig, config: SparseCrossEncoderConfig, tokenizer_dir: Path,
                       *, fresh: bool = True):
    """config.json + tokenizer files (so the output dir is a model directory) and the resolved options. On a
    resume config.json and the tokenizer are already there (and were checked to match)."""
    try:
        if fresh or not (output_dir / "config.json").exists():
            with atomic_write(output_dir / "config.json") as f:
                f.write(json.dumps(config.to_hf_dict(), indent=2) + "\n")
            copy_tokenizer_files(tokenizer_dir, output_dir)
        with atomic_write(output_dir / RESOLVED_CONFIG) as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    except (OSError, InputError) as error:
        if fresh:  # what this run wrote (a full disk) goes: the relaunch writes it again
            for name in ("config.json", RESOLVED_CONFIG, *TOKENIZER_FILES):
                with contextlib.suppress(OSError):
                    (output_dir / name).unlink()
            with contextlib.suppress(OSError):
                output_dir.rmdir()  # if empty
        if isinstance(error, OSError) and is_write_error(error):
            raise write_error(output_dir, error) from None
        raise


class Evaluator:
    """Re-ranks a run with the current parameters and measures it against qrels (process 0 only). The scorer is
    built at the first evaluation and reused with each evaluation's parameters: it compiles once."""

    def __init__(self, cfg: TrainConfig, config: SparseCrossEncoderConfig, tokenizer: QueryDocTokenizer):
        from sce_jax import evaluation, irds, runs, texts

        path = cfg.eval_run
        run = runs.read_json_run(path) if runs.is_json_run(path) else runs.read_trec_run(path)
        run = texts.complete_texts(run, source=path, dataset_id=irds.infer_dataset_id(path))
        self.run = runs.select_top(run, cfg.eval_depth)
        self.qrels = evaluation.read_qrels(cfg.eval_qrels)
        self.measure = evaluation.parse_measures([cfg.eval_measure])[0]
        self.name = f"eval/{cfg.eval_measure}"
        self._evaluate = evaluation.evaluate
        qids, self.doc_query = np.unique(self.run["qid"].to_numpy(), return_inverse=True)
        query_text = dict(zip(self.run["qid"], self.run["query"]))
        self.queries, self.texts = [query_text[q] for q in qids], list(self.run["text"])
        self.cfg, self.config, self.tokenizer = cfg, config, tokenizer
        self.encoder: SparseCrossEncoder | None = None

    def __call__(self, params) -> dict:
        """{"eval/MEASURE": value} for `params` (the training state's, replicated device arrays)."""
        params = host_copy(params)
        if self.encoder is None:
            model = build_model(self.config, params, dtype=self.cfg.dtype, attention_impl=self.cfg.attention_impl)
            self.encoder = SparseCrossEncoder(model, self.tokenizer)
        else:
            self.encoder.set_params(params)
        scores = self.encoder.score_pairs(self.queries, self.texts, self.doc_query, progress=False)
        results = self._evaluate(self.qrels, {"model": self.run.assign(score=scores)}, [self.measure])
        return {self.name: results[str(self.measure)]["model"]}


# Settings that change the data stream: a resume must not change them (`--resume` refuses, naming the flag).
STREAM_SETTINGS = ("train_data", "queries", "docs", "batch_size", "grad_accum", "seed", "max_length",
                   "max_query_length", "loss", "loss_reduction")
CONTENT = "train_data_content"  # the training file's content fingerprint, recorded beside its path


def _resolved_paths(cfg: TrainConfig) -> TrainConfig:
    """User paths made absolute (`~` expanded); `model` and `train_data` only when they name existing files
    (else they are hub / ir_datasets ids)."""
    changes = {"output_dir": str(user_path(cfg.output_dir))}
    for name in ("model", "train_data"):
        if os.path.exists(user_path(getattr(cfg, name))):
            changes[name] = str(user_path(getattr(cfg, name)))
    for name in ("queries", "docs", "eval_run", "eval_qrels"):
        if getattr(cfg, name) is not None:
            changes[name] = str(user_path(getattr(cfg, name)))
    return dataclasses.replace(cfg, **changes)


def stream_settings(cfg: TrainConfig, samples, processes: int) -> dict:
    """What the data stream depends on: the settings, the number of samples and processes, and the training
    file's content (`files.content_fingerprint`; none for an ir_datasets id)."""
    settings = {**{name: getattr(cfg, name) for name in STREAM_SETTINGS}, "samples": len(samples),
                "processes": processes}
    if getattr(samples, "fingerprint", None) is not None:
        settings[CONTENT] = samples.fingerprint
    return settings


def check_stream(saved: dict | None, current: dict, output_dir: Path, step: int) -> None:
    """Refuse a resume whose data stream differs from the one that wrote the checkpoint."""
    if not saved:  # a checkpoint without a record: nothing to compare
        return

    def difference(name: str) -> str:
        if name == CONTENT:
            return (f"--train-data {current['train_data']} has other content ({saved[name]['size']} bytes, blake2b "
                    f"{saved[name]['blake2b'][:12]} -> {current[name]['size']} bytes, {current[name]['blake2b'][:12]})")
        flag = "--" + name.replace("_", "-") if name in STREAM_SETTINGS else name
        return f"{flag} {saved[name]!r} -> {current[name]!r}"

    differences = [difference(name) for name in current if name in saved and saved[name] != current[name]]
    if differences:
        raise ConfigError(
            f"cannot resume {output_dir} (step {step}): the data stream would differ from the run that wrote it "
            f"({'; '.join(differences)}); use the original settings or another --output-dir"
        )


@contextlib.contextmanager
def _output_lock(output_dir: Path) -> Iterator[Callable[[], None]]:
    """Process 0 holds OUTPUT_DIR.lock while it runs: a second run on the directory refuses at once, naming the
    first (`files.exclusive_lock`). Parent directories created for the lock are removed again if left empty.
    Yields what removes the lock file before an immediate exit."""
    if jax.process_index() != 0:
        yield lambda: None
        return
    lock = Path(f"{output_dir}.lock")
    created = [parent for parent in reversed(output_dir.parents) if not parent.exists()]
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(output_dir.parent, error, "create") from None
    try:
        with exclusive_lock(lock, f"--output-dir {output_dir}"):
            yield lambda: lock.unlink(missing_ok=True)
    finally:
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()


def _check_output_dir(cfg: TrainConfig, output_dir: Path) -> CheckpointsOnDisk:
    """What OUTPUT_DIR/checkpoints holds; a directory with complete checkpoints needs --resume (unfinished or
    damaged checkpoints alone do not: they are set aside and training starts from step 0)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file")
    on_disk = CheckpointsOnDisk.inspect(output_dir / CHECKPOINTS_DIR)
    if on_disk.complete and not cfg.resume:
        raise ConfigError(f"{output_dir} already holds checkpoints; pass --resume or choose another --output-dir")
    if on_disk.complete:
        missing = [name for name in ("config.json", RESOLVED_CONFIG) if not (output_dir / name).is_file()]
        if missing:
            raise ConfigError(f"cannot resume {output_dir}: it has checkpoints but no {' or '.join(missing)} "
                              f"(not a complete sce_jax.train output directory)")
    if not on_disk.complete and (on_disk.damaged or on_disk.unfinished):
        warn(f"{output_dir / CHECKPOINTS_DIR} holds no complete checkpoint (a run stopped during its first); "
             "starting from step 0")
    return on_disk


@dataclasses.dataclass
class Prepared:
    """Everything checked and built before anything is written."""

    mesh: Mesh
    config: SparseCrossEncoderConfig
    tokenizer_dir: Path
    stream: BatchStream
    settings: dict
    evaluator: Evaluator | None
    train_step: Callable
    state: TrainState


def _prepare(cfg: TrainConfig, output_dir: Path, stop: Callable[[], None]) -> Prepared:
    """Model, data, evaluation run and the jitted step, checked against the settings. Loading writes nothing: an
    interrupt while JAX builds the model ends the process at once (`stop` cleans up first)."""
    mesh = make_mesh(cfg.devices)
    micro_batch = cfg.batch_size // cfg.grad_accum
    if micro_batch % mesh.devices.size:
        raise ConfigError(f"batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum} = {micro_batch} is not "
                          f"divisible by {mesh.devices.size} devices")
    with interrupts_exit_at_once(stop):
        config, params, tokenizer_dir = _resolve_model(cfg, output_dir)
    if cfg.max_length > config.max_position_embeddings:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the model's {config.max_position_embeddings} positions")
    tokenizer = QueryDocTokenizer.from_dir(tokenizer_dir, max_length=cfg.max_length,
                                           max_query_length=cfg.max_query_length)
    samples = load_samples(cfg.train_data, queries=cfg.queries, docs=cfg.docs)
    if cfg.loss == "margin-mse" and samples.num_docs != 2:
        raise TrainDataError(f"{cfg.train_data}: margin-mse needs 2 documents per sample, some have {samples.num_docs}")
    stream = BatchStream(samples, tokenizer, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         max_query_length=cfg.max_query_length, max_length=cfg.max_length, seed=cfg.seed,
                         process_index=jax.process_index(), process_count=jax.process_count())
    settings = stream_settings(cfg, samples, jax.process_count())
    evaluator = Evaluator(cfg, config, tokenizer) if cfg.eval_run else None
    with interrupts_exit_at_once(stop):
        model = build_model(config, params, dtype=cfg.dtype, attention_impl=cfg.attention_impl)
        graphdef, param_state = nnx.split(model, nnx.Param)
        replicated = NamedSharding(mesh, P())
        params = jax.device_put(nnx.to_pure_dict(param_state), replicated)
        optimizer = make_optimizer(cfg)
        opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
        train_step = jax.jit(make_train_step(graphdef, cfg.loss, optimizer, cfg.loss_reduction),
                             out_shardings=(replicated,) * 3)
    state = TrainState(params, opt_state, 0, 0, np.asarray(jax.random.PRNGKey(cfg.seed)))
    return Prepared(mesh, config, tokenizer_dir, stream, settings, evaluator, train_step, state)


def _restore(cfg: TrainConfig, on_disk: CheckpointsOnDisk, run: Prepared, output_dir: Path):
    """The newest checkpoint that restores (damaged ones are noted in `on_disk.damaged`), checked to continue
    the same data stream: (state, open store)."""
    store = CheckpointStore(output_dir / CHECKPOINTS_DIR, cfg.keep_checkpoints, run.settings)
    try:
        errors = []
        for step in on_disk.complete:
            try:
                state, saved_stream = store.restore(step, run.state)
            except Exception as error:  # noqa: BLE001 -- a damaged step: fall back to the one before
                errors.append(f"step {step}: {(str(error).splitlines() or [type(error).__name__])[0][:300]}")
                warn(f"checkpoint step {step} cannot be restored; skipped ({errors[-1]})")
                on_disk.damaged.append(step)
                continue
            if step != on_disk.complete[0]:
                warn(f"resuming from step {step}, the newest complete checkpoint")
            check_stream(saved_stream, run.settings, output_dir, step)
            return state, store
        raise CheckpointError(f"{output_dir / CHECKPOINTS_DIR}: no checkpoint could be restored ({errors[0]})")
    except BaseException:
        store.close()
        raise


def _open_outputs(cfg: TrainConfig, output_dir: Path, run: Prepared, on_disk: CheckpointsOnDisk, step: int,
                  store: CheckpointStore | None) -> CheckpointStore:
    """Write the model files, set damaged and unfinished checkpoints aside (process 0), wait for every process,
    and open the checkpoint store."""
    checkpoint_dir = output_dir / CHECKPOINTS_DIR
    if jax.process_index() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_model_files(output_dir, cfg, run.config, run.tokenizer_dir, fresh=store is None)
        set_aside(checkpoint_dir, [d for d in on_disk.damaged if d > step])
        remove_unfinished(on_disk.unfinished)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sce_jax.train: output directory ready")
    if store is None:
        return CheckpointStore(checkpoint_dir, cfg.keep_checkpoints, run.settings)
    store.reload()
    return store


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final step's metrics.

    Everything that can fail on bad input or settings (model, data, the first batch, the checkpoint to resume
    from and its settings) is checked before anything is written. SIGINT/SIGTERM stop training after the step
    in progress, once the checkpoint being written is complete.
    """
    cfg = _resolved_paths(cfg)
    output_dir = Path(cfg.output_dir)
    with _output_lock(output_dir) as release, sigterm_raises(), contextlib.ExitStack() as stack:
        on_disk = _check_output_dir(cfg, output_dir)
        run = _prepare(cfg, output_dir, stop=release)
        state, store = run.state, None
        if cfg.resume and on_disk.complete:
            state, store = _restore(cfg, on_disk, run, output_dir)
            stack.callback(store.close)
        batches = stack.enter_context(contextlib.closing(run.stream.iterate(state.position)))
        first_batch = [next(batches)] if state.step < cfg.steps else []  # bad texts fail here, before any write
        metrics = stack.enter_context(contextlib.closing(
            MetricsLog(output_dir, cfg, step=state.step, enabled=jax.process_index() == 0)))
        if store is None:
            store = _open_outputs(cfg, output_dir, run, on_disk, state.step, None)
            stack.callback(store.close)
        else:
            _open_outputs(cfg, output_dir, run, on_disk, state.step, store)
        metrics.drop_after(state.step)
        with deferred_signals() as signals:
            try:
                record = _loop(cfg, run, state, itertools.chain(first_batch, batches), store, metrics, signals)
            except NonFiniteLossError as error:
                last = store.latest_step()
                raise NonFiniteLossError(f"{error} Last good checkpoint: {'none' if last is None else f'step {last}'} "
                                         f"in {output_dir / CHECKPOINTS_DIR}") from None
            finally:
                store.close()  # the last save completes on disk, signals still deferred
    record["output_dir"] = str(output_dir)
    return record


def _loop(cfg: TrainConfig, run: Prepared, state: TrainState, batches: Iterator, store: CheckpointStore,
          metrics: MetricsLog, signals: DeferredSignals) -> dict:
    """Steps until `cfg.steps`; after each, what is due: a metrics line, a checkpoint, an evaluation. A step's
    metrics are read one step late, so the host does not wait for the device (except to save or evaluate)."""
    sharding = NamedSharding(run.mesh, P(None, "data"))
    record, pending = {"step": state.step}, None
    while state.step < cfg.steps:
        position, host_batch = next(batches)
        batch = TrainBatch(*(jax.make_array_from_process_local_data(sharding, a) for a in host_batch))
        with jax.set_mesh(run.mesh):  # under the mesh, an opaque attention kernel (Pallas) splits over `data`
            state.params, state.opt_state, step_metrics = run.train_step(
                state.params, state.opt_state, batch, state.dropout_key, state.step)
        state.step, state.position = state.step + 1, position
        if pending is not None:
            metrics.write(record := metrics.read(*pending))
        pending = (state.step, step_metrics)
        saving = state.step % cfg.save_every == 0 or state.step == cfg.steps
        evaluating = run.evaluator is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps)
        if saving or evaluating:
            record, pending = metrics.read(*pending), None
            if saving:
                store.save(state)
            if evaluating and jax.process_index() == 0:
                record.update(run.evaluator(state.params))
                metrics.note(f"step {state.step}: {cfg.eval_measure} {record[run.evaluator.name]:.4f}")
            metrics.write(record, always=True)
        if signals.received is not None:
            last = store.latest_step()
            raise Interrupted(signals.received, f"training stopped after step {state.step}; the newest checkpoint: "
                              f"{'none' if last is None else f'step {last}'} (the same command with --resume "
                              "continues from it)")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    distributed.initialize()  # joins a multi-host job when the cluster's environment says so (docs/training.md)
    try:
        record = train(cfg)
    except (CheckpointError, FileNotFoundError, FileExistsError) as e:
        raise InputError(str(e)) from e
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        output_dir = record["output_dir"]
        print(f"Model saved in {output_dir} (step {record['step']}). Load it with "
              f"SparseCrossEncoder.load({output_dir!r}) or re-rank with: sce-jax-rerank --model {shlex.quote(output_dir)} ...")
    return 0


def cli() -> None:
    """The `sce-jax-train` console script."""
    enable_compilation_cache()  # compiled programs are reused by the next run (docs/architecture.md)
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()

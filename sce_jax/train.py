"""Fine-tuning: `python -m sce_jax.train --config configs/train.yaml [--flag value ...]`.

The optimizer step is one jitted pure function over a global batch that a `Mesh` with one `data` axis splits
across devices (and hosts). Checkpoints are Orbax `CheckpointManager` steps in OUTPUT_DIR/checkpoints with the
items `params` (the model's pure parameter tree, what `sce_jax.checkpoint.load_model_dir` reads), `opt_state`
and `progress` (step, stream position, dropout key). See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
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

from sce_jax.batch import Batch
from sce_jax.cache import enable_compilation_cache
from sce_jax.checkpoint import CHECKPOINTS_DIR, copy_tokenizer_files, load_model_dir
from sce_jax.cli_config import PATH, PATH_OR_ID, add_dataclass_flags, resolve_dataclass
from sce_jax.config import PATTERN_FLAGS, SparseCrossEncoderConfig, released_pattern
from sce_jax.encoder import DTYPES, SparseCrossEncoder, build_model
from sce_jax.losses import LOSSES, REDUCTIONS, loss_sum_count
from sce_jax.errors import InputError, run_cli, user_path
from sce_jax.runs import atomic_write
from sce_jax.tokenization import QueryDocTokenizer
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_dataclass_flags(parser, TrainConfig, {
        name: f"{text} (default: {field.default})"
        for field in dataclasses.fields(TrainConfig) for name, text in [(field.name, HELP[field.name])]
    })
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the YAML file, then the flags given."""
    flags = dict(vars(args))
    flags.pop("debug", None)
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


def initialize_distributed(env=os.environ) -> None:
    """Join a multi-host job when the usual coordinator settings are present (see docs/training.md)."""
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()  # JAX reads the cluster's own variables


def make_mesh(devices_per_host: int | None) -> Mesh:
    """A 1-D `data` mesh over the first `devices_per_host` devices of every host (all hosts make the same)."""
    by_host: dict[int, list] = {}
    for device in jax.devices():
        by_host.setdefault(device.process_index, []).append(device)
    local = len(by_host[jax.process_index()])
    if devices_per_host is not None and devices_per_host > local:
        raise ConfigError(f"--devices {devices_per_host}: this host has only {local} devices")
    count = devices_per_host or local
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


class CheckpointStore:
    """Orbax CheckpointManager in OUTPUT_DIR/checkpoints: items params, opt_state and progress (JSON)."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("params", "opt_state", "progress"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, progress: dict) -> None:
        # Parameters are saved as host arrays, without the training mesh's sharding, so any reader on any
        # number of devices restores them as they are (the model directory contract).
        args = self._ocp.args
        self.manager.save(step, args=args.Composite(
            params=args.StandardSave(_host_copy(params)), opt_state=args.StandardSave(opt_state),
            progress=args.JsonSave(progress),
        ), force=True)

    def restore(self, step: int, params, opt_state) -> tuple[dict, object, dict]:
        """`params` and `opt_state` are the targets: their shapes, dtypes and shardings are restored into."""
        args = self._ocp.args
        opt_target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), opt_state)
        try:
            restored = self.manager.restore(step, args=args.Composite(
                params=args.StandardRestore(_host_copy(params)), opt_state=args.StandardRestore(opt_target),
                progress=args.JsonRestore(),
            ))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint step {step} does not match this model/optimizer: {e}") from None
        restored_params = jax.device_put(restored["params"], jax.tree.leaves(params)[0].sharding)
        return restored_params, restored["opt_state"], restored["progress"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl (process 0 only) and, if asked, TensorBoard."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / METRICS
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Forget lines logged after `step` (by a run that was interrupted after its last checkpoint), and a line
        torn by a crash while it was written."""
        if not (self.enabled and self.path.exists()):
            return
        kept, torn = [], 0
        for line in self.path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
                line_step = record["step"]
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if line_step <= step:
                kept.append(line)
        if torn:
            print(f"warning: {self.path}: dropped {torn} unreadable line(s) (torn by an interrupted write)",
                  file=sys.stderr)
        with atomic_write(self.path) as f:
            f.writelines(line + "\n" for line in kept)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _write_model_files(output_dir: Path, cfg: TrainConfig, config: SparseCrossEncoderConfig, tokenizer_dir: Path,
                       *, fresh: bool = True):
    """config.json + tokenizer files (so the output dir is a model directory) and the resolved options. On a
    resume config.json and the tokenizer are already there (and were checked to match)."""
    if fresh or not (output_dir / "config.json").exists():
        with atomic_write(output_dir / "config.json") as f:
            f.write(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        copy_tokenizer_files(tokenizer_dir, output_dir)
    with atomic_write(output_dir / RESOLVED_CONFIG) as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def _host_copy(tree):
    """A numpy copy of replicated (possibly multi-host) arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class Evaluator:
    """Re-ranks a run with the current parameters and measures it against qrels (process 0 only)."""

    def __init__(self, cfg: TrainConfig, config: SparseCrossEncoderConfig, tokenizer: QueryDocTokenizer):
        from sce_jax import evaluation, irds, runs, texts

        path = cfg.eval_run
        run = runs.read_json_run(path) if runs.is_json_run(path) else runs.read_trec_run(path)
        run = texts.complete_texts(run, source=path, dataset_id=irds.infer_dataset_id(path))
        self.run = runs.select_top(run, cfg.eval_depth)
        self.qrels = evaluation.read_qrels(cfg.eval_qrels)
        self.measure = evaluation.parse_measures([cfg.eval_measure])[0]
        self._evaluate = evaluation.evaluate
        self.cfg, self.config, self.tokenizer = cfg, config, tokenizer

    def __call__(self, params) -> float:
        model = build_model(self.config, _host_copy(params), dtype=self.cfg.dtype,
                            attention_impl=self.cfg.attention_impl)
        encoder = SparseCrossEncoder(model, self.tokenizer)
        queries, doc_query = np.unique(self.run["qid"].to_numpy(), return_inverse=True)
        query_text = dict(zip(self.run["qid"], self.run["query"]))
        scores = encoder.score_pairs([query_text[q] for q in queries], list(self.run["text"]), doc_query,
                                     progress=False)
        results = self._evaluate(self.qrels, {"model": self.run.assign(score=scores)}, [self.measure])
        return results[str(self.measure)]["model"]


# Settings that change the data stream: a resume must not change them (`--resume` refuses, naming the flag).
STREAM_SETTINGS = ("train_data", "queries", "docs", "batch_size", "grad_accum", "seed", "max_length",
                   "max_query_length", "loss")


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


def stream_settings(cfg: TrainConfig, num_samples: int, processes: int) -> dict:
    return {**{name: getattr(cfg, name) for name in STREAM_SETTINGS}, "samples": num_samples,
            "processes": processes}


def check_stream(saved: dict | None, current: dict, output_dir: Path, step: int) -> None:
    """Refuse a resume whose data stream differs from the one that wrote the checkpoint."""
    if not saved:  # a checkpoint of an earlier version: nothing recorded
        return
    differences = [
        f"{'--' + name.replace('_', '-') if name in STREAM_SETTINGS else name} {saved[name]!r} -> {current[name]!r}"
        for name in current if name in saved and saved[name] != current[name]
    ]
    if differences:
        raise ConfigError(
            f"cannot resume {output_dir} (step {step}): the data stream would differ from the run that wrote it "
            f"({'; '.join(differences)}); use the original settings or another --output-dir"
        )


def _complete_steps(checkpoint_dir: Path) -> list[int]:
    """Steps on disk, newest first; incomplete ones (no progress record, no array metadata) are skipped with a
    warning. (Orbax renames a checkpoint into place when complete; this catches one damaged afterwards.)"""
    steps = sorted((int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit() and p.is_dir()),
                   reverse=True)
    complete = []
    for step in steps:
        directory = checkpoint_dir / str(step)
        needed = [directory / "progress" / "metadata", directory / "params" / "_METADATA",
                  directory / "opt_state" / "_METADATA"]
        problem = next((f"{p.relative_to(directory)} missing" for p in needed if not p.is_file()), None)
        if problem is None:
            try:
                progress = json.loads((directory / "progress" / "metadata").read_text())
                if progress.get("step") != step:
                    problem = "progress record names another step"
            except (OSError, ValueError):
                problem = "progress record unreadable"
        if problem:
            _warn(f"checkpoint {directory} is incomplete ({problem}); skipped")
            continue
        complete.append(step)
    return complete


def _set_aside(checkpoint_dir: Path, steps: list[int]) -> None:
    """Rename damaged step directories to STEP.incomplete (kept for inspection; no longer a checkpoint step,
    so neither Orbax nor a model loader picks them)."""
    for step in steps:
        source = checkpoint_dir / str(step)
        target, n = checkpoint_dir / f"{step}.incomplete", 1
        while target.exists():
            n += 1
            target = checkpoint_dir / f"{step}.incomplete{n}"
        source.rename(target)
        _warn(f"moved {source} to {target.name}")


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final step's metrics.

    Everything that can fail on bad input or settings (model, data, the first batch, the checkpoint to resume
    from and its settings) is checked before anything is written.
    """
    cfg = _resolved_paths(cfg)
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / CHECKPOINTS_DIR
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file")
    has_checkpoints = checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir())
    if not cfg.resume and has_checkpoints:
        raise ConfigError(f"{output_dir} already holds checkpoints; pass --resume or choose another --output-dir")
    if cfg.resume and has_checkpoints:
        missing = [name for name in ("config.json", RESOLVED_CONFIG) if not (output_dir / name).is_file()]
        if missing:
            raise ConfigError(f"cannot resume {output_dir}: it has checkpoints but no {' or '.join(missing)} "
                              f"(not a complete sce_jax.train output directory)")

    mesh = make_mesh(cfg.devices)
    num_devices, num_hosts = mesh.devices.size, jax.process_count()
    micro_batch = cfg.batch_size // cfg.grad_accum
    if micro_batch % num_devices:
        raise ConfigError(
            f"batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum} = {micro_batch} is not divisible by "
            f"{num_devices} devices"
        )
    config, params, tokenizer_dir = _resolve_model(cfg, output_dir)
    if cfg.max_length > config.max_position_embeddings:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the model's {config.max_position_embeddings} positions")
    tokenizer = QueryDocTokenizer.from_dir(tokenizer_dir, max_length=cfg.max_length,
                                           max_query_length=cfg.max_query_length)
    samples = load_samples(cfg.train_data, queries=cfg.queries, docs=cfg.docs)
    if cfg.loss == "margin-mse" and samples.num_docs != 2:
        raise TrainDataError(f"{cfg.train_data}: margin-mse needs 2 documents per sample, some have {samples.num_docs}")
    stream = BatchStream(
        samples, tokenizer, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        max_query_length=cfg.max_query_length, max_length=cfg.max_length, seed=cfg.seed,
        process_index=jax.process_index(), process_count=num_hosts,
    )
    settings = stream_settings(cfg, len(samples), num_hosts)
    evaluator = Evaluator(cfg, config, tokenizer) if cfg.eval_run else None
    is_main = jax.process_index() == 0

    model = build_model(config, params, dtype=cfg.dtype, attention_impl=cfg.attention_impl)
    graphdef, param_state = nnx.split(model, nnx.Param)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(nnx.to_pure_dict(param_state), replicated)
    optimizer = make_optimizer(cfg)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
    step_fn = jax.jit(make_train_step(graphdef, cfg.loss, optimizer, cfg.loss_reduction),
                      out_shardings=(replicated,) * 3)
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    schedule = make_schedule(cfg)

    step, position, dropout_key = 0, 0, np.asarray(jax.random.PRNGKey(cfg.seed))
    store, damaged = None, []
    if cfg.resume and has_checkpoints:
        candidates = _complete_steps(checkpoint_dir)
        damaged = sorted(set(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit()) - set(candidates))
        if not candidates:
            raise CheckpointError(f"{checkpoint_dir}: no complete checkpoint to resume from")
        store = CheckpointStore(checkpoint_dir, cfg.keep_checkpoints)
        errors = []
        for latest in candidates:
            try:
                restored = store.restore(latest, params, opt_state)
            except Exception as error:  # noqa: BLE001 -- a damaged step: fall back to the one before
                errors.append(f"step {latest}: {(str(error).splitlines() or [type(error).__name__])[0][:300]}")
                _warn(f"checkpoint step {latest} cannot be restored; skipped ({errors[-1]})")
                damaged.append(latest)
                continue
            params, opt_state, progress = restored
            if latest != candidates[0]:
                _warn(f"resuming from step {latest}, the newest complete checkpoint")
            break
        else:
            store.close()
            raise CheckpointError(f"{checkpoint_dir}: no checkpoint could be restored ({errors[0]})")
        check_stream(progress.get("stream"), settings, output_dir, latest)
        step, position = progress["step"], progress["position"]
        dropout_key = np.asarray(progress["dropout_key"], np.uint32)

    batches = stream.iterate(position)
    try:
        first_batch = next(batches) if step < cfg.steps else None  # bad texts fail here, before any write
        metrics_log = MetricsLog(output_dir, tensorboard=cfg.tensorboard, enabled=is_main)
        if is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            _write_model_files(output_dir, cfg, config, tokenizer_dir, fresh=store is None)
        if is_main:
            _set_aside(checkpoint_dir, [d for d in damaged if d > step])
        if num_hosts > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sce_jax.train: output directory ready")
        if store is None:
            store = CheckpointStore(checkpoint_dir, cfg.keep_checkpoints)
        else:
            store.manager.reload()
        metrics_log.drop_after(step)
    except BaseException:
        batches.close()
        if store is not None:
            store.close()
        raise

    def save(step: int, position: int):
        store.save(step, params, opt_state, {"step": step, "position": position,
                                             "dropout_key": dropout_key.tolist(), "stream": settings})

    def check(step: int, metrics) -> dict:
        """The step's record for metrics.jsonl; a non-finite loss or gradient stops training here."""
        record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                  "learning_rate": float(schedule(step - 1)), "samples": step * cfg.batch_size}
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            last = store.latest_step()
            raise NonFiniteLossError(
                f"loss {record['loss']} / gradient norm {record['grad_norm']} at step {step}; stopped. Last good "
                f"checkpoint: {'none' if last is None else f'step {last}'} in {checkpoint_dir}"
            )
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
        bar.update(step - bar.n)
        return record

    def log(record: dict, *, always: bool = False) -> None:
        if always or record["step"] % cfg.log_every == 0:
            # Steps per second since the previous line (or since this process started training: the first line
            # includes compilation), measured when the step's metrics arrived, i.e. the step had finished.
            now = time.perf_counter()
            last_step, last_time = clock["last"]
            record["steps_per_second"] = (record["step"] - last_step) / max(now - last_time, 1e-9)
            clock["last"] = (record["step"], now)
            metrics_log.log(record)

    bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="training", disable=not is_main, dynamic_ncols=True)
    record: dict = {"step": step}
    pending = None  # the previous step's metrics, read one step late so the host never stalls the device
    clock = {"last": (step, time.perf_counter())}
    try:
        while step < cfg.steps:
            position, host_batch = first_batch if first_batch is not None else next(batches)
            first_batch = None
            batch = TrainBatch(*(jax.make_array_from_process_local_data(batch_sharding, a) for a in host_batch))
            # Under the mesh, an opaque attention kernel (Pallas) splits itself over the data axis.
            with jax.set_mesh(mesh):
                params, opt_state, metrics = step_fn(params, opt_state, batch, dropout_key, step)
            step += 1
            if pending is not None:
                log(record := check(*pending))
            pending = (step, metrics)
            saving = step % cfg.save_every == 0 or step == cfg.steps
            evaluating = evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
            if saving or evaluating:
                record, pending = check(*pending), None
                if saving:
                    save(step, position)
                if evaluating and is_main:
                    record[f"eval/{cfg.eval_measure}"] = evaluator(params)
                    bar.write(f"step {step}: {cfg.eval_measure} {record[f'eval/{cfg.eval_measure}']:.4f}")
                log(record, always=True)
    finally:
        bar.close()
        batches.close()
        store.close()
        metrics_log.close()
    record["output_dir"] = str(output_dir)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    initialize_distributed()
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

"""A training output directory's checkpoints: OUTPUT_DIR/checkpoints, one Orbax `CheckpointManager` step per saved
step with the items `params` (the model's pure parameter tree, what `sce_jax.checkpoint.load_model_dir` reads),
`opt_state` and `progress` (step, stream position, dropout key, data-stream settings).

Orbax writes a step into `STEP.orbax-checkpoint-tmp*` and renames it to `STEP` once complete. What is found on disk
(`CheckpointsOnDisk`): complete steps; damaged steps (renamed in but missing files: set aside as `STEP.incomplete`);
unfinished writes (a process killed while it saved: removed). A write that fails (a full disk) removes its
unfinished step and is one `InputError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sce_jax.errors import InputError
from sce_jax.files import drop_orphaned_future_errors, is_write_error, write_error
from sce_jax.weights import CheckpointError

ORBAX_TEMPORARY = ".orbax-checkpoint-tmp"
ITEMS = ("params", "opt_state", "progress")


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr)


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds: parameters and optimizer state (device arrays), the number of steps taken, the
    data stream's position after the last one, and the dropout key."""

    params: Any
    opt_state: Any
    step: int
    position: int
    dropout_key: np.ndarray


@dataclasses.dataclass
class CheckpointsOnDisk:
    complete: list[int]  # newest first
    damaged: list[int]
    unfinished: list[Path]

    @classmethod
    def inspect(cls, directory: Path) -> CheckpointsOnDisk:
        if not directory.is_dir():
            return cls([], [], [])
        entries = list(directory.iterdir())
        steps = {int(p.name) for p in entries if p.name.isdigit() and p.is_dir()}
        complete = _complete_steps(directory, steps)
        unfinished = sorted(p for p in entries if ORBAX_TEMPORARY in p.name)
        return cls(complete, sorted(steps - set(complete)), unfinished)


def _complete_steps(directory: Path, steps: set[int]) -> list[int]:
    """The steps that hold every item's metadata and a progress record of their own step, newest first; the
    others are reported (a step damaged after Orbax renamed it into place)."""
    complete = []
    for step in sorted(steps, reverse=True):
        step_dir = directory / str(step)
        needed = [step_dir / "progress" / "metadata", step_dir / "params" / "_METADATA",
                  step_dir / "opt_state" / "_METADATA"]
        problem = next((f"{p.relative_to(step_dir)} missing" for p in needed if not p.is_file()), None)
        if problem is None:
            try:
                if json.loads((step_dir / "progress" / "metadata").read_text()).get("step") != step:
                    problem = "progress record names another step"
            except (OSError, ValueError, AttributeError):
                problem = "progress record unreadable"
        if problem:
            warn(f"checkpoint {step_dir} is incomplete ({problem}); skipped")
            continue
        complete.append(step)
    return complete


def set_aside(directory: Path, steps: list[int]) -> None:
    """Rename damaged step directories to STEP.incomplete (kept for inspection; no longer a checkpoint step, so
    neither Orbax nor a model loader picks them)."""
    for step in steps:
        source = directory / str(step)
        target, n = directory / f"{step}.incomplete", 1
        while target.exists():
            n += 1
            target = directory / f"{step}.incomplete{n}"
        source.rename(target)
        warn(f"moved {source} to {target.name}")


def remove_unfinished(paths: list[Path]) -> None:
    """Remove checkpoint writes that a killed (or failed) process left unfinished."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        warn(f"removed {path}, an unfinished checkpoint of an interrupted run")


class CheckpointStore:
    """Saves and restores `TrainState`s in `directory` (Orbax `CheckpointManager`, asynchronous saves)."""

    def __init__(self, directory: Path, keep: int, stream: dict):
        import orbax.checkpoint as ocp

        self._ocp, self.directory, self.stream = ocp, directory, stream
        # Orbax logs each failure of its writer threads with a traceback (through absl) before the error reaches
        # the caller: while the store is open those logs are dropped (the error itself is reported, in one line).
        self._absl = logging.getLogger("absl")
        self._absl_level = self._absl.level
        self._absl.setLevel(logging.CRITICAL)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState) -> None:
        # Parameters are saved as host arrays, without the training mesh's sharding, so any reader on any
        # number of devices restores them as they are (the model directory contract).
        args = self._ocp.args
        progress = {"step": state.step, "position": state.position, "dropout_key": state.dropout_key.tolist(),
                    "stream": self.stream}
        with self._write_errors():
            self.manager.save(state.step, args=args.Composite(
                params=args.StandardSave(host_copy(state.params)), opt_state=args.StandardSave(state.opt_state),
                progress=args.JsonSave(progress),
            ), force=True)

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict | None]:
        """The state saved at `step` (restored into the shapes, dtypes and shardings of `like`), and the
        data-stream settings recorded with it."""
        args = self._ocp.args
        opt_target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                  like.opt_state)
        try:
            restored = self.manager.restore(step, args=args.Composite(
                params=args.StandardRestore(host_copy(like.params)), opt_state=args.StandardRestore(opt_target),
                progress=args.JsonRestore(),
            ))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint step {step} does not match this model/optimizer: {e}") from None
        params = jax.device_put(restored["params"], jax.tree.leaves(like.params)[0].sharding)
        progress = restored["progress"]
        state = TrainState(params, restored["opt_state"], progress["step"], progress["position"],
                           np.asarray(progress["dropout_key"], np.uint32))
        return state, progress.get("stream")

    def reload(self) -> None:
        self.manager.reload()

    def close(self) -> None:
        """Wait for the last save to be complete on disk, then close."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._write_errors():
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()
            self._absl.setLevel(self._absl_level)

    @contextlib.contextmanager
    def _write_errors(self):
        """A save that the file system refused (full disk, quota, read-only): its unfinished step is removed and
        the error is one line naming the directory and the newest complete checkpoint."""
        try:
            yield
        except Exception as error:
            if not is_write_error(error):
                raise
            drop_orphaned_future_errors()
            self._closed = True
            with contextlib.suppress(Exception):
                self.manager.close()
            self._absl.setLevel(self._absl_level)
            for path in self.directory.glob(f"*{ORBAX_TEMPORARY}*"):
                shutil.rmtree(path, ignore_errors=True)
            complete = CheckpointsOnDisk.inspect(self.directory).complete
            newest = f"step {complete[0]}" if complete else "none"
            raise InputError(f"{write_error(self.directory, error, 'save a checkpoint in')} (its unfinished files "
                             f"were removed; the newest complete checkpoint: {newest})") from None


def host_copy(tree):
    """A numpy copy of replicated (possibly multi-host) arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

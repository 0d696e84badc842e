"""Jobs of several processes: joining one (`jax.distributed`), the local device count, and barriers that stop
every process with one line when one of them failed.

A barrier is the coordination service's (through Orbax's public `multihost.get_barrier_sync_fn`): it needs no
device collective (CPU processes have none unless started with gloo), compiles nothing and has a timeout. A
process that fails writes its one-line error to a marker file beside the job's output (a file system all the
processes share, as the output's own writer needs) and still comes to its next barrier. The others look for
markers between batches (`Barriers.check`) and after each barrier, and then come to that barrier too (so none is
left waiting there) and stop with one line naming the process that failed. JAX is imported only when a function
needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sce_jax.errors import InputError, one_line

# How long a barrier waits for the other processes: they may be hours behind (each scores its own share).
BARRIER_TIMEOUT_S = 24 * 3600


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               env=os.environ) -> tuple[int, int]:
    """Join a `jax.distributed` job: at `coordinator` (host:port) as process `process_id` of `num_processes` when
    given, else when the cluster's environment says so ($JAX_COORDINATOR_ADDRESS with $JAX_NUM_PROCESSES and
    $JAX_PROCESS_ID, or a Slurm / Open MPI job of more than one task); else stay a single process.
    Returns (process count, this process's index)."""
    import jax

    if coordinator is not None:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()  # JAX reads the cluster's own variables
    return jax.process_count(), jax.process_index()


def local_device_problem(devices) -> str | None:
    """None when `devices` is None or a device count this process has (1 up to its local devices), else what is
    wrong, to follow the setting's name: "3, but this machine has 2 local devices"."""
    if devices is None:
        return None
    import jax

    local = jax.local_device_count()
    if not isinstance(devices, int) or isinstance(devices, bool) or not 1 <= devices <= local:
        return f"{devices!r}, but this machine has {local} local device{'s' * (local != 1)}"
    return None


class OtherProcessFailed(InputError):
    """Another process of the job failed; this one stopped at a barrier (the message names the other)."""


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process of the job reaches barrier `name` (each name once per job), at most `timeout_s`
    seconds; a timeout or a lost process is an InputError of one line. Nothing to wait for in a single process."""
    import jax

    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    try:
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
    except Exception as error:  # the coordination service's error: deadline exceeded, a process gone
        raise InputError(f"process {jax.process_index()}: not every process reached {name!r} within "
                         f"{timeout_s:.0f} s: {one_line(error)}") from None


class Barriers:
    """A job's barriers, in the order every process passes them, and its failure markers (`marker(k)`:
    `PREFIX.failed.K-of-N`). `wait()` passes the next barrier and raises OtherProcessFailed if a process left a
    marker; `check()` does the same between barriers once a marker is there; `failing()` wraps the work between
    barriers: an error there leaves this process's marker and still comes to the next barrier."""

    def __init__(self, names: Sequence[str], prefix: str | os.PathLike, num_processes: int, process_id: int,
                 timeout_s: float = BARRIER_TIMEOUT_S):
        self.pending = list(names)
        self.prefix = str(prefix)
        self.num_processes = num_processes
        self.process_id = process_id
        self.timeout_s = timeout_s
        if num_processes > 1:
            self.marker(process_id).unlink(missing_ok=True)  # an earlier job's: before this job's first barrier

    def marker(self, process_id: int) -> Path:
        return Path(f"{self.prefix}.failed.{process_id}-of-{self.num_processes}")

    def _failure(self) -> str | None:
        """Another process's failure as this process reports it, or None."""
        for k in range(self.num_processes):
            if k != self.process_id and self.marker(k).exists():
                reason = self.marker(k).read_text(errors="replace").strip()
                return f"process {k} of {self.num_processes} failed: {reason}"
        return None

    def wait(self) -> None:
        barrier(self.pending.pop(0), self.timeout_s)
        if failure := self._failure():
            self.pending.clear()  # every process stops after this barrier
            raise OtherProcessFailed(failure)

    def check(self) -> None:
        """Between barriers (after each batch): once another process failed, come to the next barrier (where it and
        the others meet) and raise OtherProcessFailed naming it."""
        if self.num_processes == 1 or not self.pending or not (failure := self._failure()):
            return
        name = self.pending.pop(0)
        self.pending.clear()
        try:
            barrier(name, self.timeout_s)
        except InputError:
            pass  # the other process's failure is the one to report
        raise OtherProcessFailed(failure)

    def fail(self, reason: str) -> None:
        """Tell the others at the next barrier that this process failed with `reason` (one line)."""
        if self.num_processes == 1 or not self.pending:
            return
        self.marker(self.process_id).write_text(one_line(reason) + "\n")
        name = self.pending.pop(0)
        self.pending.clear()
        try:
            barrier(name, self.timeout_s)
        except InputError:
            pass  # this process is failing anyway: its own error is the one to report

    @contextmanager
    def failing(self) -> Iterator[None]:
        try:
            yield
        except OtherProcessFailed:
            raise
        except InputError as error:
            self.fail(str(error))
            raise
        except BaseException as error:
            self.fail(f"{type(error).__name__}: {error}" if not isinstance(error, KeyboardInterrupt)
                      else "interrupted")
            raise

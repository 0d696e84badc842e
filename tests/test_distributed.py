"""sce_jax.distributed without a second process: which jax.distributed.initialize call each setting makes, the
device-count check, and the failure markers a barrier reads (the two-process runs are in test_rerank_scale.py)."""

from __future__ import annotations

import jax
import pytest

from sce_jax import distributed
from sce_jax.errors import InputError


@pytest.mark.parametrize("flags, env, expected", [
    ((None, None, None), {}, None),
    (("h:1", 2, 1), {}, (("h:1", 2, 1), {})),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     ((), {"num_processes": 4, "process_id": 3})),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:2"}, ((), {"num_processes": None, "process_id": None})),
    ((None, None, None), {"SLURM_NTASKS": "2"}, ((), {})),
    ((None, None, None), {"OMPI_COMM_WORLD_SIZE": "8"}, ((), {})),
    ((None, None, None), {"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}, None),
])
def test_initialize_joins_a_job_only_when_asked(monkeypatch, flags, env, expected):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert distributed.initialize(*flags, env=env) == (1, 0)
    assert calls == ([] if expected is None else [expected])


def test_local_device_problem_names_the_count():
    local = jax.local_device_count()
    assert distributed.local_device_problem(None) is None
    assert distributed.local_device_problem(local) is None
    for bad in (0, local + 1, True, 1.5):
        assert distributed.local_device_problem(bad) == f"{bad!r}, but this machine has {local} local device{'s' * (local != 1)}"


def test_a_marker_stops_the_others_at_the_next_barrier(tmp_path, monkeypatch):
    """Process 1 fails: its marker holds its one-line error, it passes one barrier and no more; process 0, after
    that barrier, stops naming it. A marker of an earlier job is removed by its process before any barrier."""
    passed = []
    monkeypatch.setattr(distributed, "barrier", lambda name, timeout_s: passed.append(name))
    prefix = tmp_path / "run.trec"
    (tmp_path / "run.trec.failed.0-of-2").write_text("an earlier job\n")
    first = distributed.Barriers(("a", "b"), prefix, 2, 0)
    assert not first.marker(0).exists()
    second = distributed.Barriers(("a", "b"), prefix, 2, 1)
    with pytest.raises(InputError, match="bad\ninput"), second.failing():
        raise InputError("bad\ninput")
    assert passed == ["a"] and second.marker(1).read_text() == "bad input\n"
    with pytest.raises(distributed.OtherProcessFailed, match=r"^process 1 of 2 failed: bad input$"):
        first.wait()
    assert passed == ["a", "a"] and first.pending == []


def test_one_process_has_no_barriers_and_no_markers(tmp_path):
    barriers = distributed.Barriers(("a",), tmp_path / "out", 1, 0)
    barriers.fail("anything")
    barriers.wait()
    assert list(tmp_path.iterdir()) == []


def test_check_between_barriers_comes_to_the_next_one_once_another_process_failed(tmp_path, monkeypatch):
    passed = []
    monkeypatch.setattr(distributed, "barrier", lambda name, timeout_s: passed.append(name))
    barriers = distributed.Barriers(("a", "b"), tmp_path / "out", 3, 2)
    barriers.check()  # nobody failed: nothing happens
    assert passed == [] and barriers.pending == ["a", "b"]
    barriers.marker(0).write_text("killed\n")
    with pytest.raises(distributed.OtherProcessFailed, match=r"^process 0 of 3 failed: killed$"):
        barriers.check()
    assert passed == ["a"] and barriers.pending == []

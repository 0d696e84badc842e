"""Fault injection on real processes: `python -m sce_jax.rerank`, `python -m sce_jax.convert` and
`python -m sce_jax.train` killed (SIGKILL, SIGTERM) at random moments, then relaunched with the same command, end
with the output of an uninterrupted run and nothing else left behind; two runs on one output; a disk too small for
the output.

Kill moments are drawn (seeded) over the length of an uninterrupted run, less its first third (mostly imports),
so they fall in loading, compiling, scoring or writing; the assertions hold wherever they fall.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_RUN = REPO / "examples" / "run.jsonl"
SEEDS = (0, 1)
KILLS = [(signal.SIGKILL, seed) for seed in SEEDS] + [(signal.SIGTERM, seed) for seed in SEEDS]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla")  # compiled programs shared by every launch: shorter runs
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "HF_HUB_OFFLINE": "1"}


def _launch(module: str, args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def _timed(module: str, args, env) -> float:
    started = time.monotonic()
    code, err = _finish(_launch(module, args, env))
    assert code == 0, err
    return time.monotonic() - started


def _kill_after(process: subprocess.Popen, delay: float, signum: int) -> tuple[int, str]:
    try:
        process.wait(delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
    return _finish(process)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- re-ranking ---------------------------------------------------------------------------------------------------


def _rerank_args(tiny_sparse_dir, output, *extra):
    return ["--model", tiny_sparse_dir, "--run", EXAMPLE_RUN, "--output", output, "--max-length", 64,
            "--max-query-length", 16, "--batch-size", 4, "--window", 10, "--depth", 0, "--no-progress", *extra]


@pytest.fixture(scope="module")
def rerank_baseline(tiny_sparse_dir, env, tmp_path_factory):
    """The uninterrupted run's bytes, and how long a run takes (with the compilation cache warm)."""
    output = tmp_path_factory.mktemp("rerank_baseline") / "run.trec"
    _timed("sce_jax.rerank", _rerank_args(tiny_sparse_dir, output), env)  # fills the compilation cache
    seconds = _timed("sce_jax.rerank", _rerank_args(tiny_sparse_dir, output.with_name("again.trec")), env)
    assert output.read_bytes() == output.with_name("again.trec").read_bytes()
    return output.read_bytes(), seconds


@pytest.mark.parametrize("signum, seed", KILLS)
def test_rerank_killed_anywhere_then_relaunched_ends_as_an_uninterrupted_run(tiny_sparse_dir, env, rerank_baseline,
                                                                          tmp_path, signum, seed):
    expected, seconds = rerank_baseline
    output = tmp_path / "run.trec"
    command = _rerank_args(tiny_sparse_dir, output, "--resume")  # --resume also starts a run that has no progress
    delay = random.Random(seed).uniform(0.3, 1.05) * seconds  # imports take the first third or so
    code, err = _kill_after(_launch("sce_jax.rerank", command, env), delay, signum)
    assert "Traceback" not in err, err
    if signum == signal.SIGTERM and code > 0:  # stopped by its handlers (not during imports, which it dies in)
        assert code in (143, 0) and len([line for line in err.splitlines() if not line.startswith("INFO")]) <= 1, err
    code, err = _finish(_launch("sce_jax.rerank", command, env))
    assert code == 0, f"killed after {delay:.1f} s: {err}"
    assert output.read_bytes() == expected, f"killed after {delay:.1f} s"
    assert _listing(tmp_path) == ["run.trec"], f"killed after {delay:.1f} s"


def test_two_runs_on_one_output_the_second_refuses_naming_the_first(tiny_sparse_dir, env, rerank_baseline,
                                                                     tmp_path):
    """Two --resume processes on one output: one crashed, the other wrote a broken run (queries twice, progress
    records spliced into run lines)."""
    expected, _ = rerank_baseline
    output = tmp_path / "run.trec"
    lock = Path(f"{output}.lock")
    first = _launch("sce_jax.rerank", _rerank_args(tiny_sparse_dir, output, "--resume"), env)
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Held still while the second starts: with the compilation cache warm the first can finish in under a second.
    first.send_signal(signal.SIGSTOP)
    try:
        code, err = _finish(_launch("sce_jax.rerank", _rerank_args(tiny_sparse_dir, output, "--resume"), env))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (f"error: --output {output} is in use by pid {first.pid} on "
                                            f"{os.uname().nodename} (lock file {lock}); wait for it to finish, or "
                                            "stop it first")
    code, err = _finish(first)
    assert code == 0, err
    assert output.read_bytes() == expected
    assert _listing(tmp_path) == ["run.trec"]


def test_rerank_on_a_full_disk_is_one_line(tiny_sparse_dir, env, small_fs):
    disk = small_fs.mount(4)  # one page: the lock file takes it
    code, err = _finish(_launch("sce_jax.rerank", _rerank_args(tiny_sparse_dir, disk / "run.trec"), env))
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("INFO")]
    assert lines == [f"error: cannot write {disk / 'run.trec.progress'}: No space left on device"], err
    assert _listing(disk) == []


# --- conversion ---------------------------------------------------------------------------------------------------


def _restored(directory: Path) -> dict:
    from sce_jax.checkpoint import load_model_dir

    import jax

    _, params, _ = load_model_dir(directory)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _files(directory: Path) -> set[str]:
    """The files under `directory`, Orbax's data files (named at random under `d/`, more or fewer of them as its
    writer threads go) as one entry per folder."""
    return {str(p.parent.relative_to(directory) / "*") if p.parent.name == "d" else str(p.relative_to(directory))
            for p in directory.rglob("*") if p.is_file()}


def _same_model(a: Path, b: Path) -> None:
    """The same files and the same tensors, bit for bit."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert _files(a) == _files(b)
    left, right = _restored(a), _restored(b)
    assert left.keys() == right.keys()
    for key in left:
        np.testing.assert_array_equal(left[key], right[key])


@pytest.fixture(scope="module")
def convert_baseline(tiny_sparse_dir, env, tmp_path_factory):
    output = tmp_path_factory.mktemp("convert_baseline") / "model"
    seconds = _timed("sce_jax.convert", [tiny_sparse_dir, output], env)
    return output, seconds


@pytest.mark.parametrize("signum, seed", KILLS)
def test_convert_killed_anywhere_then_relaunched_ends_as_an_uninterrupted_run(tiny_sparse_dir, env, convert_baseline,
                                                                           tmp_path, signum, seed):
    expected, seconds = convert_baseline
    output = tmp_path / "model"
    delay = random.Random(100 + seed).uniform(0.3, 1.05) * seconds
    code, err = _kill_after(_launch("sce_jax.convert", [tiny_sparse_dir, output], env), delay, signum)
    assert "Traceback" not in err, err
    if signum == signal.SIGTERM and code > 0:
        assert code == 143 and len(err.strip().splitlines()) == 1, err
    if not output.exists():  # killed before it finished: the same command again
        code, err = _finish(_launch("sce_jax.convert", [tiny_sparse_dir, output], env))
        assert code == 0, f"killed after {delay:.1f} s: {err}"
    assert _listing(tmp_path) == ["model"], f"killed after {delay:.1f} s"
    _same_model(output, expected)


# --- training -----------------------------------------------------------------------------------------------------

TRAIN_CONFIG = REPO / "configs" / "train-tiny.yaml"
TRAIN_DATA = REPO / "tests" / "data" / "train-tiny.jsonl"


def _train_args(tiny_hf_dir, output_dir, *extra):
    # A checkpoint after every step, so that kills fall into checkpoint writes too.
    return ["--config", TRAIN_CONFIG, "--model", tiny_hf_dir, "--train-data", TRAIN_DATA, "--output-dir", output_dir,
            "--learning-rate", "1e-2", "--steps", 6, "--save-every", 1, "--resume", *extra]


def _messages(err: str) -> list[str]:
    """stderr less the progress bar and warnings."""
    return [line for line in err.splitlines()
            if line.strip() and not line.startswith(("training", "warning:", "INFO"))]


@pytest.fixture(scope="module")
def train_baseline(tiny_hf_dir, env, tmp_path_factory):
    """The uninterrupted run's parameters, metrics steps and checkpoint steps, and how long a run takes."""
    output_dir = tmp_path_factory.mktemp("train_baseline") / "out"
    _timed("sce_jax.train", _train_args(tiny_hf_dir, output_dir.with_name("warm")), env)  # fills the cache
    seconds = _timed("sce_jax.train", _train_args(tiny_hf_dir, output_dir), env)
    return _restored(output_dir), _listing(output_dir / "checkpoints"), _metric_steps(output_dir), seconds


def _metric_steps(output_dir: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signum, seed", KILLS)
def test_train_killed_anywhere_then_relaunched_ends_as_an_uninterrupted_run(tiny_hf_dir, env, train_baseline,
                                                                          tmp_path, signum, seed):
    params, checkpoints, metric_steps, seconds = train_baseline
    output_dir = tmp_path / "out"
    command = _train_args(tiny_hf_dir, output_dir)
    delay = random.Random(200 + seed).uniform(0.3, 1.0) * seconds
    code, err = _kill_after(_launch("sce_jax.train", command, env), delay, signum)
    assert "Traceback" not in err, err
    if signum == signal.SIGTERM and code > 0:  # stopped by its handlers: one line
        assert code == 143 and len(_messages(err)) == 1, err
    code, err = _finish(_launch("sce_jax.train", command, env))
    assert code == 0, f"killed after {delay:.1f} s: {err}"
    assert _listing(tmp_path) == ["out"], f"killed after {delay:.1f} s"
    assert _listing(output_dir / "checkpoints") == checkpoints, f"killed after {delay:.1f} s"
    assert _metric_steps(output_dir) == metric_steps, f"killed after {delay:.1f} s"
    got = _restored(output_dir)
    for key in params:
        np.testing.assert_allclose(got[key], params[key], rtol=0, atol=1e-6, err_msg=f"killed after {delay:.1f} s")


def test_two_trainings_on_one_output_dir_the_second_refuses_naming_the_first(tiny_hf_dir, env, train_baseline,
                                                                             tmp_path):
    output_dir = tmp_path / "out"
    lock = Path(f"{output_dir}.lock")
    first = _launch("sce_jax.train", _train_args(tiny_hf_dir, output_dir), env)
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # held while the second starts
    try:
        code, err = _finish(_launch("sce_jax.train", _train_args(tiny_hf_dir, output_dir), env))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2, err
    assert _messages(err) == [f"error: --output-dir {output_dir} is in use by pid {first.pid} on "
                              f"{os.uname().nodename} (lock file {lock}); wait for it to finish, or stop it first"]
    code, err = _finish(first)
    assert code == 0, err
    assert _listing(tmp_path) == ["out"]
    assert _metric_steps(output_dir) == train_baseline[2]


def test_train_on_a_full_disk_is_one_line_and_leaves_no_unfinished_checkpoint(tiny_hf_dir, env, small_fs):
    disk = small_fs.mount(3072)  # the model files fit (0.7 MB), a checkpoint (12 MB) does not
    output_dir = disk / "out"
    code, err = _finish(_launch("sce_jax.train", _train_args(tiny_hf_dir, output_dir), env))
    assert code == 2, err
    assert _messages(err) == [f"error: cannot save a checkpoint in {output_dir / 'checkpoints'}: No space left on "
                              "device (its unfinished files were removed; the newest complete checkpoint: none)"], err
    assert _listing(disk) == ["out"]
    assert _listing(output_dir / "checkpoints") == []


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_train_killed_during_its_first_checkpoint_then_relaunched_ends_as_an_uninterrupted_run(
        tiny_hf_dir, env, train_baseline, tmp_path, signum):
    """The signal is sent as soon as Orbax's temporary directory of step 1 appears."""
    params, checkpoints, metric_steps, _ = train_baseline
    output_dir = tmp_path / "out"
    command = _train_args(tiny_hf_dir, output_dir)
    process = _launch("sce_jax.train", command, env)
    unfinished = output_dir / "checkpoints" / "1.orbax-checkpoint-tmp"
    deadline = time.monotonic() + 120
    while not unfinished.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert unfinished.exists(), "the first checkpoint's write was not seen"
    process.send_signal(signum)
    code, err = _finish(process)
    assert "Traceback" not in err, err
    if signum == signal.SIGKILL:
        assert unfinished.exists()  # what the relaunch finds
    else:  # the checkpoint is completed, then one line
        assert code == 128 + signum and len(_messages(err)) == 1, err
        assert not unfinished.exists() and (output_dir / "checkpoints" / "1").is_dir()
    code, err = _finish(_launch("sce_jax.train", command, env))
    assert code == 0, err
    assert _listing(tmp_path) == ["out"]
    assert _listing(output_dir / "checkpoints") == checkpoints
    assert _metric_steps(output_dir) == metric_steps
    got = _restored(output_dir)
    for key in params:
        np.testing.assert_allclose(got[key], params[key], rtol=0, atol=1e-6)


def test_train_on_a_disk_too_small_for_the_model_files_leaves_nothing(tiny_hf_dir, env, small_fs):
    disk = small_fs.mount(600)  # config.json fits, tokenizer.json (0.7 MB) does not
    output_dir = disk / "out"
    code, err = _finish(_launch("sce_jax.train", _train_args(tiny_hf_dir, output_dir), env))
    assert code == 2, err
    assert _messages(err) == [f"error: cannot write {output_dir}: No space left on device"], err
    assert _listing(disk) == []

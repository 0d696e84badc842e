"""sce_jax.files: atomic writes that an interrupt or a full disk leaves clean, locks naming their holder,
temporaries of dead writers removed, content fingerprints; sce_jax.errors: Ctrl-C while a command starts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sce_jax import files
from sce_jax.errors import InputError, Interrupted

REPO = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_write(target) as f:
            f.write("half")
            raise RuntimeError
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["out.txt"]
    with files.atomic_write(target) as f:
        f.write("new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_atomic_write_interrupted_removes_its_temporary_and_says_so(tmp_path, signum):
    """SIGTERM would kill the process, leaving the temporary file: inside the write it raises instead."""
    target = tmp_path / "out.txt"
    with pytest.raises(Interrupted) as error:
        with files.atomic_write(target) as f:
            f.write("half")
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs before this returns
    assert error.value.signum == signum
    assert error.value.detail == f"{target} was not written (its partial file was removed)"
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_atomic_write_on_a_full_disk_is_one_line(small_fs):
    disk = small_fs.mount(64)
    small_fs.fill(disk)
    with pytest.raises(InputError, match=f"^cannot write {disk / 'out.txt'}: No space left on device$"):
        with files.atomic_write(disk / "out.txt", "wb") as f:
            f.write(b"x" * 100_000)
    assert os.listdir(disk) == ["filler"]


def test_lock_names_its_holder_and_a_dead_holder_does_not_block(tmp_path):
    lock = tmp_path / "out.lock"
    with files.exclusive_lock(lock, "the output"):
        assert lock.read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
        with pytest.raises(InputError, match=rf"^the output is in use by pid {os.getpid()} on .* \(lock file {lock}\)"):
            with files.exclusive_lock(lock, "the output"):
                pass
    assert not lock.exists()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'pid %d on elsewhere' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(InputError, match=f"in use by pid {holder.pid} on elsewhere"):
            with files.exclusive_lock(lock, "the output"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # left by the killed process, and no longer locked
    with files.exclusive_lock(lock, "the output"):
        pass
    assert not lock.exists()


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "model"
    fd, live = files.locked_temporary(target, directory=True)
    try:
        (tmp_path / ".model.abcd1234.partial").mkdir()  # a killed writer's (nobody holds its lock)
        (tmp_path / ".model.abcd1234.partial" / "shard").write_bytes(b"x")
        (tmp_path / ".model.zzzz0000.tmp").write_bytes(b"x")
        (tmp_path / ".model.bak").write_bytes(b"a user's file")  # not a temporary's name
        removed = files.remove_stale_temporaries(target)
        assert sorted(p.name for p in removed) == [".model.abcd1234.partial", ".model.zzzz0000.tmp"]
        assert sorted(os.listdir(tmp_path)) == sorted([".model.bak", live.name])
    finally:
        os.close(fd)
    assert files.remove_stale_temporaries(target) == [live]


def test_content_fingerprint_sees_same_size_edits(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 1000)
    first = files.content_fingerprint(path)
    path.write_bytes(b"a" * 999 + b"b")
    assert files.content_fingerprint(path) != first and files.content_fingerprint(path)["size"] == 1000
    # A large file: sampled blocks (the first and the last among them) and the size.
    monkeypatch.setattr(files, "WHOLE_FILE_BYTES", 1 << 16)
    data = bytearray(os.urandom(1 << 20))
    path.write_bytes(data)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(files.os, "pread", lambda fd, n, offset: reads.append(n) or real_pread(fd, n, offset))
    sampled = files.content_fingerprint(path)
    assert sum(reads) == files.SAMPLE_BLOCKS * files.SAMPLE_BYTES
    data[-1] ^= 1
    path.write_bytes(data)
    assert files.content_fingerprint(path) != sampled


@pytest.mark.parametrize("command", [["-m", "sce_jax.rerank", "--run", "x", "--output", "y"],
                                     ["-m", "sce_jax.convert", "a", "b"]])
def test_ctrl_c_while_a_command_starts_is_one_line_and_130(command, tmp_path):
    """Ctrl-C while jax and the rest are imported printed a 19-46 line traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-X", "importtime", *command], env=env, cwd=tmp_path,
                               stderr=subprocess.PIPE, text=True)
    # Interrupt while it imports: once jax is loaded (-X importtime reports each module), flax and more to come.
    for line in process.stderr:
        if line.rstrip().split("|")[-1].strip() == "jax":
            break
    process.send_signal(signal.SIGINT)
    rest = [line for line in process.stderr.read().splitlines() if not line.startswith("import time:")]
    assert (process.wait(60), rest) == (130, ["interrupted"]), "\n".join(rest)


@pytest.mark.parametrize("proc", [True, False])
def test_current_umask_reads_the_umask_without_changing_it(monkeypatch, proc):
    """From /proc/self/status, or where that cannot be read from a probe file's mode: the same answer, and the
    process's umask is never set (setting it, even for a moment, races threads that create files)."""
    mask = 0o027
    previous = os.umask(mask)
    try:
        if not proc:
            class NoProc(type(Path())):
                def read_text(self, *args, **kwargs):
                    raise OSError("no /proc here")

            monkeypatch.setattr(files, "Path", NoProc)
        set_masks = []
        real_umask = os.umask
        monkeypatch.setattr(os, "umask", lambda m: set_masks.append(m) or real_umask(m))
        assert files.current_umask() == mask
        assert set_masks == []
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_orphaned_future_errors_after_a_reported_write_failure_are_not_logged(caplog):
    """Orbax's other writer tasks of a save that failed on a full disk: asyncio logged each one's traceback when it
    was collected, after the command's one error line."""
    import asyncio
    import gc
    import logging

    loop = asyncio.new_event_loop()

    def orphan():
        loop.create_future().set_exception(OSError(28, "No space left on device"))

    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            orphan()
            gc.collect()
            assert any("never retrieved" in r.getMessage() for r in caplog.records)  # what asyncio does
            caplog.clear()
            files.drop_orphaned_future_errors()
            orphan()
            gc.collect()
            logging.getLogger("asyncio").error("another asyncio error")
            assert [r.getMessage() for r in caplog.records] == ["another asyncio error"]
    finally:
        logging.getLogger("asyncio").removeFilter(files._ORPHANED_FUTURE_ERRORS)
        loop.close()

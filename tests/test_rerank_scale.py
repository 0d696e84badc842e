"""Re-ranking at scale: windows, bounded reading, progress + --resume (crashes, signals), processes, bad input."""

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sce_jax import rerank as rerank_module
from sce_jax.batch import Row, length_buckets, pack_documents
from sce_jax.errors import run_cli
from sce_jax.progress import ProgressFile
from sce_jax.rerank import plan_windows, share_windows
from sce_jax.runs import read_json_run

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_RUN = REPO / "examples" / "run.jsonl"
MAX_LENGTH = 64


def _args(output, *extra, run=EXAMPLE_RUN):
    return ["--run", str(run), "--output", str(output), "--max-length", str(MAX_LENGTH), "--max-query-length", "16",
            "--batch-size", "4", "--window", "10", "--depth", "0", "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def encoder(tiny_sparse_dir):
    from sce_jax.encoder import SparseCrossEncoder

    return SparseCrossEncoder.load(tiny_sparse_dir, max_length=MAX_LENGTH, max_query_length=16)


@pytest.fixture
def cli(encoder, tiny_sparse_dir, monkeypatch):
    """The rerank command in this process, with the module's model (loaded and compiled once)."""
    monkeypatch.setattr(rerank_module, "load_encoder", lambda config: encoder)

    def run(*args) -> int:
        return run_cli(rerank_module.main, ["--model", str(tiny_sparse_dir), *args])

    return run


@pytest.fixture(scope="module")
def baseline(encoder, tiny_sparse_dir, tmp_path_factory):
    """The uninterrupted run's bytes (4 queries x 10 documents, windows of one query)."""
    output = tmp_path_factory.mktemp("baseline") / "run.trec"
    original = rerank_module.load_encoder
    rerank_module.load_encoder = lambda config: encoder
    try:
        assert run_cli(rerank_module.main, ["--model", str(tiny_sparse_dir), *_args(output)]) == 0
    finally:
        rerank_module.load_encoder = original
    return output.read_bytes()


# --- pure planning ---------------------------------------------------------------------------------------------


def test_plan_windows_groups_whole_queries():
    bounds = np.array([0, 3, 4, 10, 10, 12])  # queries of 3, 1, 6, 0, 2 documents
    assert plan_windows(bounds, 4) == [(0, 2), (2, 3), (3, 5)]
    assert plan_windows(bounds, 100) == [(0, 5)]
    assert plan_windows(bounds, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_share_windows_is_a_balanced_partition():
    sizes = [10, 1, 1, 1, 10, 5, 5, 1]
    for n in (1, 2, 3, 5, 8, 12):
        shares = [share_windows(sizes, n, p) for p in range(n)]
        assert [k for share in shares for k in share] == list(range(len(sizes)))
    halves = [share_windows(sizes, 2, p) for p in range(2)]
    assert [sum(sizes[k] for k in share) for share in halves] == [13, 21]


def _first_fit_reference(lengths, doc_query, buckets, max_slots):
    """Today's (before this change) per-query scan, as the reference for the linear version."""
    from sce_jax.batch import PACKED_ROW_LENGTH, bucket_length

    rows = []
    for query in dict.fromkeys(doc_query.tolist()):
        docs = np.flatnonzero(doc_query == query)
        docs = docs[np.argsort(-lengths[docs], kind="stable")]
        length = bucket_length(max(int(lengths[docs[0]]), min(PACKED_ROW_LENGTH, buckets[-1])), buckets)
        free, members = [], []
        for doc in docs.tolist():
            n = lengths[doc]
            target = next((r for r, room in enumerate(free) if room >= n and len(members[r]) < max_slots), None)
            if target is None:
                free.append(length)
                members.append([])
                target = len(free) - 1
            free[target] -= n
            members[target].append(doc)
        rows += [Row(length, query, m) for m in members]
    return sorted(rows, key=lambda row: (row.length, row.query))


@pytest.mark.parametrize("seed", range(5))
def test_pack_documents_equals_the_per_query_scan(seed):
    rng = np.random.default_rng(seed)
    buckets = length_buckets(512, step=16)
    n = int(rng.integers(1, 400))
    lengths = rng.integers(5, 300, n)
    doc_query = rng.integers(0, 20, n) * 7  # query ids need not be dense
    for slots in (2, 8):
        assert pack_documents(lengths, doc_query, buckets, max_slots=slots) == \
            _first_fit_reference(lengths, doc_query, buckets, slots)


# --- bounded reading -------------------------------------------------------------------------------------------


def test_reads_only_the_needed_texts_and_scores_window_by_window(cli, tmp_path, monkeypatch, caplog):
    from sce_jax import texts as texts_module

    (tmp_path / "docs.tsv").write_text("".join(f"d{i}\tpassage number {i} about bees\n" for i in range(100_000)))
    (tmp_path / "queries.tsv").write_text("".join(f"q{i}\tquery {i}\n" for i in range(10)))
    rng = np.random.default_rng(0)
    lines = [f"q{q} Q0 d{d} {r} {-r} bm25\n" for q in range(10) for r, d in enumerate(rng.choice(100_000, 20), 1)]
    (tmp_path / "run.trec").write_text("".join(lines))
    stores, windows = [], []
    real_texts = texts_module.RunTexts

    class CountingTexts(real_texts):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self.store)

    monkeypatch.setattr(rerank_module, "RunTexts", CountingTexts)
    real_score = type(rerank_module.load_encoder(None)).score_window
    monkeypatch.setattr(type(rerank_module.load_encoder(None)), "score_window",
                        lambda self, queries, docs, *a, **k: windows.append(len(docs)) or real_score(
                            self, queries, docs, *a, **k))
    assert cli(*_args(tmp_path / "out.trec", "--depth", 5, "--docs", tmp_path / "docs.tsv", "--queries",
                      tmp_path / "queries.tsv", run=tmp_path / "run.trec")) == 0
    assert stores[0].texts_read == 50  # 10 queries x depth 5, of a 100k-line collection
    assert windows == [10] * 5  # windows of 10 documents (2 queries), never the whole run
    assert len((tmp_path / "out.trec").read_text().splitlines()) == 50


# --- progress and resume ------------------------------------------------------------------------------------------


class _Died(BaseException):
    """Stands for the process dying (SIGKILL) inside ProgressFile.append."""


def _die_at_append(monkeypatch, number: int, torn: bool):
    real = ProgressFile.append
    calls = []

    def append(self, window, payload, **meta):
        calls.append(window)
        if len(calls) == number:
            if torn:  # half a record reached the disk
                record = json.dumps({"window": window, "bytes": len(payload), "checksum": "0" * 32}).encode() + b"\n"
                os.write(self._fd, (record + payload)[: len(record) + len(payload) // 2])
            raise _Died
        real(self, window, payload, **meta)

    monkeypatch.setattr(ProgressFile, "append", append)
    return real


@pytest.mark.parametrize("number, torn", [(1, False), (2, True), (3, False), (4, True)])
def test_resume_after_a_crash_is_byte_identical(cli, baseline, tmp_path, monkeypatch, number, torn):
    output = tmp_path / "run.trec"
    real = _die_at_append(monkeypatch, number, torn)
    with pytest.raises(_Died):
        cli(*_args(output))
    monkeypatch.setattr(ProgressFile, "append", real)
    progress = Path(f"{output}.progress")
    assert not output.exists()
    if number == 1:  # failed before any window was saved: nothing is left behind
        assert not progress.exists()
    else:
        assert len(ProgressFile.read(progress).done) == number - 1  # a torn record is dropped
        assert cli(*_args(output)) == 2  # without --resume: refused
    assert cli(*_args(output, "--resume")) == 0
    assert output.read_bytes() == baseline
    assert not progress.exists()


def test_existing_progress_without_resume_names_the_flag(cli, tmp_path, monkeypatch, capsys):
    output = tmp_path / "run.trec"
    real = _die_at_append(monkeypatch, 2, False)
    with pytest.raises(_Died):
        cli(*_args(output))
    monkeypatch.setattr(ProgressFile, "append", real)
    before = Path(f"{output}.progress").read_bytes()
    assert cli(*_args(output)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "add --resume to continue it, or delete" in err[-1]
    assert cli(*_args(output, "--resume", "--batch-size", 8)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume: --batch-size differs from the interrupted run's (4 then, 8 now)" in err
    assert Path(f"{output}.progress").read_bytes() == before and not output.exists()


@pytest.mark.parametrize("signum, at_check, code, message", [
    (signal.SIGINT, 2, 130, "stopped (SIGINT) before any query was saved; nothing was written"),
    (signal.SIGINT, 5, 130, "run the same command with --resume to continue"),
    (signal.SIGTERM, 7, 143, "run the same command with --resume to continue"),
])
def test_signals_stop_after_the_batch_and_resume(cli, baseline, tmp_path, monkeypatch, capsys, signum, at_check,
                                                 code, message):
    output = tmp_path / "run.trec"
    checks = []
    real_check = rerank_module._Signals.check

    def check(self):
        checks.append(1)
        if len(checks) == at_check:
            os.kill(os.getpid(), signum)
        return real_check(self)

    monkeypatch.setattr(rerank_module._Signals, "check", check)
    assert cli(*_args(output)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
    assert not output.exists()
    assert Path(f"{output}.progress").exists() == ("nothing was written" not in message)
    assert not Path(f"{output}.lock").exists()
    monkeypatch.setattr(rerank_module._Signals, "check", real_check)
    assert cli(*_args(output, "--resume")) == 0
    assert output.read_bytes() == baseline


def _subprocess(args, cache, **env_extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache, "PYTHONPATH": str(REPO),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "sce_jax.rerank", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_and_resume_in_a_real_process(tiny_sparse_dir, baseline, tmp_path):
    output = tmp_path / "run.trec"
    args = ["--model", str(tiny_sparse_dir), *_args(output)]
    cache = str(tmp_path / "xla")
    process = _subprocess(args, cache)
    progress = Path(f"{output}.progress")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        saved = ProgressFile.read(progress)
        if saved is not None and len(saved.done) >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not output.exists()
    resumed = _subprocess([*args, "--resume"], cache)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-2000:]
    assert output.read_bytes() == baseline


def _two_processes(model_dir, output: Path, cache: str, extra=((), ())) -> tuple[list, list[str]]:
    """Both processes of a 2-process job on localhost (process p with the flags `extra[p]` added), run to their
    end: (return codes, logs). A process still running after 300 s is killed, not left behind."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [_subprocess(["--model", str(model_dir), *_args(output), "--coordinator", f"localhost:{port}",
                              "--num-processes", "2", "--process-id", str(p), *extra[p]], cache) for p in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [p.returncode for p in processes], logs


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tiny_sparse_dir, baseline, tmp_path):
    output = tmp_path / "run.trec"
    codes, logs = _two_processes(tiny_sparse_dir, output, str(tmp_path / "xla"))
    assert codes == [0, 0], logs
    assert "process 1 of 2 takes windows 2..3" in logs[1]
    assert output.read_bytes() == baseline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec", "xla"]


@pytest.mark.slow
def test_a_failing_process_stops_the_others_with_one_line(tiny_sparse_dir, tmp_path):
    """Process 1 fails after joining the job (a device count it does not have); process 0 scores its share,
    meets it at the barrier and stops too, naming it, instead of waiting there. Nothing is written."""
    output = tmp_path / "run.trec"
    codes, logs = _two_processes(tiny_sparse_dir, output, str(tmp_path / "xla"), extra=((), ("--devices", "5")))
    assert codes == [2, 2], logs
    failure = "--devices 5, but this machine has 1 local device"
    assert f"error: {failure}" in logs[1].splitlines()
    assert f"error: process 1 of 2 failed: {failure}" in logs[0].splitlines()
    assert not output.exists()


# --- outputs ------------------------------------------------------------------------------------------------------


def test_gz_output_symlink_and_umask(cli, baseline, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli(*_args(tmp_path / "run.trec.gz")) == 0
        assert gzip.decompress((tmp_path / "run.trec.gz").read_bytes()) == baseline
        target = tmp_path / "target.trec"
        target.write_text("old\n")
        (tmp_path / "link.trec").symlink_to(target)
        assert cli(*_args(tmp_path / "link.trec")) == 0
        assert (tmp_path / "link.trec").is_symlink() and target.read_bytes() == baseline
        assert (target.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_relative_paths_from_another_directory(cli, baseline, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    run = read_json_run(EXAMPLE_RUN)
    (tmp_path / "data" / "run.trec").write_text("".join(f"{q} Q0 {d} {r:.0f} {s} x\n" for q, d, r, s in zip(
        run.qid, run.docno, run["rank"], run.score)))
    (tmp_path / "data" / "docs.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in zip(run.docno, run.text)))
    (tmp_path / "data" / "q.tsv").write_text("".join(
        f"{q}\t{t}\n" for q, t in dict(zip(run.qid, run["query"])).items()))
    monkeypatch.chdir(tmp_path / "data")
    assert cli(*_args("../out.trec", "--docs", "docs.tsv", "--queries", "q.tsv", run="run.trec")) == 0
    assert (tmp_path / "out.trec").read_bytes() == baseline


# --- bad input: one line, rc 2, nothing written -----------------------------------------------------------------

GOOD_JSON = '{"qid": "1", "docno": "a", "query": "q", "text": "t", "rank": 1}\n'

BAD = {
    "corrupt gz run": ("run.trec.gz", gzip.compress(b"1 Q0 a 1 2.0 x\n" * 50)[:-9], [], "run.trec.gz: not a valid gzip"),
    "not-gzip .gz": ("run.trec.gz", b"1 Q0 a 1 2.0 x\n", [], "run.trec.gz: not a valid gzip"),
    "non-UTF-8 run": ("run.trec", b"1 Q0 a 1 2.0 x\n1 Q0 \xff 2 1.0 x\n", [], "run.trec: line 2: not UTF-8"),
    "JSON rank 1.7": ("run.jsonl", GOOD_JSON.replace('"rank": 1', '"rank": 1.7').encode(), [],
                      "run.jsonl: line 1: rank 1.7 is not an integer"),
    "TREC rank 3.5": ("run.trec", b"1 Q0 a 3.5 2.0 x\n", [], "run.trec: line 1: rank '3.5' is not an integer"),
    "qid a float": ("run.jsonl", GOOD_JSON.replace('"qid": "1"', '"qid": 1.0').encode(), [],
                    "line 1: qid must be a string (or an integer), got 1.0"),
    "qid a list": ("run.jsonl", GOOD_JSON.replace('"qid": "1"', '"qid": [1]').encode(), [], "got [1]"),
    "qid a boolean": ("run.jsonl", GOOD_JSON.replace('"qid": "1"', '"qid": true').encode(), [], "got true"),
    "lone surrogate": ("run.jsonl", GOOD_JSON.replace('"t"', '"\\ud83d"').encode(), [],
                       "run.jsonl: line 1: text contains a lone surrogate"),
    "missing docs file": ("run.trec", b"1 Q0 a 1 2.0 x\n", ["--docs", "nope.tsv", "--queries", "q.tsv"],
                          "nope.tsv: no such documents file"),
    "missing queries file": ("run.trec", b"1 Q0 a 1 2.0 x\n", ["--docs", "d.tsv", "--queries", "nope.tsv"],
                             "nope.tsv: no such queries file"),
    "missing qrels file": ("run.jsonl", GOOD_JSON.encode(), ["--qrels", "nope.txt"], "nope.txt: no such qrels file"),
    "non-UTF-8 docs": ("run.trec", b"1 Q0 a 1 2.0 x\n", ["--docs", "bad.tsv", "--queries", "q.tsv"],
                       "bad.tsv: line 2: not UTF-8"),
    "second text for a qid": ("run.trec", b"1 Q0 a 1 2.0 x\n", ["--docs", "d.tsv", "--queries", "q2.tsv"],
                              "q2.tsv: line 2: a second, different text for id '1'"),
    "output is a directory": ("run.jsonl", GOOD_JSON.encode(), ["--output", "adir"], "--output"),
    "output is the run": ("run.jsonl", GOOD_JSON.encode(), ["--output", "run.jsonl"],
                          "is the --run file: it would be overwritten"),
    "output directory missing": ("run.jsonl", GOOD_JSON.encode(), ["--output", "no/dir/out.trec"],
                                 "does not exist"),
    "eval-output directory missing": ("run.jsonl", GOOD_JSON.encode(), ["--eval-output", "no/dir/e.json"],
                                      "--eval-output"),
    "run tag with a space": ("run.jsonl", GOOD_JSON.encode(), ["--run-tag", "a b"], "--run-tag 'a b'"),
    "bad dtype": ("run.jsonl", GOOD_JSON.encode(), ["--dtype", "float8"], "--dtype must be one of"),
    "max length over the model's": ("run.jsonl", GOOD_JSON.encode(), ["--max-length", "4096"], "--max-length: "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_rc_2_nothing_written(case, tiny_sparse_dir, tmp_path, monkeypatch, capsys):
    name, content, extra, message = BAD[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(content)
    (tmp_path / "d.tsv").write_text("a\tsome text\n")
    (tmp_path / "bad.tsv").write_bytes(b"a\tok\nb\t\xe9t\xe9\n")
    (tmp_path / "q.tsv").write_text("1\tsome query\n")
    (tmp_path / "q2.tsv").write_text("1\tsome query\n1\tanother query\n")
    (tmp_path / "adir").mkdir()
    def listing():  # a collection's cached index (beside it) is a cache, not an output
        return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".sce_jax-index"))

    before = listing()
    args = ["--model", str(tiny_sparse_dir), "--run", name, "--output", "out.trec", "--no-progress", *extra]
    if "--max-length" not in extra:
        args += ["--max-length", "64"]
    assert run_cli(rerank_module.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert listing() == before


def test_truncated_documents_are_counted_and_max_p_suggested(cli, tmp_path, caplog):
    long_text = " ".join(["telescope mirror lens"] * 40)  # > 64 tokens with its query
    records = [{"qid": "1", "query": "telescopes", "docno": d, "text": t, "rank": r}
               for r, (d, t) in enumerate([("long", long_text), ("short", "a lens"), ("long2", long_text)], 1)]
    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli(*_args(tmp_path / "out.trec", run=run)) == 0
    assert "2 of 3 documents were longer than the max length (64 tokens with their query) and were truncated; " \
           "--max-p scores them by their best chunk instead" in caplog.text
    caplog.clear()
    assert cli(*_args(tmp_path / "out2.trec", "--max-p", run=run)) == 0
    assert "were truncated" not in caplog.text


# --- one run per output, progress records in sequence, content fingerprints ------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_on_one_output_refuses_at_once_naming_the_first(cli, baseline, tmp_path, capsys, resume):
    import fcntl

    output = tmp_path / "run.trec"
    lock = Path(f"{output}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)  # another process's lock (flock: per open file)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 4242 on otherhost\n")
    try:
        assert cli(*_args(output, *(["--resume"] if resume else []))) == 2
    finally:
        os.close(fd)  # as when that process dies: its lock file stays, unlocked
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {output} is in use by pid 4242 on otherhost (lock file {lock}); wait for it to "
                   "finish, or stop it first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec.lock"]  # nothing written
    assert cli(*_args(output, *(["--resume"] if resume else []))) == 0  # a dead process's lock does not block
    assert output.read_bytes() == baseline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec"]


def _records(path: Path) -> tuple[bytes, list[bytes]]:
    """A progress file's header line and its records (each its JSON line and payload)."""
    data = path.read_bytes()
    header, _, rest = data.partition(b"\n")
    records = []
    while rest:
        line, _, rest = rest.partition(b"\n")
        size = json.loads(line)["bytes"]
        records.append(line + b"\n" + rest[:size])
        rest = rest[size:]
    return header + b"\n", records


def _three_windows_saved(cli, monkeypatch, output) -> Path:
    real = _die_at_append(monkeypatch, 4, False)
    with pytest.raises(_Died):
        cli(*_args(output))
    monkeypatch.setattr(ProgressFile, "append", real)
    return Path(f"{output}.progress")


@pytest.mark.parametrize("damage, warning", [
    ("window 2 -> 0", "the record at byte {offset} (after 2 consistent windows) fails its checksum"),
    ("record 2 repeated", "(after 2 consistent windows) is out of sequence (window 1 where window 2 belongs)"),
    ("record 2 missing", "(after 1 consistent windows) is out of sequence (window 2 where window 1 belongs)"),
    ("records 2 and 3 swapped", "(after 1 consistent windows) is out of sequence (window 2 where window 1 belongs)"),
])
def test_records_out_of_sequence_or_altered_are_scored_again(cli, baseline, tmp_path, monkeypatch, caplog, damage,
                                                             warning):
    """Changing a record's window number (or repeating, dropping, reordering records) once resumed with exit 0 into
    a run that missed some queries and held others twice."""
    output = tmp_path / "run.trec"
    progress = _three_windows_saved(cli, monkeypatch, output)
    header, records = _records(progress)
    offset = len(header) + len(records[0]) + len(records[1])
    if damage == "window 2 -> 0":
        assert records[2].count(b'"window": 2') == 1
        records[2] = records[2].replace(b'"window": 2', b'"window": 0')
    elif damage == "record 2 repeated":
        records.insert(2, records[1])
    elif damage == "record 2 missing":
        del records[1]
    else:
        records[1], records[2] = records[2], records[1]
    progress.write_bytes(header + b"".join(records))
    assert cli(*_args(output, "--resume")) == 0
    assert warning.format(offset=offset) in caplog.text and "those windows will be scored again" in caplog.text
    assert output.read_bytes() == baseline


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "empty", "other format"])
def test_a_damaged_progress_header_is_refused_not_started_over(cli, tmp_path, monkeypatch, capsys, damage):
    output = tmp_path / "run.trec"
    progress = _three_windows_saved(cli, monkeypatch, output)
    header, records = _records(progress)
    header = {"bit flip": header.replace(b'"--depth": 0', b'"--depth": 1'), "truncated": header[:40],
              "empty": b"", "other format": b'{"format": "sce_jax-progress/1", "settings": {}}\n'}[damage]
    progress.write_bytes(header + b"".join(records) if damage != "truncated" else header)
    before = progress.read_bytes()
    assert cli(*_args(output, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = ("was written by another version of sce_jax (sce_jax-progress/1" if damage == "other format" else
                "its header is damaged")
    assert err.startswith(f"error: {progress}") and expected in err and "delete it to start over" in err
    assert progress.read_bytes() == before and not output.exists()


def test_a_run_edited_at_the_same_size_with_its_mtime_restored_is_refused(cli, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run.jsonl"
    run.write_bytes(EXAMPLE_RUN.read_bytes())
    output = tmp_path / "run.trec"
    real = _die_at_append(monkeypatch, 3, False)
    with pytest.raises(_Died):
        cli(*_args(output, run=run))
    monkeypatch.setattr(ProgressFile, "append", real)
    stat = run.stat()
    data = run.read_bytes()
    assert data.count(b"hornets") == 1
    run.write_bytes(data.replace(b"hornets", b"beetles"))
    os.utime(run, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run.stat().st_size == stat.st_size and run.stat().st_mtime_ns == stat.st_mtime_ns
    assert cli(*_args(output, "--resume", run=run)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: --resume: --run {run}: its content differs from the interrupted run's; run with the "
                   f"interrupted run's settings, or delete {output}.progress to start over")
    run.write_bytes(data)  # the same content again (a new mtime) resumes
    assert cli(*_args(output, "--resume", run=run)) == 0


def test_a_progress_directory_or_read_only_and_a_pipe_as_docs_are_one_line(cli, tmp_path, capsys, monkeypatch):
    output = tmp_path / "run.trec"
    Path(f"{output}.progress").mkdir()
    assert cli(*_args(output, "--resume")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {output}.progress is not a regular file (a directory?); it should hold the progress of an "
        "interrupted run: move it away to start over")
    Path(f"{output}.progress").rmdir()
    readonly = _three_windows_saved(cli, monkeypatch, output)
    readonly.chmod(0o444)
    access = os.access  # root may write anyway: make the check see what a user would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (str(p) == str(readonly) and mode & os.W_OK)
                        and access(p, mode, **kw))
    assert cli(*_args(output, "--resume")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {readonly} cannot be read and written (a read-only file or file system?): --resume appends to it")
    os.mkfifo(tmp_path / "docs.tsv")  # as --docs <(cat docs.tsv) gives
    (tmp_path / "run.txt").write_text("1 Q0 a 1 2.0 x\n")
    (tmp_path / "q.tsv").write_text("1\tq\n")
    assert cli(*_args(tmp_path / "other.trec", "--docs", tmp_path / "docs.tsv", "--queries", tmp_path / "q.tsv",
                      run=tmp_path / "run.txt")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --docs {tmp_path / 'docs.tsv'} is not a regular file (a pipe?): its lines are looked up by offset, "
        "so save it to a file first")


# --- a full disk: one line, exit 2, the saved windows kept and resumable --------------------------------------


@pytest.fixture(scope="module")
def wide_run(encoder, tiny_sparse_dir, tmp_path_factory):
    """A run whose every window's output (60 lines of long docnos) is larger than a page of a tmpfs (4 KiB), and
    its uninterrupted output's bytes."""
    directory = tmp_path_factory.mktemp("wide")
    records = [{"qid": f"q{q}", "query": f"query {q}", "docno": f"d{q}-{i:02d}-" + "x" * 80,
                "text": f"passage {i} about topic {q}", "rank": i + 1} for q in range(3) for i in range(60)]
    run = directory / "run.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in records))
    original = rerank_module.load_encoder
    rerank_module.load_encoder = lambda config: encoder
    try:
        assert run_cli(rerank_module.main, ["--model", str(tiny_sparse_dir),
                                            *_args(directory / "out.trec", "--window", 60, run=run)]) == 0
    finally:
        rerank_module.load_encoder = original
    return run, (directory / "out.trec").read_bytes()


@pytest.mark.parametrize("when", ["saving window 1", "writing the output"])
def test_a_full_disk_is_one_line_and_the_run_resumes(cli, wide_run, small_fs, monkeypatch, capsys, when):
    run, expected = wide_run
    disk = small_fs.mount(256)
    output = disk / "run.trec"
    if when == "saving window 1":
        target, name = ProgressFile, "append"
        real = ProgressFile.append
        monkeypatch.setattr(target, name, lambda self, window, *a, **k: (
            small_fs.fill(disk) if window == 1 else None, real(self, window, *a, **k))[1])
    else:
        target, name = rerank_module, "_assemble"
        real = rerank_module._assemble
        monkeypatch.setattr(target, name, lambda *a: (small_fs.fill(disk), real(*a))[1])
    assert cli(*_args(output, "--window", 60, run=run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if not line.startswith("INFO")]) == 1, err
    if when == "saving window 1":
        assert err[-1] == (f"error: cannot write {output}.progress: No space left on device; the 1 windows saved "
                           "before are kept: make room, then run the same command with --resume")
        assert len(ProgressFile.read(Path(f"{output}.progress")).done) == 1
    else:
        assert err[-1] == (f"error: cannot write {output}: No space left on device; the scored windows are kept in "
                           f"{output}.progress: run the same command with --resume to write it")
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "run.trec.progress"]  # no partial file, no lock
    monkeypatch.setattr(target, name, real)
    (disk / "filler").unlink()
    assert cli(*_args(output, "--window", 60, "--resume", run=run)) == 0
    assert output.read_bytes() == expected
    assert sorted(p.name for p in disk.iterdir()) == ["run.trec"]

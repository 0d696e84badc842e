"""TextStore: id -> text lookups from an on-disk index, reading only the lines asked for."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from sce_jax import idhash, textstore
from sce_jax.cache import CACHE_ENV
from sce_jax.errors import InputError, MissingTextError
from sce_jax.idhash import hash_fixed, hash_ids
from sce_jax.texts import read_tsv_texts
from sce_jax.textstore import TextStore


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_lookups_read_only_the_lines_asked_for(tmp_path):
    lines = "".join(f"d{i}\ttext of {i}\tand a title {i}\n" for i in range(100_000))
    path = _write(tmp_path / "c.tsv", lines.encode())
    wanted = [f"d{i}" for i in range(0, 100_000, 2000)]  # 50 ids
    with TextStore.open(path) as store:
        assert len(store) == 100_000
        assert store.get_many(wanted) == [f"text of {i} and a title {i}" for i in range(0, 100_000, 2000)]
        assert store.texts_read == 50
        assert "d99999" in store and "d100000" not in store
    reference = read_tsv_texts(path)
    with TextStore.open(path) as store:  # the cached index, checked
        assert store.get_many(wanted[:3]) == [reference[i] for i in wanted[:3]]


def test_missing_ids_name_the_file_and_at_most_five(tmp_path):
    path = _write(tmp_path / "c.tsv", b"a\tx\n")
    with TextStore.open(path, kind="queries") as store:
        with pytest.raises(MissingTextError, match=r"c\.tsv: no text for 6 queries \(b, c, d, e, f, \.\.\.\)"):
            store.get_many(["a", "b", "c", "d", "e", "f", "g"])


def test_bom_crlf_blank_lines_tabs_and_identical_repeats(tmp_path):
    path = _write(tmp_path / "c.tsv", b"\xef\xbb\xbfd1\tone\ttwo\r\n\n   \nd2\t\nd1\tone\ttwo\n")
    with TextStore.open(path) as store:
        assert len(store) == 2
        assert store.get_many(["d1", "d2"]) == ["one two", ""]


@pytest.mark.parametrize("data, message", [
    (b"a\tb\nc no tab\n", r"c\.tsv: line 2: expected an id, a tab, then the text"),
    (b"a\tb\n\tno id\n", r"c\.tsv: line 2: expected an id"),
    (b"a\tb\nc\tok\xff\n", r"c\.tsv: line 2: not UTF-8 \(byte 0xff at column 5\)"),
    (b"a\tb\nc\td\na\tother\n", r"c\.tsv: line 3: a second, different text for id 'a' \(first at line 1\)"),
])
def test_bad_lines_name_file_and_line(tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        TextStore.open(_write(tmp_path / "c.tsv", data))


def test_jsonl_and_json_list(tmp_path):
    path = _write(tmp_path / "d.jsonl", b'{"docno": "d1", "text": "one"}\n\n{"doc_id": 2, "text": "two"}\n')
    with TextStore.open(path) as store:
        assert store.get_many(["2", "d1"]) == ["two", "one"]
    path = _write(tmp_path / "l.json", b'[{"docno": "d1", "text": "one"}, {"docno": "d2", "text": "two"}]')
    with TextStore.open(path) as store:
        assert store.get_many(["d2"]) == ["two"] and len(store) == 2


@pytest.mark.parametrize("line, message", [
    (b'{"docno": 1.5, "text": "x"}', "line 2: expected an object"),
    (b'{"docno": true, "text": "x"}', "line 2: expected an object"),
    (b'{"docno": ["a"], "text": "x"}', "line 2: expected an object"),
    (b'{"docno": "a", "text": "\\ud83d"}', r"line 2: text contains a lone surrogate"),
    (b'{"docno": "a", "text"', "line 2: malformed JSON"),
])
def test_bad_json_lines(tmp_path, line, message):
    with pytest.raises(InputError, match=message):
        TextStore.open(_write(tmp_path / "d.jsonl", b'{"docno": "z", "text": "ok"}\n' + line + b"\n"))


def test_gzip_is_decompressed_once_into_the_cache(tmp_path, cache):
    path = _write(tmp_path / "c.tsv.gz", gzip.compress(b"x\ty\nz\tw\n"))
    with TextStore.open(path) as store:
        assert store.get_many(["z", "x"]) == ["w", "y"]
    assert len(list((cache / "textstore").glob("*.txt"))) == 1
    with pytest.raises(InputError, match=r"bad\.tsv\.gz: not a valid gzip file"):
        TextStore.open(_write(tmp_path / "bad.tsv.gz", gzip.compress(b"x\ty\n" * 100)[:-7]))
    with pytest.raises(InputError, match=r"plain\.tsv\.gz: not a valid gzip file"):
        TextStore.open(_write(tmp_path / "plain.tsv.gz", b"x\ty\n"))


def test_index_is_rebuilt_when_the_file_changes_or_the_index_is_damaged(tmp_path):
    path = _write(tmp_path / "c.tsv", b"a\tfirst\n")
    TextStore.open(path).close()
    index = tmp_path / ".c.tsv.sce_jax-index"
    assert index.is_file()
    _write(path, b"a\tsecond one\n")
    os.utime(path, ns=(1, 1))
    with TextStore.open(path) as store:
        assert store.get_many(["a"]) == ["second one"]
    data = bytearray(index.read_bytes())
    data[-3] ^= 0xFF  # a damaged array: the checksum no longer matches
    index.write_bytes(bytes(data))
    with TextStore.open(path) as store:
        assert store.get_many(["a"]) == ["second one"]
    index.write_bytes(index.read_bytes()[:-5])  # truncated
    with TextStore.open(path) as store:
        assert store.get_many(["a"]) == ["second one"]


def test_read_only_directory_uses_the_cache(tmp_path, cache, monkeypatch):
    directory = tmp_path / "ro"
    directory.mkdir()
    path = _write(directory / "c.tsv", b"a\tx\n")
    access = os.access  # root can write anywhere: pretend the directory is read-only
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(directory) and mode & os.W_OK
                        else access(p, mode))
    with TextStore.open(path) as store:
        assert store.get_many(["a"]) == ["x"]
    assert list(directory.iterdir()) == [path]
    assert len(list((cache / "textstore").glob("*.index"))) == 1


def test_hash_collisions_are_resolved_by_the_id(tmp_path, monkeypatch):
    monkeypatch.setattr(idhash, "hash_spans", lambda buffer, starts, lengths: np.zeros(len(starts), np.uint64))
    path = _write(tmp_path / "c.tsv", b"a\t1\nb\t2\nc\t3\nb\t2\n")
    with TextStore.open(path) as store:
        assert len(store) == 3
        assert store.get_many(["c", "a", "b"]) == ["3", "1", "2"]
        assert "d" not in store


def test_hash_is_fnv1a():
    # FNV-1a 64 reference values (the published test vectors).
    assert hash_ids([b"", b"a", b"foobar"]).tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    ids = [b"a", b"foobar", b"d12345", b"x"]
    assert hash_fixed(np.array(ids, dtype=bytes)).tolist() == hash_ids(ids).tolist()


def test_absent_from_the_index_alone(tmp_path):
    path = _write(tmp_path / "c.tsv", b"a\t1\nbb\t2\n")
    with TextStore.open(path) as store:
        assert store.absent(np.array([b"bb", b"c", b"a", b"aa"])).tolist() == [False, True, False, True]
        assert store.texts_read == 0


def _reference_index(data: bytes):
    """The index by the earlier algorithm: every line's (hash, offset, length, line number), each id's first line
    kept, sorted by hash then offset (np.lexsort)."""
    rows, seen, offset = [], set(), 0
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        text_id = line.split(b"\t", 1)[0]
        if line.strip() and text_id not in seen:
            seen.add(text_id)
            rows.append((int(hash_ids([text_id])[0]), offset, len(line), number))
        offset += len(line) + 1
    hashes, offsets, lengths, lines = (np.array(c) for c in zip(*rows))
    order = np.lexsort((offsets, hashes))
    return hashes[order], offsets[order], lengths[order], lines[order]


@pytest.mark.parametrize("collide", [False, True])
def test_index_equals_the_earlier_sort_with_repeats_and_collisions(tmp_path, monkeypatch, collide):
    if collide:  # few distinct hashes (the reference's too): many lines of one hash, kept in file order
        real = idhash.hash_spans
        monkeypatch.setattr(idhash, "hash_spans", lambda b, s, n: real(b, s, n) % np.uint64(5))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 400, 3000)
    data = "".join(f"d{i}\ttext of {i}\n" for i in ids).encode()  # repeats: identical lines
    path = _write(tmp_path / "c.tsv", data)
    monkeypatch.setattr(textstore, "CHUNK_BYTES", 4096)  # many chunks
    with TextStore.open(path) as store:
        index = store._index
        for got, expected in zip((index.hashes, index.offsets, index.lengths, index.lines), _reference_index(data)):
            np.testing.assert_array_equal(got, expected)
        assert len(store) == len(set(ids.tolist()))
        assert store.get_many([f"d{i}" for i in ids[:50]]) == [f"text of {i}" for i in ids[:50]]


def test_index_checksum_is_verified_in_blocks(tmp_path, monkeypatch):
    path = _write(tmp_path / "c.tsv", "".join(f"d{i}\t{i}\n" for i in range(1000)).encode())
    TextStore.open(path).close()
    index_path = tmp_path / ".c.tsv.sce_jax-index"
    key = {**textstore._source_key(path), "format": "tsv"}
    monkeypatch.setattr(textstore, "_VERIFY_BYTES", 1000)  # the arrays span many reads
    good = textstore._Index.load(index_path, key)
    assert good is not None and isinstance(good.hashes, np.memmap) and len(good.hashes) == 1000
    original = index_path.read_bytes()
    for at in (len(original) - 4 * 8000 + 5, len(original) - 2 * 8000 + 3333, len(original) - 1):
        damaged = bytearray(original)
        damaged[at] ^= 0x01  # one bit in one of the arrays
        index_path.write_bytes(bytes(damaged))
        assert textstore._Index.load(index_path, key) is None


def test_a_damaged_decompressed_copy_is_made_again(tmp_path, cache):
    lines = b"".join(b"d%d\ttext number %d\n" % (i, i) for i in range(1000))
    path = _write(tmp_path / "c.tsv.gz", gzip.compress(lines))
    TextStore.open(path).close()
    copy, = (cache / "textstore").glob("*.txt")
    copy.write_bytes(lines[:-100])  # truncated: once served cut texts (and lost the last ids)
    with TextStore.open(path) as store:
        assert store.get_many(["d999", "d5"]) == ["text number 999", "text number 5"]
    assert copy.read_bytes() == lines
    stat = copy.stat()
    copy.write_bytes(lines.replace(b"text number 5\n", b"TEXT NUMBER 5\n"))  # same size, mtime restored
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with TextStore.open(path) as store:
        assert store.get_many(["d5"]) == ["text number 5"]


def test_interrupted_decompression_leaves_no_partial_copy(tmp_path, cache):
    import subprocess
    import sys

    path = _write(tmp_path / "c.tsv.gz", gzip.compress(b"".join(b"d%d\tt\n" % i for i in range(100_000))))
    script = (
        "import os, shutil, signal, sys\n"
        "from sce_jax import textstore\n"
        "from sce_jax.errors import run_cli\n"
        "def copy(source, target, size):\n"
        "    target.write(source.read(1000))\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"  # SIGTERM while the copy is half made
        "    shutil.copyfileobj(source, target, size)\n"
        "textstore.shutil.copyfileobj = copy\n"
        f"sys.exit(run_cli(lambda argv: textstore.TextStore.open({str(path)!r}).close(), []))\n"
    )
    env = {**os.environ, CACHE_ENV: str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines() == [f"stopped (SIGTERM): {path} was being decompressed into the cache; "
                                                "the partial copy was removed"]
    assert list((cache / "textstore").iterdir()) == []
    # A killed process's partial copy (no writer holds it) is removed by the next one.
    stale = cache / "textstore" / f".{textstore._cache_name(textstore._source_key(path), '.txt')}.abcd1234.tmp"
    stale.write_bytes(b"d1\tpartial")
    with TextStore.open(path) as store:
        assert store.get_many(["d7"]) == ["t"]
    assert not stale.exists()


@pytest.mark.parametrize("problem", ["a file", "full"])
def test_a_cache_that_cannot_take_the_copy_is_one_line(tmp_path, monkeypatch, problem, request):
    path = _write(tmp_path / "c.tsv.gz", gzip.compress(b"x\ty\n" * 10_000))
    if problem == "a file":
        cache = _write(tmp_path / "cache-file", b"")
        reason = "Not a directory"
    else:
        small_fs = request.getfixturevalue("small_fs")
        cache = small_fs.mount(64)
        small_fs.fill(cache)
        reason = "No space left on device"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    with pytest.raises(InputError, match=rf"^{path}: cannot decompress it into the cache \(.*{reason}.*\); set "
                                         rf"{CACHE_ENV} to a writable directory with room for it$"):
        TextStore.open(path)
    if problem == "full":
        assert sorted(p.name for p in cache.rglob("*")) == ["filler", "textstore"]


def test_a_bom_at_the_start_of_a_line_inside_a_collection(tmp_path):
    """Concatenated files carry their BOMs to the starts of lines: those documents must stay findable."""
    tsv = _write(tmp_path / "c.tsv", b"\xef\xbb\xbfa\tx\n\xef\xbb\xbfb\ty\nc\tz\xef\xbb\xbfz\n")
    with TextStore.open(tsv) as store:
        assert store.get_many(["a", "b", "c"]) == ["x", "y", "z\ufeffz"]  # a BOM inside a text stays
    jsonl = _write(tmp_path / "c.jsonl", b'{"docno": "a", "text": "x"}\n\xef\xbb\xbf{"docno": "b", "text": "y"}\n')
    with TextStore.open(jsonl) as store:
        assert store.get_many(["b", "a"]) == ["y", "x"]


def test_one_file_by_two_spellings_of_its_path_shares_one_index(tmp_path, monkeypatch):
    path = _write(tmp_path / "c.tsv", b"a\tx\n")
    builds = []
    build = textstore._build_index
    monkeypatch.setattr(textstore, "_build_index", lambda *a: builds.append(a) or build(*a))
    for spelling in (path, tmp_path / ".." / tmp_path.name / "c.tsv", path, tmp_path / "." / "c.tsv"):
        with TextStore.open(spelling) as store:
            assert store.get_many(["a"]) == ["x"]
    assert len(builds) == 1

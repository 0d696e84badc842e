"""jax's persistent compilation cache under sce_jax's cache directory: one folder per jaxlib version and CPU kind,
on for the commands unless turned off, and a second run of a command really loads its programs from it."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from sce_jax import cache

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_RUN = REPO / "examples" / "run.jsonl"

# Runs a command as its console script does (`cli()`, which turns the cache on), counting jax's persistent cache
# events: entries read back (cache_hits) and entries written (cache_misses: compiled, then written).
COUNTING_CLI = """
import atexit, sys
import jax.monitoring
counts = {"hits": 0, "writes": 0}
names = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}
jax.monitoring.register_event_listener(lambda event, **kw: event in names and counts.__setitem__(names[event], counts[names[event]] + 1))
atexit.register(lambda: print("CACHE", counts["hits"], counts["writes"], file=sys.stderr))
from sce_jax.rerank import cli
sys.argv = ["sce-jax-rerank", *sys.argv[1:]]
cli()
"""


def test_the_folder_is_keyed_by_jaxlib_version_and_cpu_features(monkeypatch, tmp_path):
    import jaxlib

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    here = cache.compilation_cache_dir()
    assert here.parent == tmp_path / "xla" and f"jaxlib-{jaxlib.__version__}-" in here.name
    assert cache.cpu_features()  # this machine's flags
    monkeypatch.setattr(cache, "cpu_features", lambda: "avx avx2 fma sse4_2")  # another CPU kind
    avx2 = cache.compilation_cache_dir()
    monkeypatch.setattr(cache, "cpu_features", lambda: "avx avx2 avx512f fma sse4_2")
    assert len({here, avx2, cache.compilation_cache_dir()}) == 3
    monkeypatch.setattr(jaxlib, "__version__", "0.0.1")
    assert cache.compilation_cache_dir().name.startswith("jaxlib-0.0.1-")


def test_turned_off_by_the_environment_and_a_users_own_folder_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    for off in ("0", "off", "false", "NO"):
        monkeypatch.setenv(cache.COMPILATION_CACHE_ENV, off)
        assert cache.enable_compilation_cache() is None
    monkeypatch.setenv(cache.COMPILATION_CACHE_ENV, "1")
    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert cache.enable_compilation_cache() == tmp_path / "mine"
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def _rerank(tiny_sparse_dir, tmp_path, output: str) -> tuple[int, int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCE_JAX_CACHE_DIR": str(tmp_path / "cache")}
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", cache.COMPILATION_CACHE_ENV):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", COUNTING_CLI, "--model", str(tiny_sparse_dir), "--run", str(EXAMPLE_RUN),
         "--output", str(tmp_path / output), "--max-length", "64", "--max-query-length", "16", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # XLA's false "machine type doesn't match" ERROR lines on reading a program back (cache.quiet_cache_loader).
    assert "Loading XLA:CPU AOT result" not in done.stderr, done.stderr[:3000]
    hits, writes = (int(n) for n in done.stderr.split("CACHE ")[1].split()[:2])
    return hits, writes, (tmp_path / output).read_text()


@pytest.mark.slow
def test_a_second_run_of_a_command_loads_its_programs_from_the_cache(tiny_sparse_dir, tmp_path):
    hits, writes, first = _rerank(tiny_sparse_dir, tmp_path, "first.run")
    assert hits == 0 and writes >= 1  # the forward programs (one per batch shape) at least
    assert [f.name for f in (tmp_path / "cache" / "xla").iterdir()] == [cache.compilation_cache_dir().name]
    # Every program written by the first run is read back (not rejected by XLA's loader) and none is written again.
    assert _rerank(tiny_sparse_dir, tmp_path, "second.run")[:2] == (writes, 0)
    assert (tmp_path / "second.run").read_text() == first

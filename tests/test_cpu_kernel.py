"""The C++ CPU attention kernel (kernels/cpu_attention.cc) against a float64 numpy attention that applies the
design note's mask (tests/dense_reference.py) to each document's own sequence [CLS] + query + document."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax.kernels import cpu_attention
from sce_jax import attention
from sce_jax.attention import TokenLayout
from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.model import doc_segments
import dense_reference

pytestmark = pytest.mark.skipif(not cpu_attention.available()[0], reason=f"no CPU kernel: {cpu_attention.available()[1]}")

RELEASED = dict(cls_query_attention=True, cls_doc_attention=True, query_cls_attention=False, query_doc_attention=False,
                doc_cls_attention=True, doc_query_attention=True)
PATTERNS = {
    "released": RELEASED,
    "no-cls-links": {**RELEASED, "cls_doc_attention": False, "doc_cls_attention": False},
    "doc-alone": {**RELEASED, "doc_query_attention": False, "doc_cls_attention": False},
    "cls-blind": {**RELEASED, "cls_query_attention": False},
}


def flags_of(pattern: dict) -> int:
    return (cpu_attention.CLS_QUERY * pattern["cls_query_attention"] | cpu_attention.CLS_DOC * pattern["cls_doc_attention"]
            | cpu_attention.DOC_CLS * pattern["doc_cls_attention"] | cpu_attention.DOC_QUERY * pattern["doc_query_attention"])


def make_problem(slots, *, heads=2, head_dim=32, seed=0):
    """A flat token matrix of 3 rows (the last all padding when slots > 1), 2 queries (one of them padding
    tokens only in its tail), and the documents' lengths."""
    rng = np.random.default_rng(seed)
    num_rows, num_queries, query_length, row_length = 3, 2, 6, 24
    if slots == 1:
        lengths = np.array([[24], [9], [1]])
    else:
        lengths = np.array([[7, 1, 12, 0], [5, 5, 0, 0], [0, 0, 0, 0]])[:, :slots]
    query_lengths = np.array([6, 3])
    doc_query = np.array([1, 0, 1])
    layout = TokenLayout(num_rows, slots, num_queries, query_length, row_length)
    qkv = rng.standard_normal((sum(layout.sizes), 3, heads, head_dim)).astype(np.float32)
    return dict(qkv=qkv, layout=layout, lengths=lengths, query_lengths=query_lengths, doc_query=doc_query)


def reference(p, pattern, window):
    """{token index: [H, K] output} for every real token, from each document's own dense masked sequence."""
    qkv, layout, lengths = p["qkv"].astype(np.float64), p["layout"], p["lengths"]
    (num_rows, slots), (_, query_length), (_, row_length) = layout.shapes
    query_base, doc_base = layout.sizes[0], layout.sizes[0] + layout.sizes[1]
    expected = {}
    for d in range(num_rows):
        start = 0
        for c in range(slots):
            n, q = int(lengths[d, c]), int(p["doc_query"][d])
            query = [query_base + q * query_length + i for i in range(p["query_lengths"][q])]
            tokens = [d * slots + c, *query, *(doc_base + d * row_length + start + j for j in range(n))]
            mask = dense_reference.attention_mask(len(query), n, pattern, window)
            x = qkv[tokens]
            scores = np.einsum("ihk,jhk->hij", x[:, 0], x[:, 1]) / np.sqrt(x.shape[-1])
            scores = np.where(mask[None], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            for t, row in zip(tokens, np.einsum("hij,jhk->ihk", probs, x[:, 2])):
                expected[t] = row
            start += n
    return expected


def run_kernel(p, pattern, window, *, cls_only=False):
    layout = p["layout"]
    (num_rows, slots), (num_queries, query_length), (_, row_length) = layout.shapes
    doc_slot, _ = doc_segments(jnp.asarray(p["lengths"]), row_length)
    query_mask = np.arange(query_length)[None, :] < p["query_lengths"][:, None]
    qkv = jnp.asarray(p["qkv"])
    q = qkv[: num_rows * slots, :1] if cls_only else qkv
    kv = qkv[:, 1:] if cls_only else qkv
    flags = flags_of(pattern) | (cpu_attention.CLS_ONLY if cls_only else 0)
    return np.asarray(cpu_attention.cpu_attention(q, kv, doc_slot, jnp.asarray(p["doc_query"]), jnp.asarray(query_mask),
                                                  window=window, flags=flags))


@pytest.mark.parametrize("slots", [1, 4])
@pytest.mark.parametrize("window", [1, 3, 40])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_kernel_matches_dense_numpy_attention(slots, window, pattern):
    p = make_problem(slots)
    expected = reference(p, PATTERNS[pattern], window)
    out = run_kernel(p, PATTERNS[pattern], window)
    assert out.shape == (sum(p["layout"].sizes), 2, 32)
    worst = max(np.abs(out[t] - row).max() for t, row in expected.items())
    assert worst <= 1e-5, worst

    # [CLS]-only mode (the last layer): the same [CLS] outputs, nothing else.
    cls_out = run_kernel(p, PATTERNS[pattern], window, cls_only=True)
    num_cls = p["layout"].sizes[0]
    assert cls_out.shape == (num_cls, 2, 32)
    np.testing.assert_allclose(cls_out, np.stack([expected[t] for t in range(num_cls)]), atol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 64])
def test_kernel_head_dims(head_dim):
    """32 and 64 are compiled as fixed sizes, other head sizes take the generic loop."""
    p = make_problem(4, heads=3, head_dim=head_dim, seed=1)
    expected = reference(p, RELEASED, 4)
    out = run_kernel(p, RELEASED, 4)
    assert max(np.abs(out[t] - row).max() for t, row in expected.items()) <= 1e-5


@pytest.mark.parametrize("cls_only", [False, True], ids=["all-tokens", "cls-only"])
def test_layer_attention_gradients_match_dense_path(cls_only):
    """`cpu_layer_attention` runs the kernel forward and differentiates through the XLA band path; values and
    gradients against the dense masked path (`impl="dense"`), which shares neither."""
    config = SparseCrossEncoderConfig(hidden_size=64, num_attention_heads=2, intermediate_size=64, attention_window_size=3)
    p = make_problem(4)
    layout = p["layout"]
    doc_slot, _ = doc_segments(jnp.asarray(p["lengths"]), layout.shapes[2][1])
    query_mask = jnp.arange(layout.shapes[1][1])[None, :] < jnp.asarray(p["query_lengths"])[:, None]
    masks = (query_mask, doc_slot, jnp.asarray(p["doc_query"]))
    num_cls = layout.sizes[0]
    real = np.concatenate([np.ones(num_cls, bool), np.asarray(query_mask).reshape(-1), np.asarray(doc_slot >= 0).reshape(-1)])
    if cls_only:
        real[num_cls:] = False
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((len(real), 2, 32)) * real[:, None, None], jnp.float32)

    def loss(qkv, impl):
        if impl == "dense":
            q, k, v = (layout.split(qkv[:, i]) for i in range(3))
            out = layout.join(attention.sparse_attention(q, k, v, *masks, config, impl="dense"))
            return jnp.sum(out * cotangent)
        if cls_only:
            out = attention.cpu_layer_attention(qkv[:num_cls, :1], qkv[:, 1:], *masks, config, layout, cls_only=True)
            return jnp.sum(out * cotangent[:num_cls])
        return jnp.sum(attention.cpu_layer_attention(qkv, qkv, *masks, config, layout) * cotangent)

    qkv = jnp.asarray(p["qkv"])
    (value, grad), (ref_value, ref_grad) = (jax.value_and_grad(loss)(qkv, impl) for impl in ("cpu", "dense"))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)
    assert float(jnp.abs(grad).max()) > 0


def test_inconsistent_shapes_are_rejected():
    p = make_problem(1)
    qkv = jnp.asarray(p["qkv"])
    doc_slot = jnp.zeros((3, 24), jnp.int32)
    query_mask = jnp.ones((2, 6), bool)
    with pytest.raises(Exception, match="inconsistent shapes"):
        # One token short of the layout.
        cpu_attention.cpu_attention(qkv[1:], qkv[1:], doc_slot, jnp.zeros(3, jnp.int32), query_mask, window=2, flags=15)
    with pytest.raises(Exception, match="doc_query out of range"):
        cpu_attention.cpu_attention(qkv, qkv, doc_slot, jnp.full(3, 5, jnp.int32), query_mask, window=2, flags=15)


def test_without_a_compiler_auto_falls_back_to_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(tmp_path / "cache"))
    cpu_attention.available.cache_clear()
    attention._warn_once.cache_clear()
    try:
        ok, why = cpu_attention.available()
        assert not ok and "no-such-compiler" in why
        with pytest.warns(RuntimeWarning, match="CPU attention kernel is unavailable"):
            assert attention.resolve_attention_impl("auto") == "xla"
        with pytest.raises(RuntimeError, match="attention_impl='cpu'"):
            attention.resolve_attention_impl("cpu")
    finally:
        monkeypatch.undo()
        cpu_attention.available.cache_clear()
        attention._warn_once.cache_clear()
    assert cpu_attention.available() == (True, "")


@pytest.mark.parametrize("overrides,expected", [
    ({}, "cpu"),
    ({"attention_window_size": None}, "xla"),  # full attention
    ({"query_doc_attention": True}, "xla"),  # the query's encoding depends on the document
])
def test_patterns_the_kernel_does_not_cover_run_the_xla_path(overrides, expected):
    from flax import nnx

    from sce_jax.model import SparseCrossEncoderModel

    config = SparseCrossEncoderConfig(hidden_size=64, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1,
                                      attention_window_size=4, **RELEASED).replace(**overrides)
    model = nnx.eval_shape(lambda: SparseCrossEncoderModel(config, rngs=nnx.Rngs(0), attention_impl="cpu"))
    assert model.attention_impl == expected


def test_an_unusable_cache_directory_makes_the_kernel_unavailable(tmp_path, monkeypatch):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(not_a_directory / "cache"))
    cpu_attention.available.cache_clear()
    try:
        ok, why = cpu_attention.available()
        assert not ok and "Error" in why
    finally:
        monkeypatch.undo()
        cpu_attention.available.cache_clear()
    assert cpu_attention.available() == (True, "")


# --- the build cache: verified before loading, built in a killable process group, no change to the FP mode ---

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (a library loaded there cannot crash the test process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _leftovers(cache: Path) -> list[str]:
    """Anything in the cache directory besides verified libraries and their checksums."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith((".so", ".so.sha256"))) if cache.exists() else []


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """An empty cache directory for this test; available() is re-evaluated in it and restored afterwards."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(cache))
    cpu_attention.available.cache_clear()
    yield cache
    monkeypatch.undo()
    cpu_attention.available.cache_clear()
    assert cpu_attention.available() == (True, "")


_RUN_KERNEL = """
    import numpy as np
    from sce_jax.kernels import cpu_attention
    ok, why = cpu_attention.available()
    assert ok, why
    qkv = np.random.default_rng(0).standard_normal((2 + 3 + 2 * 4, 3, 1, 8)).astype(np.float32)
    out = cpu_attention.cpu_attention(qkv, qkv, np.array([[0, 0, 0, -1], [0, 0, -1, -1]]), np.array([0, 0]),
                                      np.array([[1, 1, 0]]), window=1, flags=15)
    assert np.isfinite(np.asarray(out)).all()
    print("kernel ok")
"""


def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A cached library cut short (a full disk, a crash while copying a home directory) used to kill every later
    run with SIGBUS when loaded; it no longer matches its checksum, so it is rebuilt."""
    built = cpu_attention._library_path(cpu_attention._compiler())
    cache = tmp_path / "cache"
    cache.mkdir()
    for source in (built, built.with_name(built.name + ".sha256")):
        shutil.copy(source, cache / source.name)
    library = cache / built.name
    library.write_bytes(built.read_bytes()[: built.stat().st_size // 2])

    result = _python(_RUN_KERNEL, {"SCE_JAX_CACHE_DIR": str(cache)})
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert "kernel ok" in result.stdout and "does not match its checksum; rebuilding" in result.stderr
    assert library.stat().st_size > built.stat().st_size // 2
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    assert (cache / (built.name + ".sha256")).read_text().strip() == digest
    assert _leftovers(cache) == []


@pytest.mark.parametrize("compiler, message", [
    ("/bin/true", "reported success but wrote no shared library"),  # exit 0, no output: a 0-byte file before
    ("/bin/false", "exit status 1"),
])
def test_a_failed_build_caches_nothing(isolated_cache, monkeypatch, compiler, message):
    monkeypatch.setenv("CXX", compiler)
    ok, why = cpu_attention.available()
    assert not ok and message in why, why
    assert not list(isolated_cache.glob("*.so*")) and _leftovers(isolated_cache) == []


def _hanging_compiler(tmp_path: Path, action: str) -> Path:
    """A compiler that answers the key questions (--version, -dM -E) truthfully but, asked to compile, starts a
    child of its own (as the real driver does: cc1plus, as), records both process ids, then `action` and hangs."""
    script = tmp_path / "hanging-c++"
    real = shutil.which("c++") or shutil.which("g++")
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" -c "*) ;; *) exec {real} "$@" ;; esac
        sleep 300 &
        echo $$ $! > {tmp_path}/pids
        {action}
        wait
    """))
    script.chmod(0o755)
    return script


def _assert_gone(pid_file: Path):
    """Both the compiler and its child were killed (not left running as orphans)."""
    pids = [int(p) for p in pid_file.read_text().split()]
    for _ in range(100):
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"still running: {alive}")


def test_a_hanging_build_is_killed_after_the_timeout(isolated_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(_hanging_compiler(tmp_path, "")))
    monkeypatch.setenv("SCE_JAX_BUILD_TIMEOUT", "3")
    ok, why = cpu_attention.available()
    assert not ok and "timed out after 3 s" in why, why
    _assert_gone(tmp_path / "pids")
    assert not list(isolated_cache.glob("*.so*")) and _leftovers(isolated_cache) == []


@pytest.mark.parametrize("signal_name, returncode", [("INT", -signal.SIGINT), ("TERM", -signal.SIGTERM)])
def test_an_interrupted_build_kills_the_compiler_and_cleans_up(tmp_path, signal_name, returncode):
    """Ctrl-C (or a SIGTERM from a job scheduler) during the build: the compiler's whole process group is killed,
    the build directory removed, and the process still ends by that signal."""
    cache = tmp_path / "cache"
    compiler = _hanging_compiler(tmp_path, f"kill -{signal_name} $PPID")
    # SIGINT as a terminal delivers it: a test run started in the background of a non-interactive shell inherits
    # SIGINT ignored, and Python then leaves it ignored (the build would wait for the hanging compiler).
    result = _python("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                     "from sce_jax.kernels import cpu_attention; print(cpu_attention.available())",
                     {"SCE_JAX_CACHE_DIR": str(cache), "CXX": str(compiler)}, timeout=120)
    assert result.returncode == returncode, (result.returncode, result.stderr[-3000:])
    _assert_gone(tmp_path / "pids")
    assert not list(cache.glob("*.so*")) and _leftovers(cache) == []


def test_loading_the_kernel_keeps_denormals():
    """GCC < 13 links crtfastmath.o into a `-ffast-math -shared` library, whose constructor turns on
    flush-to-zero / denormals-are-zero for the whole process when it is loaded."""
    result = _python("""
        import numpy as np
        tiny = np.float32(1e-40)  # a float32 denormal
        assert tiny * np.float32(1) != 0
        from sce_jax.kernels import cpu_attention
        assert cpu_attention.available()[0]
        assert tiny * np.float32(1) == tiny, "loading the kernel flushed denormals to zero"
        assert float("1e-310") * 1.0 != 0.0
        print("denormals ok")
    """, {})
    assert result.returncode == 0 and "denormals ok" in result.stdout, result.stderr[-3000:]


def test_a_library_that_flushes_denormals_is_not_cached(isolated_cache, tmp_path, monkeypatch):
    """A compiler setup that links crtfastmath anyway (here: -ffast-math added to every command) is caught by the
    check of a new build, before it is cached or loaded here."""
    script = tmp_path / "fast-math-c++"
    script.write_text(f'#!/bin/sh\nexec {shutil.which("c++") or shutil.which("g++")} "$@" -ffast-math\n')
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    ok, why = cpu_attention.available()
    assert not ok and "flush-to-zero" in why, why
    assert not list(isolated_cache.glob("*.so*")) and _leftovers(isolated_cache) == []
    assert np.float32(1e-40) * np.float32(1) != 0

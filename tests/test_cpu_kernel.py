"""The C++ CPU attention kernel (kernels/cpu_attention.cc), in every build this CPU runs, against a float64 numpy
attention that applies the design note's mask (tests/dense_reference.py) to each document's own sequence [CLS] +
query + document; and how the builds are found, chosen and loaded (kernels/cpu_library.py)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax.kernels import cpu_attention, cpu_library
from sce_jax import attention
from sce_jax.attention import TokenLayout
from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.errors import InputError
from sce_jax.model import doc_segments
import dense_reference

REPO = Path(__file__).resolve().parents[1]

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


def run_kernel(p, pattern, window, variant, *, cls_only=False):
    layout = p["layout"]
    (num_rows, slots), (num_queries, query_length), (_, row_length) = layout.shapes
    doc_slot, _ = doc_segments(jnp.asarray(p["lengths"]), row_length)
    query_mask = np.arange(query_length)[None, :] < p["query_lengths"][:, None]
    qkv = jnp.asarray(p["qkv"])
    q = qkv[: num_rows * slots, :1] if cls_only else qkv
    kv = qkv[:, 1:] if cls_only else qkv
    flags = flags_of(pattern) | (cpu_attention.CLS_ONLY if cls_only else 0)
    return np.asarray(cpu_attention.cpu_attention(q, kv, doc_slot, jnp.asarray(p["doc_query"]), jnp.asarray(query_mask),
                                                  window=window, flags=flags, variant=variant))


@pytest.mark.parametrize("slots", [1, 4])
@pytest.mark.parametrize("window", [1, 3, 40])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_kernel_matches_dense_numpy_attention(slots, window, pattern, cpu_variant):
    p = make_problem(slots)
    expected = reference(p, PATTERNS[pattern], window)
    out = run_kernel(p, PATTERNS[pattern], window, cpu_variant)
    assert out.shape == (sum(p["layout"].sizes), 2, 32)
    worst = max(np.abs(out[t] - row).max() for t, row in expected.items())
    assert worst <= 1e-5, worst

    # [CLS]-only mode (the last layer): the same [CLS] outputs, nothing else.
    cls_out = run_kernel(p, PATTERNS[pattern], window, cpu_variant, cls_only=True)
    num_cls = p["layout"].sizes[0]
    assert cls_out.shape == (num_cls, 2, 32)
    np.testing.assert_allclose(cls_out, np.stack([expected[t] for t in range(num_cls)]), atol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 64])
def test_kernel_head_dims(head_dim, cpu_variant):
    """32 and 64 are compiled as fixed sizes, other head sizes take the generic loop."""
    p = make_problem(4, heads=3, head_dim=head_dim, seed=1)
    expected = reference(p, RELEASED, 4)
    out = run_kernel(p, RELEASED, 4, cpu_variant)
    assert max(np.abs(out[t] - row).max() for t, row in expected.items()) <= 1e-5


@pytest.mark.parametrize("cls_only", [False, True], ids=["all-tokens", "cls-only"])
def test_layer_attention_gradients_match_dense_path(cls_only):
    """`cpu_layer_attention` runs the kernel (the selected build) forward and differentiates through the XLA band
    path; values and gradients against the dense masked path (`impl="dense"`), which shares neither."""
    ok, why = cpu_attention.available()
    if not ok:
        pytest.skip(f"no CPU kernel: {why}")
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


def test_inconsistent_shapes_are_rejected(cpu_variant):
    p = make_problem(1)
    qkv = jnp.asarray(p["qkv"])
    doc_slot = jnp.zeros((3, 24), jnp.int32)
    query_mask = jnp.ones((2, 6), bool)
    with pytest.raises(Exception, match="inconsistent shapes"):
        # One token short of the layout.
        cpu_attention.cpu_attention(qkv[1:], qkv[1:], doc_slot, jnp.zeros(3, jnp.int32), query_mask, window=2, flags=15,
                                    variant=cpu_variant)
    with pytest.raises(Exception, match="doc_query out of range"):
        cpu_attention.cpu_attention(qkv, qkv, doc_slot, jnp.full(3, 5, jnp.int32), query_mask, window=2, flags=15,
                                    variant=cpu_variant)


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




# --- the builds: every variant compiled, the probe, the choice, loading -----------------------------------------


def _python(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with the checkout on the path (a library loaded there cannot crash the tests)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_variant_of_this_architecture_is_built():
    """The build compiles every variant of this architecture, those this CPU cannot run too (so every x86-64
    machine that builds the package compiles them all); each exports the kernels and names its instruction set."""
    absent = [variant for variant in cpu_library.VARIANTS if not cpu_library.built(variant)]
    if absent:
        pytest.skip(f"no CPU kernel: {', '.join(absent)} not built: {cpu_library.available(absent[0])[1]}")
    for variant in cpu_library.VARIANTS:
        data = cpu_library.library_path(variant).read_bytes()
        assert data.startswith(b"\x7fELF"), variant
        for symbol in (b"SceJaxCpuAttention", b"SceJaxInt8Linear", b"SceJaxInt8LayerTail", b"SceJaxInt8Layout"):
            assert symbol in data, (variant, symbol)
        assert variant.encode() + b"\0" in data, variant  # SceJaxCpuKernelsIsa's answer


def test_the_build_variants_are_the_loaders():
    """setup.py's variants for this machine are cpu_library's, in the same order (read from setup.py's source: it
    runs setup() when imported)."""
    source = (REPO / "setup.py").read_text()
    block = source[source.index("X86_VARIANTS = {"):source.index("}", source.index("X86_VARIANTS = {"))]
    x86 = tuple(re.findall(r'^\s+"(\w+)":', block, re.M))
    assert x86 == ("amx", "avx512_vnni", "avx2", "generic")
    expected = x86 if cpu_library._X86 else ("generic",)
    assert cpu_library.VARIANTS == expected
    assert set(cpu_library.REQUIRES) == set(cpu_library.INT8_LAYOUTS) == set(x86)


def test_the_probe_agrees_with_the_kernels_list_of_cpu_flags():
    """The probe (cpuid, xgetbv) against /proc/cpuinfo, where Linux lists what the CPU has and the OS enables."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpu_library._X86 or not cpuinfo.exists():
        pytest.skip("x86-64 Linux only")
    if not cpu_library.built("generic"):
        pytest.skip(f"no CPU kernel: {cpu_library.available('generic')[1]}")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split(":")[1].split())
    features = cpu_library.cpu_features()
    v3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    assert ("avx2" in features) == ({"avx", "avx2"} <= flags)
    assert ("x86-64-v3" in features) == v3
    assert ("x86-64-v4" in features) == v4
    assert ("avx512_vnni" in features) == (v4 and "avx512_vnni" in flags)
    assert ("amx_int8" in features) == (v4 and {"amx_tile", "amx_int8"} <= flags)  # granted where Linux lists it


def test_the_best_variant_this_cpu_runs_is_selected_and_a_setting_can_name_another(cpu_kernels_env, monkeypatch):
    runnable = [v for v in cpu_library.VARIANTS if cpu_library.built(v) and not cpu_library.missing(v)]
    if not runnable:
        pytest.skip(f"no CPU kernel: {cpu_attention.available()[1]}")
    cpu_kernels_env(cpu_library.ENV, "auto")
    assert cpu_library.selected() == runnable[0]
    cpu_kernels_env(cpu_library.ENV, runnable[-1])
    assert cpu_library.selected() == runnable[-1]
    cpu_kernels_env(cpu_library.ENV, "sse9")
    with pytest.raises(InputError, match=r"\$SCE_JAX_CPU_KERNELS='sse9': expected auto, none or one of"):
        cpu_library.selected()
    cpu_kernels_env(cpu_library.ENV, "none")
    assert cpu_library.selected() is None
    assert cpu_attention.available() == (False, "the C++ CPU kernels are switched off ($SCE_JAX_CPU_KERNELS=none)")
    if cpu_library._X86:
        # As on an AMD EPYC Zen 3 (AVX2, no AVX-512): auto takes avx2; asking for avx512_vnni is an error.
        monkeypatch.setattr(cpu_library, "cpu_features", lambda: frozenset({"x86-64-v2", "avx2", "x86-64-v3"}))
        cpu_kernels_env(cpu_library.ENV, "auto")
        assert cpu_library.selected() == "avx2"
        cpu_kernels_env(cpu_library.ENV, "avx512_vnni")
        with pytest.raises(InputError, match=r"\$SCE_JAX_CPU_KERNELS=avx512_vnni: this CPU lacks x86-64-v4, avx512_vnni"):
            cpu_library.selected()


def test_without_the_kernels_auto_falls_back_to_xla(cpu_kernels_env):
    cpu_kernels_env(cpu_library.ENV, "none")
    attention._warn_once.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"CPU attention kernel is unavailable.*SCE_JAX_CPU_KERNELS=none"):
            assert attention.resolve_attention_impl("auto") == "xla"
        with pytest.raises(RuntimeError, match="attention_impl='cpu'"):
            attention.resolve_attention_impl("cpu")
    finally:
        attention._warn_once.cache_clear()


def test_a_bad_kernel_setting_is_one_line_and_exit_2_before_any_work(tmp_path, cpu_kernels_env, capsys):
    from sce_jax.errors import run_cli
    from sce_jax.rerank import main

    cpu_kernels_env(cpu_library.ENV, "avx1024")
    output = tmp_path / "out.run"
    assert run_cli(main, ["--model", str(tmp_path / "no-model-read"), "--run", str(REPO / "examples" / "run.jsonl"),
                          "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: $SCE_JAX_CPU_KERNELS='avx1024': expected auto, none or one of") and "\n" not in error
    assert not output.exists()


def _denormals_survive(paths: list[str]) -> subprocess.CompletedProcess:
    """Loads each library in a fresh process and checks after each that a float64 and a float32 denormal survive."""
    return _python("""
        import ctypes, sys
        import numpy as np
        for path in sys.argv[1:]:
            ctypes.CDLL(path)
            assert float("1e-310") * 1.0 != 0.0 and np.float32(1e-40) * np.float32(1) != 0, f"{path} flushes denormals"
        print("denormals ok")
    """.replace("sys.argv[1:]", repr(paths)))


def test_loading_the_libraries_keeps_denormals():
    """-ffast-math is on the compile line only: on the link line GCC < 13 (and clang) link crtfastmath.o, whose
    constructor sets flush-to-zero / denormals-are-zero for the whole process that loads the library. Every
    library this CPU can load (loading runs its constructors, compiled for its instruction set)."""
    paths = [str(cpu_library.library_path(v)) for v in cpu_library.VARIANTS
             if cpu_library.built(v) and not cpu_library.missing(v)]
    if not paths:
        pytest.skip(f"no CPU kernel: {cpu_attention.available()[1]}")
    result = _denormals_survive([str(cpu_library._PROBE), *paths])
    assert result.returncode == 0 and "denormals ok" in result.stdout, result.stderr[-3000:]


def test_the_denormal_check_catches_a_fast_math_link(tmp_path):
    """The check above fails for a library linked with -ffast-math (where the compiler adds crtfastmath.o)."""
    compiler = next((c for c in ("c++", "g++") if __import__("shutil").which(c)), None)
    if compiler is None:
        pytest.skip("no C++ compiler to build the counter-example")
    source, library = tmp_path / "x.cc", tmp_path / "libx.so"
    source.write_text('extern "C" int x() { return 1; }\n')
    subprocess.run([compiler, "-shared", "-fPIC", "-ffast-math", str(source), "-o", str(library)], check=True)
    result = _denormals_survive([str(library)])
    if result.returncode == 0:
        pytest.skip(f"{compiler} does not link crtfastmath.o for -ffast-math -shared (GCC >= 13)")
    assert "flushes denormals" in result.stderr

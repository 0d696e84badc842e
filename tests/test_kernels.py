"""The Pallas document-row attention kernel (interpret mode on CPU) against a float64 numpy reference and the
XLA paths of `sce_jax.attention.doc_attention`: forward and gradients."""

import inspect
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sce_jax.kernels.block_config import BlockConfig, shipped_block_config
from sce_jax.kernels.windowed_attention import windowed_attention
from sce_jax import attention
from sce_jax.batch import Batch
from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.model import SparseCrossEncoderModel

REPO = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
SMALL_TILES = BlockConfig(block_q=16, block_k=16)


def reference_attention(q, k, v, kg, vg, doc_mask, global_mask, window, dout):
    """Dense masked attention and its analytic gradients, in float64 numpy, one document at a time."""
    D, L, H, K = q.shape
    pos = np.arange(L)
    band = np.ones((L, L), bool) if window is None else np.abs(pos[:, None] - pos[None, :]) <= window
    out, dq, dk, dv = (np.zeros(q.shape) for _ in range(4))
    dkg, dvg = np.zeros(kg.shape), np.zeros(vg.shape)
    for d in range(D):
        keys = np.concatenate([kg[d], k[d]])  # [G + L, H, K]
        values = np.concatenate([vg[d], v[d]])
        visible = np.concatenate([np.broadcast_to(global_mask[d], (L, kg.shape[1])), band & doc_mask[d]], axis=1)
        for h in range(H):
            s = q[d, :, h] @ keys[:, h].T / np.sqrt(K)
            s = np.where(visible, s, -np.inf)
            row_max = np.where(visible.any(1), s.max(1), 0.0)[:, None]
            e = np.where(visible, np.exp(s - row_max), 0.0)
            p = e / np.maximum(e.sum(1, keepdims=True), 1e-300)
            out[d, :, h] = p @ values[:, h]
            dp = dout[d, :, h] @ values[:, h].T
            ds = p * (dp - (dp * p).sum(1, keepdims=True)) / np.sqrt(K)
            dq[d, :, h] = ds @ keys[:, h]
            dkeys, dvalues = ds.T @ q[d, :, h], p.T @ dout[d, :, h]
            G = kg.shape[1]
            dkg[d, :, h], dk[d, :, h] = dkeys[:G], dkeys[G:]
            dvg[d, :, h], dv[d, :, h] = dvalues[:G], dvalues[G:]
    return out, (dq, dk, dv, dkg, dvg)


def make_inputs(dtype, *, head_dim=32, heads=2, doc_lengths=(37, 30, 11, 0), seed=0):
    """Two queries (lengths 6 and 3) with two documents each; the last document has no visible key at all."""
    rng = np.random.default_rng(seed)
    D, L = len(doc_lengths), max(doc_lengths)
    doc_query = np.array([0, 0, 1, 1])[:D]
    doc_mask = np.arange(L)[None, :] < np.array(doc_lengths)[:, None]
    query_mask = np.arange(6)[None, :] < np.array([6, 3])[:, None]
    # Global keys are [CLS] then the document's query tokens, as the model builds them.
    global_mask = np.concatenate([np.ones((D, 1), bool), query_mask[doc_query]], axis=1)
    global_mask[-1] = False

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    q, k, v = (normal(D, L, heads, head_dim) for _ in range(3))
    cls_k, cls_v = normal(D, 1, heads, head_dim), normal(D, 1, heads, head_dim)
    query_k, query_v = normal(2, 6, heads, head_dim), normal(2, 6, heads, head_dim)
    dout = normal(D, L, heads, head_dim)
    return (q, k, v, cls_k, cls_v, query_k, query_v), doc_query, doc_mask, global_mask, dout


def attention_and_grads(impl_fn, inputs, doc_query, doc_mask, global_mask, dout):
    """Output and the gradients w.r.t. q, k, v, [CLS] keys/values and the shared query keys/values."""

    def run(q, k, v, cls_k, cls_v, query_k, query_v):
        kg = jnp.concatenate([cls_k, query_k[doc_query]], axis=1)
        vg = jnp.concatenate([cls_v, query_v[doc_query]], axis=1)
        return impl_fn(q, k, v, kg, vg, jnp.asarray(doc_mask), jnp.asarray(global_mask))

    @jax.jit
    def forward_and_backward(inputs, dout):
        out, vjp = jax.vjp(run, *inputs)
        return out, vjp(dout)

    return forward_and_backward(inputs, dout)


def reference_and_grads(inputs, doc_query, doc_mask, global_mask, dout, window):
    q, k, v, cls_k, cls_v, query_k, query_v = (np.asarray(x, np.float64) for x in inputs)
    kg = np.concatenate([cls_k, query_k[doc_query]], axis=1)
    vg = np.concatenate([cls_v, query_v[doc_query]], axis=1)
    out, (dq, dk, dv, dkg, dvg) = reference_attention(
        q, k, v, kg, vg, doc_mask, global_mask, window, np.asarray(dout, np.float64)
    )
    # Fold the global keys' gradients back onto [CLS] and the (shared) query slots.
    dquery_k, dquery_v = np.zeros(query_k.shape), np.zeros(query_v.shape)
    np.add.at(dquery_k, doc_query, dkg[:, 1:])
    np.add.at(dquery_v, doc_query, dvg[:, 1:])
    return out, (dq, dk, dv, dkg[:, :1], dvg[:, :1], dquery_k, dquery_v)


def assert_close(actual, expected, tolerance):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("window", [1, 4, 16, 64, None])
def test_kernel_matches_reference_and_xla(window, dtype):
    inputs, doc_query, doc_mask, global_mask, dout = make_inputs(dtype)
    expected, expected_grads = reference_and_grads(inputs, doc_query, doc_mask, global_mask, dout, window)
    kernel = lambda *a: windowed_attention(*a, window=window, config=SMALL_TILES, interpret=True)
    out, grads = attention_and_grads(kernel, inputs, doc_query, doc_mask, global_mask, dout)
    assert out.dtype == dtype
    assert_close(out, expected, TOLERANCE[dtype])
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype
        assert_close(grad, expected_grad, TOLERANCE[dtype])
    # The document without any visible key outputs zeros and passes no gradient.
    assert not np.asarray(out[-1], np.float32).any() and not np.asarray(grads[0][-1], np.float32).any()

    for impl in ("xla", "dense"):
        path = lambda *a: attention.doc_attention(*a, window=window, impl=impl)
        xla_out, xla_grads = attention_and_grads(path, inputs, doc_query, doc_mask, global_mask, dout)
        assert_close(out, np.asarray(xla_out, np.float64), TOLERANCE[dtype])
        for grad, xla_grad in zip(grads, xla_grads):
            assert_close(grad, np.asarray(xla_grad, np.float64), TOLERANCE[dtype])


@pytest.mark.parametrize(
    "config, window, head_dim, doc_lengths, dtype",
    [
        (BlockConfig(block_q=32, block_k=16), 4, 64, (33, 17), jnp.float32),
        (BlockConfig(block_q=16, block_k=32), 16, 32, (40, 5), jnp.float32),
        (BlockConfig(), 7, 64, (19, 19), jnp.float32),  # tiles shrunk to the document length
        # The shipped tiles (shipped_block_config), over several tiles of each side.
        (None, 4, 32, (70, 33), jnp.float32),
        (None, 7, 64, (40, 19), jnp.float32),
        (None, 4, 32, (150, 70), jnp.bfloat16),
        (None, 9, 64, (100, 37), jnp.bfloat16),
    ],
)
def test_kernel_tile_shapes_and_head_dim(config, window, head_dim, doc_lengths, dtype):
    inputs, doc_query, doc_mask, global_mask, dout = make_inputs(
        dtype, head_dim=head_dim, heads=1, doc_lengths=doc_lengths, seed=1
    )
    if config is None:
        tiles = shipped_block_config(dtype, head_dim)
        assert tiles.block_q < max(doc_lengths) and tiles.block_k < max(doc_lengths)
    expected, expected_grads = reference_and_grads(inputs, doc_query, doc_mask, global_mask, dout, window)
    kernel = lambda *a: windowed_attention(*a, window=window, config=config, interpret=True)
    out, grads = attention_and_grads(kernel, inputs, doc_query, doc_mask, global_mask, dout)
    assert_close(out, expected, TOLERANCE[dtype])
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, TOLERANCE[dtype])


def test_bad_shapes_and_tiles_are_rejected():
    (q, k, v, cls_k, cls_v, *_), _, doc_mask, global_mask, _ = make_inputs(jnp.float32)
    with pytest.raises(ValueError, match="doc_mask must be"):
        windowed_attention(q, k, v, cls_k, cls_v, doc_mask[:, :5], global_mask[:, :1], window=4, interpret=True)
    with pytest.raises(ValueError, match="window must be"):
        windowed_attention(q, k, v, cls_k, cls_v, doc_mask, global_mask[:, :1], window=0, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        BlockConfig(block_q=48)


def abstract_gpu_mesh(axis_sizes=(), axis_names=()):
    """A mesh of abstract GPUs, to lower for CUDA on a machine without one: JAX >= 0.11's Pallas Triton lowering
    asks for the target GPU (its compute capability) and takes it from the abstract mesh's device."""
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    axis_types = (jax.sharding.AxisType.Auto,) * len(axis_names)
    return jax.sharding.AbstractMesh(axis_sizes, axis_names, axis_types, abstract_device=gpu)


def lower_for_cuda(fn, *args, mesh=None):
    """`fn` traced and lowered for CUDA on this (CPU) machine, with the Triton modules of its Pallas calls."""
    from jax._src.pallas.triton import lowering

    modules = []
    original = lowering.lower_jaxpr_to_triton_module

    def record(*a, **k):
        result = original(*a, **k)
        modules.append(result.module.operation.get_asm())
        return result

    lowering.lower_jaxpr_to_triton_module = record
    try:
        with jax.sharding.use_abstract_mesh(mesh or abstract_gpu_mesh()):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return lowered, modules


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("window", [4, None])
def test_kernel_lowers_to_triton_for_cuda(window, dtype):
    """Lowering for CUDA needs no GPU and runs the Pallas Triton lowering rules, which reject what Triton cannot
    compile (non-power-of-two tiles, unsupported ops or dot shapes)."""
    D, L, H, K, G = 2, 100, 2, 64, 33
    doc_shape, global_shape = jax.ShapeDtypeStruct((D, L, H, K), dtype), jax.ShapeDtypeStruct((D, G, H, K), dtype)
    args = [doc_shape] * 3 + [global_shape] * 2
    args += [jax.ShapeDtypeStruct((D, L), bool), jax.ShapeDtypeStruct((D, G), bool)]

    def loss(*a):
        return windowed_attention(*a, window=window).astype(jnp.float32).sum()

    lowered, modules = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), *args)
    # Forward, dq and dk/dv: three Triton kernels, and no [L, L] score matrix anywhere.
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert f"x{L}x{L}x" not in text and "x128x128x" not in text
    # Every dot of the three kernels (scores, p @ v, and the backward's) multiplies in the tiles' own precision:
    # no TF32 for float32 tiles. IEEE is tt.dot's default input precision, which the printer leaves out.
    assert len(modules) == 3
    dots = [line for module in modules for line in re.findall(r"tt\.dot [^\n]*", module)]
    assert len(dots) >= 6 and all(f"x{'f32' if dtype == jnp.float32 else 'bf16'}>" in d for d in dots), dots
    assert not [d for d in dots if "inputPrecision" in d and "inputPrecision = ieee" not in d], dots


def test_auto_dispatch(monkeypatch):
    # The test machines have no GPU; on CPU "auto" takes the C++ kernel where it builds.
    from sce_jax.kernels import cpu_attention

    assert attention.resolve_attention_impl("auto") == ("cpu" if cpu_attention.available()[0] else "xla")
    assert attention.resolve_attention_impl("pallas") == "pallas"
    # On GPU the Pallas kernel is an explicit choice until it has been validated on one.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not attention.PALLAS_VALIDATED_ON_GPU
    assert attention.resolve_attention_impl("auto") == "xla"
    assert attention.resolve_attention_impl("pallas") == "pallas"
    monkeypatch.setattr(attention, "PALLAS_VALIDATED_ON_GPU", True)
    assert attention.resolve_attention_impl("auto") == "pallas"
    assert attention.resolve_attention_impl("triton") == "triton"  # explicit only, like "pallas"
    with pytest.raises(ValueError, match="unknown attention_impl"):
        attention.resolve_attention_impl("mosaic")


def test_model_with_kernel_matches_xla_path():
    config = SparseCrossEncoderConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=64, attention_window_size=3,
    )
    rng = np.random.default_rng(0)
    query_ids = np.zeros((2, 6), np.int32)
    query_ids[0, :5], query_ids[1, :3] = rng.integers(1, 100, 5), rng.integers(1, 100, 3)
    doc_ids = np.zeros((3, 23), np.int32)
    doc_ids[0], doc_ids[1, :9] = rng.integers(1, 100, 23), rng.integers(1, 100, 9)
    batch = Batch(query_ids, doc_ids, np.array([0, 0, 1], np.int32))

    def scores_and_grad(impl, interpret):
        model = SparseCrossEncoderModel(config, rngs=nnx.Rngs(0), attention_impl=impl, interpret=interpret)
        graph, params = nnx.split(model)
        scores = jax.jit(lambda p: nnx.merge(graph, p)(batch))
        return scores(params), jax.jit(jax.grad(lambda p: scores(p).sum()))(params)

    scores, grads = scores_and_grad("pallas", True)
    xla_scores, xla_grads = scores_and_grad("xla", False)
    np.testing.assert_allclose(scores, xla_scores, atol=1e-5, rtol=1e-5)
    for grad, xla_grad in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(grad, xla_grad, atol=1e-5, rtol=1e-4)


_SHARDED_SCRIPT = "import jax\n" + inspect.getsource(abstract_gpu_mesh) + textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from sce_jax.kernels.windowed_attention import windowed_attention

    rng = np.random.default_rng(0)
    D, L, H, K, G = 4, 21, 2, 32, 5
    q, k, v = (jnp.asarray(rng.standard_normal((D, L, H, K)), jnp.float32) for _ in range(3))
    kg, vg = (jnp.asarray(rng.standard_normal((D, G, H, K)), jnp.float32) for _ in range(2))
    doc_mask = jnp.arange(L)[None, :] < jnp.array([21, 10, 3, 15])[:, None]
    global_mask = jnp.ones((D, G), bool)
    args = (q, k, v, kg, vg, doc_mask, global_mask)

    def loss(*a):
        return (windowed_attention(*a, window=2, interpret=True) ** 2).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    expected = step(*args)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            sharded = jax.device_put(args, NamedSharding(mesh, P("data")))
            assert "shard_map" in str(jax.make_jaxpr(step)(*sharded))
            actual = step(*sharded)
        assert actual[1][0].sharding.spec[0] == "data", actual[1][0].sharding
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)
    with jax.set_mesh(mesh):
        try:
            windowed_attention(*(a[:3] for a in args), window=2, interpret=True)
        except ValueError as error:
            assert "cannot be split evenly" in str(error), error
        else:
            raise AssertionError("3 documents on 2 devices were accepted")
    # Inside a caller's shard_map with check_vma on (the rerank step): the GPU kernels still lower (for a mesh of
    # two abstract GPUs).
    gpu_mesh = abstract_gpu_mesh((2,), ("data",))
    inner = jax.shard_map(
        lambda *b: windowed_attention(*b, window=2), mesh=gpu_mesh, in_specs=P("data"), out_specs=P("data")
    )
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    grad = jax.jit(jax.grad(lambda *a: inner(*a).sum(), argnums=(0, 1, 2, 3, 4)))
    with jax.sharding.use_abstract_mesh(gpu_mesh):
        assert grad.trace(*structs).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 3
    print("sharded ok")
    """
)


def test_kernel_is_sharded_over_documents():
    """Under a data-parallel mesh the kernel runs per device shard (shard_map), with the same results."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded ok" in result.stdout


_TRITON_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np, torch
    sys.path.insert(0, "tests")
    from test_kernels import make_inputs, reference_attention
    import jax.numpy as jnp
    from sce_jax.kernels.triton_attention import doc_attention_forward, kernel_settings

    for window in (1, 4, 16, None):
        for head_dim, lengths in ((32, (70, 33, 11, 0)), (24, (40, 9))):
            (q, k, v, cls_k, cls_v, query_k, query_v), doc_query, doc_mask, global_mask, dout = make_inputs(
                jnp.float32, head_dim=head_dim, doc_lengths=lengths, seed=3)
            kg = np.concatenate([cls_k, query_k[doc_query]], axis=1)
            vg = np.concatenate([cls_v, query_v[doc_query]], axis=1)
            D, L, H, K = q.shape
            settings = kernel_settings(L, kg.shape[1], H, K, window, np.float32)
            pad = lambda x: np.pad(np.asarray(x, np.float32), ((0, 0), (0, 0), (0, 0), (0, settings["HEAD"] - K)))
            args = [torch.from_numpy(pad(x)) for x in (q, k, v, kg, vg)]
            args += [torch.from_numpy(doc_mask.astype(np.int32)), torch.from_numpy(global_mask.astype(np.int32))]
            out, lse = torch.zeros(args[0].shape), torch.zeros((D, H, L))
            grid = (-(-L // settings["BLOCK_Q"]), H, D)
            doc_attention_forward[grid](*args, out, lse, **settings)
            expected, _ = reference_attention(*(np.asarray(x, np.float64) for x in (q, k, v, kg, vg)), doc_mask,
                                              global_mask, window, np.zeros(q.shape))
            np.testing.assert_allclose(out.numpy()[..., :K], expected, atol=1e-5, rtol=1e-5)
            if lengths[-1] == 0:  # a document with no visible key: zeros
                assert not out.numpy()[-1].any()
    print("triton ok")
    """
)


def test_triton_forward_kernel_in_the_interpreter():
    """The Triton forward kernel (attention_impl="triton" on GPU) in Triton's interpreter on CPU, against the
    float64 reference: windows 1, 4, 16 and full, several documents per query, padding, an empty document, a head
    size padded to 32."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu", PYTHONPATH=path)
    result = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton ok" in result.stdout

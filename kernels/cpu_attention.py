"""One sparse cross-encoder layer's attention on CPU as a fused C++ kernel (an XLA FFI custom call).

`cpu_attention` takes the QKV projection's output for the model's flat token matrix ([CLS] rows, then query
tokens, then document rows; `sce_jax.attention.TokenLayout`) and returns every token's attention output, [tokens, H, K]:
[CLS] sees itself, its query and its document; query tokens see the query; document tokens see their ±window
neighbours of the same document, their [CLS] and the query (each edge switched by the config's flags), one
float32 softmax per token and head. `sce_jax.attention.sparse_attention` is the reference it matches.

The source (cpu_attention.cc) is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) for
this machine's CPU and cached under `$SCE_JAX_CACHE_DIR` (default `~/.cache/sce_jax`); `available()` says
whether that worked, and why not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_TARGET = "sce_jax_cpu_attention"
_CXX_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC"]

# Under "sce_jax", whose INFO messages the command-line tools show.
logger = logging.getLogger("sce_jax.cpu_attention")

# Bits of the kernel's `flags` attribute.
CLS_QUERY, CLS_DOC, DOC_CLS, DOC_QUERY, CLS_ONLY = 1, 2, 4, 8, 16


class KernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded here (no compiler, a compile error, ...)."""


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sce_jax"
    return Path(os.environ.get("SCE_JAX_CACHE_DIR", default))


def _cpu_model() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _build_and_register() -> None:
    """Compile (once per source, compiler, jax version and CPU model) and register the kernel."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise KernelUnavailable("no C++ compiler found (set $CXX or install g++)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join(
        [source, compiler.encode(), " ".join(_CXX_FLAGS).encode(), jax.__version__.encode(), _cpu_model().encode()]
    )).hexdigest()[:16]
    library = _cache_dir() / f"cpu_attention-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        logger.info("compiling the CPU attention kernel for this machine (once, a few seconds; cached in %s)", library.parent)
        # Compile to a temporary name and rename, so concurrent processes never load a half-written file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        command = [compiler, *_CXX_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", partial]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            os.unlink(partial)
            raise KernelUnavailable(f"cannot run {compiler}: {error}") from error
        if done.returncode != 0:
            os.unlink(partial)
            raise KernelUnavailable(f"compiling {_SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    handler = ctypes.cdll.LoadLibrary(str(library)).SceJaxCpuAttention
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler), platform="cpu")


@functools.cache
def available() -> tuple[bool, str]:
    """(True, "") when the kernel is built and registered, else (False, why); tried once per process."""
    try:
        _build_and_register()
    except KernelUnavailable as error:
        return False, str(error)
    except OSError as error:  # an unwritable cache directory, a library that does not load
        return False, f"{type(error).__name__}: {error}"
    return True, ""


def cpu_attention(
    q_TxPxHxK: jax.Array,
    kv_TxPxHxK: jax.Array,
    doc_slot_DxL: jax.Array,
    doc_query_D: jax.Array,
    query_mask_QxLq: jax.Array,
    *,
    window: int,
    flags: int,
) -> jax.Array:
    """Attention outputs [tokens, H, K], or [D·C, H, K] for the [CLS] rows alone with `CLS_ONLY` in `flags`.

    q: plane 0 of [Tq, Pq, H, K] holds the query vectors (Tq = tokens, or at least D·C with CLS_ONLY); kv: planes
    Pkv - 2 and Pkv - 1 of [tokens, Pkv, H, K] hold keys and values (pass the QKV output [tokens, 3, H, K] as both).
    doc_slot: each document token's slot in its row (-1 padding); doc_query: each row's query; query_mask: real
    query tokens. float32 only; forward only (sce_jax.attention differentiates through the XLA reference).
    """
    ok, why = available()
    if not ok:
        raise KernelUnavailable(why)
    tokens, _, heads, head_dim = kv_TxPxHxK.shape
    num_rows, row_length = doc_slot_DxL.shape
    num_queries, query_length = query_mask_QxLq.shape
    slots = (tokens - num_queries * query_length - num_rows * row_length) // num_rows
    out_tokens = num_rows * slots if flags & CLS_ONLY else tokens
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((out_tokens, heads, head_dim), jnp.float32))
    return call(
        q_TxPxHxK.astype(jnp.float32),
        kv_TxPxHxK.astype(jnp.float32),
        doc_slot_DxL.astype(jnp.int32),
        doc_query_D.astype(jnp.int32),
        query_mask_QxLq.astype(jnp.int32),
        window=np.int64(window),
        flags=np.int64(flags),
    )

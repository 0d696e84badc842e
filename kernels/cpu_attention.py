"""One sparse cross-encoder layer's attention on CPU as a fused C++ kernel (an XLA FFI custom call).

`cpu_attention` takes the QKV projection's output for the model's flat token matrix ([CLS] rows, then query
tokens, then document rows; `sce_jax.attention.TokenLayout`) and returns every token's attention output, [tokens, H, K]:
[CLS] sees itself, its query and its document; query tokens see the query; document tokens see their ±window
neighbours of the same document, their [CLS] and the query (each edge switched by the config's flags), one
float32 softmax per token and head. `sce_jax.attention.sparse_attention` is the reference it matches.

The source (cpu_attention.cc, built into one library with the int8 layers' cpu_int8.cc: kernels/cpu_int8.py) is
compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) for
this machine's CPU and cached under `$SCE_JAX_CACHE_DIR` (default `~/.cache/sce_jax`); `available()` says
whether that worked, and why not. The cache is keyed by the sources, the compiler's version, the flags, the
JAX version and the instruction-set features the compiler enables for this CPU (its predefined macros under
`-march=native`), so machines sharing a home directory each get a build they can run. A cached library is
loaded only when it matches the SHA-256 written beside it (after the library was fsynced); otherwise it is
rebuilt. A build runs in its own process group with a timeout (`$SCE_JAX_BUILD_TIMEOUT`, seconds, default
300) and is killed and cleaned up on failure, timeout or interrupt; it is cached only when the result loads in
a separate process, exports the kernel and leaves the floating-point mode alone (no flush-to-zero).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sce_jax.cache import cache_dir

# One library holds the CPU kernels: this attention and the int8 layers (kernels/cpu_int8.py).
_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_attention.cc", "cpu_int8.cc")]
_HEADERS = [Path(__file__).with_name("cpu_parallel.h")]
_TARGET = "sce_jax_cpu_attention"
# FFI target -> exported handler symbol.
_TARGETS = {_TARGET: "SceJaxCpuAttention", "sce_jax_int8_linear": "SceJaxInt8Linear",
            "sce_jax_int8_layer_tail": "SceJaxInt8LayerTail"}
# The loaded library (for its plain C exports, such as SceJaxInt8Amx), once registered.
_library: ctypes.CDLL | None = None
# Compiled and linked in two steps: `-ffast-math` on the link line would make GCC < 13 (and clang) link
# crtfastmath.o, whose constructor sets flush-to-zero / denormals-are-zero for the whole process on load.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-fPIC"]
_LINK_FLAGS = ["-shared"]
_DEFAULT_TIMEOUT_S = 300.0

# Under "sce_jax", whose INFO messages the command-line tools show.
logger = logging.getLogger("sce_jax.cpu_attention")

# Bits of the kernel's `flags` attribute.
CLS_QUERY, CLS_DOC, DOC_CLS, DOC_QUERY, CLS_ONLY = 1, 2, 4, 8, 16

# Run in a fresh interpreter on a new build: load it, find the kernel, and check that a denormal survives.
_CHECK_LIBRARY = """
import ctypes, sys
library = ctypes.CDLL(sys.argv[1])
for symbol in sys.argv[3:]:
    getattr(library, symbol)
if float(sys.argv[2]) * 1.0 == 0.0:
    sys.exit("loading it sets flush-to-zero / denormals-are-zero (a -ffast-math link?)")
"""


class KernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded here (no compiler, a compile error, ...)."""


def _compiler() -> list[str]:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise KernelUnavailable("no C++ compiler found (set $CXX or install g++)")
    return shlex.split(compiler)


def _timeout() -> float:
    value = os.environ.get("SCE_JAX_BUILD_TIMEOUT", "")
    try:
        return float(value) if value else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise KernelUnavailable(f"SCE_JAX_BUILD_TIMEOUT={value!r} is not a number of seconds") from None


def _run(command: list[str], *, cwd: Path, timeout: float, what: str) -> str:
    """Run `command` in its own process group (the compiler driver's children included); on a timeout, an
    error or an interrupt (SIGINT, or SIGTERM: see `_sigterm_raises`) kill the whole group first."""
    env = dict(os.environ, TMPDIR=str(cwd))  # the compiler's own temporary files go with the build directory
    process = None
    try:
        with _signals_held():  # an interrupt now would leave a started compiler without anyone to kill it
            try:
                process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           errors="replace", start_new_session=True)
            except OSError as error:
                raise KernelUnavailable(f"cannot run {command[0]}: {error}") from error
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KernelUnavailable(f"{what} timed out after {timeout:g} s (set SCE_JAX_BUILD_TIMEOUT)") from None
    finally:
        if process is not None and process.returncode is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    if process.returncode != 0:
        raise KernelUnavailable(f"{what} failed (exit status {process.returncode}):\n{output[-2000:]}")
    return output


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held():
    """Defer SIGINT and SIGTERM (their Python handlers; main thread only) to the end of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {}
    for number in _INTERRUPTS:
        handler = signal.getsignal(number)
        if handler is not None and handler is not signal.SIG_IGN:
            previous[number] = signal.signal(number, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in pending:
            signal.raise_signal(number)


class _Terminated(BaseException):
    """SIGTERM arrived during a build: unwinds it (killing the compiler, removing the build directory)."""


def _on_sigterm(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises():
    """Where SIGTERM has its default action (main thread only), turn it into _Terminated for the block, and end
    the process by SIGTERM, as it would have, once the build has been cleaned up."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _build_key(compiler: list[str]) -> str:
    """Source, compiler version, flags, JAX version and the CPU features -march=native turns on here."""
    timeout = _timeout()
    with tempfile.TemporaryDirectory(prefix=".key-", dir=cache_dir()) as scratch:
        version = _run([*compiler, "--version"], cwd=Path(scratch), timeout=timeout,
                       what="asking the compiler its version")
        features = _run([*compiler, *_COMPILE_FLAGS, "-dM", "-E", "-x", "c++", os.devnull], cwd=Path(scratch),
                        timeout=timeout, what="asking the compiler its target features")
    macros = "\n".join(sorted(features.splitlines()))
    parts = [*(path.read_bytes() for path in _SOURCES + _HEADERS), " ".join(compiler).encode(), version.encode(),
             " ".join(_COMPILE_FLAGS).encode(), " ".join(_LINK_FLAGS).encode(), jax.__version__.encode(),
             macros.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_builds(cache: Path, older_than_s: float) -> None:
    """Build directories left by a process that was killed outright (SIGKILL) mid-build."""
    now = time.time()
    for stale in [*cache.glob(".build-*"), *cache.glob(".key-*")]:
        try:
            if now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _build(compiler: list[str], library: Path) -> None:
    """Compile into a private build directory, check the result in another process, then publish the library
    (fsynced, renamed into place) and its checksum (written after, fsynced, renamed)."""
    cache = library.parent
    timeout = _timeout()
    _remove_stale_builds(cache, older_than_s=max(2 * timeout, 3600))
    logger.info("compiling the CPU kernels for this machine (once, a few seconds; cached in %s)", cache)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        deadline = time.monotonic() + timeout
        output = build / library.name
        objects = [build / source.with_suffix(".o").name for source in _SOURCES]
        for i, (source, obj) in enumerate(zip(_SOURCES, objects)):
            _run([*compiler, *_COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(obj)],
                 cwd=build, timeout=timeout if i == 0 else max(deadline - time.monotonic(), 1.0),
                 what=f"compiling {source.name}")
        _run([*compiler, *_LINK_FLAGS, *map(str, objects), "-o", str(output)], cwd=build,
             timeout=max(deadline - time.monotonic(), 1.0), what="linking the CPU kernels")
        data = output.read_bytes() if output.is_file() else b""
        if not data.startswith(b"\x7fELF"):
            raise KernelUnavailable(f"{shlex.join(compiler)} reported success but wrote no shared library "
                                    f"({len(data)} bytes)")
        if sys.executable:  # (empty in some embedded interpreters)
            _run([sys.executable, "-c", _CHECK_LIBRARY, str(output), "1e-310", *_TARGETS.values()], cwd=build, timeout=60,
                 what="loading the new library")
        with open(output, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(output, library)
        checksum = build / "checksum"
        _fsync_write(checksum, hashlib.sha256(data).hexdigest().encode())
        os.replace(checksum, _checksum_path(library))
        _fsync_directory(cache)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _open_verified(library: Path) -> int | None:
    """A descriptor of the cached library when it matches its checksum, else None (missing, partial, changed)."""
    try:
        expected = _checksum_path(library).read_text().strip()
        fd = os.open(library, os.O_RDONLY)
    except (OSError, UnicodeDecodeError):
        return None
    digest = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() == expected:
        return fd
    os.close(fd)
    logger.warning("the cached CPU kernel library %s does not match its checksum; rebuilding it", library)
    return None


def _library_path(compiler: list[str]) -> Path:
    """Where the library for this compiler and CPU is cached."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    return cache_dir() / f"cpu_kernels-{_build_key(compiler)}.so"


def _build_and_register() -> None:
    """Build (once per key, see the module docstring), verify and load the library, and register its kernels."""
    global _library
    compiler = _compiler()
    library = _library_path(compiler)
    fd = _open_verified(library)
    if fd is None:
        _build(compiler, library)
        fd = _open_verified(library)
        if fd is None:
            raise KernelUnavailable(f"the freshly built {library} does not match its checksum")
    try:
        # Load the very file that was verified, whatever has been renamed onto the path since.
        path = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(library)
        library_handle = ctypes.CDLL(path)
        handlers = {target: getattr(library_handle, symbol) for target, symbol in _TARGETS.items()}
    finally:
        os.close(fd)
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _library = library_handle


@functools.cache
def available() -> tuple[bool, str]:
    """(True, "") when the kernel is built and registered, else (False, why); tried once per process."""
    try:
        with _sigterm_raises():
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

"""The CPU kernels' compiled libraries: which builds exist, which one this CPU runs, loading and registering them.

`pip install` (setup.py) compiles the C++ kernels (cpu_attention.cc and cpu_int8.cc: the attention and the fused
int8 layers) once per instruction set into plain shared libraries beside this file, `libsce_jax_cpu_<variant>.so`,
plus a small probe compiled for the baseline architecture, `libsce_jax_cpu_features.so`, that reads the CPU's
features (cpuid, and xgetbv for the registers the operating system saves) and asks Linux for the AMX tile state.
No compiler is needed at run time.

Variants, best first (`VARIANTS`): on x86-64 `amx` (x86-64-v4 + AVX512-VNNI + AMX-INT8: Sapphire Rapids and
later), `avx512_vnni` (x86-64-v4 + AVX512-VNNI: Ice Lake, Zen 4), `avx2` (x86-64-v3: Haswell, Zen 1-3) and
`generic` (the baseline); elsewhere (aarch64) `generic` only. `selected()` is the best one that is built and that
this CPU can run; `$SCE_JAX_CPU_KERNELS` (`auto`, a variant's name, or `none`) overrides it, read once per
process. A variant this CPU cannot run, or an unknown name, is an `InputError` naming the setting.

Each loaded variant registers its XLA FFI targets under names of its own (`target`), so one process can run
several (the tests compare each with the numpy references).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

import jax

from sce_jax.errors import InputError

ENV = "SCE_JAX_CPU_KERNELS"
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Every variant the build compiles for this architecture, best first, with the CPU features each needs (the
# probe's names: `FEATURE_BITS`) and its int8 weight layout (kernels/cpu_int8.cc).
VARIANTS = ("amx", "avx512_vnni", "avx2", "generic") if _X86 else ("generic",)
REQUIRES = {"amx": ("x86-64-v4", "avx512_vnni", "amx_int8"), "avx512_vnni": ("x86-64-v4", "avx512_vnni"),
            "avx2": ("x86-64-v3",), "generic": ()}
INT8_LAYOUTS = {"amx": "tiles", "avx512_vnni": "quads", "avx2": "pairs", "generic": "pairs"}
# SceJaxCpuFeatures' bits (kernels/cpu_features.cc).
FEATURE_BITS = {"x86-64-v2": 1, "avx2": 2, "x86-64-v3": 4, "x86-64-v4": 8, "avx512_vnni": 16, "amx_int8": 32}
# FFI target names by op, and the handler each exports.
_HANDLERS = {"attention": "SceJaxCpuAttention", "int8_linear": "SceJaxInt8Linear",
             "int8_layer_tail": "SceJaxInt8LayerTail"}
_DIRECTORY = Path(__file__).resolve().parent
_PROBE = _DIRECTORY / "libsce_jax_cpu_features.so"
_NOT_BUILT = ("the C++ CPU kernels are not built here ({path} is missing): in a checkout run `pip install -e .` "
              "(or `python setup.py build_ext --inplace`), or install sce_jax from a wheel")


class KernelUnavailable(RuntimeError):
    """The C++ kernels cannot run here (not built, switched off, or a variant this CPU lacks)."""


def library_path(variant: str) -> Path:
    return _DIRECTORY / f"libsce_jax_cpu_{variant}.so"


def built(variant: str) -> bool:
    """Whether `variant`'s library and the feature probe are here (built at install)."""
    return _PROBE.is_file() and library_path(variant).is_file()


def target(variant: str, op: str) -> str:
    """The FFI target name of `op` ("attention", "int8_linear", "int8_layer_tail") in `variant`'s library."""
    return f"sce_jax_cpu_{variant}_{op}"


@functools.cache
def _probe() -> ctypes.CDLL | None:
    if not _PROBE.is_file():
        return None
    probe = ctypes.CDLL(str(_PROBE))
    probe.SceJaxCpuFeatures.restype = ctypes.c_uint64
    probe.SceJaxRequestAmx.restype = ctypes.c_int
    return probe


@functools.cache
def cpu_features() -> frozenset[str]:
    """The features (`FEATURE_BITS`' names) this CPU has and the OS enables for this process; AMX only once Linux
    granted this process the tile state. Empty without the probe library (nothing built) or off x86-64."""
    probe = _probe()
    if probe is None:
        return frozenset()
    bits = probe.SceJaxCpuFeatures()
    features = {name for name, bit in FEATURE_BITS.items() if bits & bit}
    if "amx_int8" in features and probe.SceJaxRequestAmx() != 1:
        features.discard("amx_int8")
    return frozenset(features)


def missing(variant: str) -> str:
    """Why this CPU cannot run `variant` ("" when it can)."""
    if not _PROBE.is_file() and variant != "generic":
        return _NOT_BUILT.format(path=_PROBE)
    lacking = [feature for feature in REQUIRES[variant] if feature not in cpu_features()]
    if not lacking:
        return ""
    if lacking == ["amx_int8"] and _probe().SceJaxCpuFeatures() & FEATURE_BITS["amx_int8"]:
        return "Linux did not grant this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM failed)"
    return f"this CPU lacks {', '.join(lacking)} (it has: {', '.join(sorted(cpu_features())) or 'none of them'})"


def _choice() -> str:
    return os.environ.get(ENV, "").strip() or "auto"


@functools.cache
def selected() -> str | None:
    """The variant the kernels run by default in this process: `$SCE_JAX_CPU_KERNELS` (read once), else the best
    built one this CPU runs; None with `none` or when none is built. InputError for an unknown name or a variant
    this CPU cannot run."""
    choice = _choice()
    if choice == "none":
        return None
    if choice == "auto":
        return next((v for v in VARIANTS if built(v) and not missing(v)), None)
    if choice not in VARIANTS:
        raise InputError(f"${ENV}={choice!r}: expected auto, none or one of {', '.join(VARIANTS)} (this machine's builds)")
    if why := missing(choice):
        raise InputError(f"${ENV}={choice}: {why}")
    return choice


def available(variant: str | None = None) -> tuple[bool, str]:
    """(True, "") when `variant` (default: `selected()`) is built, runs on this CPU and is registered here, else
    (False, why)."""
    try:
        load(variant)
    except KernelUnavailable as error:
        return False, str(error)
    return True, ""


def require(variant: str | None) -> str:
    """`variant` (default: `selected()`), loaded and registered; KernelUnavailable saying why not."""
    variant = variant or selected()
    load(variant)
    return variant


def load(variant: str | None = None) -> ctypes.CDLL:
    """`variant`'s library (default: `selected()`), loaded and its FFI targets registered (once per process)."""
    if variant is None:
        variant = selected()
        if variant is None:
            if _choice() == "none":
                raise KernelUnavailable(f"the C++ CPU kernels are switched off (${ENV}=none)")
            raise KernelUnavailable(_NOT_BUILT.format(path=_DIRECTORY / "libsce_jax_cpu_*.so"))
    if variant not in VARIANTS:
        raise KernelUnavailable(f"no CPU kernel variant {variant!r} on this machine (variants: {', '.join(VARIANTS)})")
    return _load(variant)


@functools.cache
def _load_or_error(variant: str) -> ctypes.CDLL | str:
    if why := missing(variant):
        return why
    path = library_path(variant)
    if not path.is_file():
        return _NOT_BUILT.format(path=path)
    try:
        library = ctypes.CDLL(str(path))
        library.SceJaxCpuKernelsIsa.restype = ctypes.c_char_p
        built_for = library.SceJaxCpuKernelsIsa().decode()
        layout = {1: "tiles", 2: "pairs", 3: "quads"}.get(library.SceJaxInt8Layout())
        handlers = {op: getattr(library, symbol) for op, symbol in _HANDLERS.items()}
    except (OSError, AttributeError) as error:
        return f"cannot load {path}: {error}"
    if built_for != variant or layout != INT8_LAYOUTS[variant]:
        return f"{path} was built for {built_for} ({layout} weights), not {variant}: rebuild the package"
    jax.devices("cpu")  # registering into a started backend: a rejected handler is an error here, not at start-up
    try:
        for op, handler in handlers.items():
            jax.ffi.register_ffi_target(target(variant, op), jax.ffi.pycapsule(handler), platform="cpu")
    except Exception as error:  # e.g. FFI headers newer than this jaxlib (XLA names the versions)
        return f"jax rejected {path.name}: {' '.join(str(error).split())}"
    return library


def _load(variant: str) -> ctypes.CDLL:
    result = _load_or_error(variant)
    if isinstance(result, str):
        raise KernelUnavailable(f"CPU kernels '{variant}': {result}")
    return result


def describe() -> str:
    """One line: the CPU's model, its features and the selected variant (for benchmarks and logs)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        chosen = selected() or f"none ({_choice()})"
    except InputError as error:
        chosen = f"invalid: {error}"
    features = ", ".join(name for name in FEATURE_BITS if name in cpu_features()) or "baseline"
    return f"{model}; {features}; C++ kernels: {chosen}"

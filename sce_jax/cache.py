"""Where sce_jax caches what it builds once: text-store indexes, docpair arrays, JSONL indexes, and XLA's compiled
programs (jax's persistent compilation cache)."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

CACHE_ENV = "SCE_JAX_CACHE_DIR"
# "0", "false", "no" or "off": the commands leave jax's persistent compilation cache off.
COMPILATION_CACHE_ENV = "SCE_JAX_COMPILATION_CACHE"
# Programs that compile faster than this are not written: reading one back costs a file read and a
# deserialization, which saves little below this. jax's default, 1 s, would skip the README's quick start
# entirely: it compiles one program, the MiniLM-L6 forward, in 0.5 s on a quiet 2-core Xeon.
MIN_COMPILE_SECONDS = 0.1


def cache_dir() -> Path:
    """`$SCE_JAX_CACHE_DIR`, default `$XDG_CACHE_HOME/sce_jax` (`~/.cache/sce_jax`); `~` expanded, absolute."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(os.path.expanduser(configured)).absolute()
    return Path(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache")).absolute() / "sce_jax"


def cpu_features() -> str:
    """The host CPU's instruction-set features, as one line: the sorted `flags` (x86) or `Features` (Arm) of
    /proc/cpuinfo, else the machine and processor names (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def compilation_cache_dir() -> Path:
    """`cache_dir()/xla/jaxlib-VERSION-MACHINE-HASH`: one folder per jaxlib version and CPU kind (HASH: of
    `cpu_features()`), so a cache shared by several machines never hands one CPU code compiled for another."""
    import jaxlib

    features = hashlib.sha256(cpu_features().encode()).hexdigest()[:16]
    return cache_dir() / "xla" / f"jaxlib-{jaxlib.__version__}-{platform.machine()}-{features}"


def compilation_cache_enabled() -> bool:
    return os.environ.get(COMPILATION_CACHE_ENV, "").strip().lower() not in ("0", "false", "no", "off")


# XLA's C++ log threshold, as jax reads it at import; jax itself sets "1" (warnings) where it is unset.
LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"


def quiet_cache_loader() -> None:
    """Hide XLA's C++ ERROR lines while the persistent cache is in use, unless `$TF_CPP_MIN_LOG_LEVEL` says otherwise.

    On CPUs for which LLVM tunes with `+prefer-no-gather`/`+prefer-no-scatter` (AMD Zen 4/5, several Intel Xeons),
    XLA's CPU loader logs two ERROR lines of ~3,000 characters for every program it reads back from the cache,
    because it compares those tuning flags with the host's instruction sets (jax-ml/jax#38445, openxla/xla#44565;
    open). The program loads and runs correctly (`compilation_cache_dir()` is per CPU kind), but every command would
    print pages of warnings about a SIGILL that cannot happen. Only jax's own default ("1") or an unset variable is
    raised to "3" (fatal only); any other value, e.g. `TF_CPP_MIN_LOG_LEVEL=0`, is left as the user set it.
    """
    if os.environ.get(LOG_LEVEL_ENV, "1").strip() != "1":
        return
    from jax._src.lib import utils  # where jax's own `jax_logging_level` setting sets the same threshold

    set_level = getattr(utils, "absl_set_min_log_level", None)
    if set_level is not None:
        set_level(3)


def enable_compilation_cache() -> Path | None:
    """Turn on jax's persistent compilation cache in `compilation_cache_dir()`; returns the folder in use.

    Nothing changes where `$SCE_JAX_COMPILATION_CACHE` is 0/false/no/off (returns None) or where jax already has
    a cache folder (`JAX_COMPILATION_CACHE_DIR`, `jax.config`; returned as it is). Where a cache is in use, XLA's
    false warnings on reading it back are hidden (`quiet_cache_loader`). Call it before the first computation: jax
    decides once per process, at its first compilation, whether the cache is used.
    """
    if not compilation_cache_enabled():
        return None
    import jax

    quiet_cache_loader()
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory

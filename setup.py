"""Builds the C++ CPU kernels when the package is built (everything else about the package is in pyproject.toml).

kernels/cpu_attention.cc and kernels/cpu_int8.cc become one plain shared library per instruction set,
sce_jax/kernels/libsce_jax_cpu_<variant>.so (in a checkout, `pip install -e .` puts them in kernels/), and
kernels/cpu_features.cc a probe of the CPU's features compiled for the baseline architecture; at run time
sce_jax/kernels/cpu_library.py loads the best variant this CPU runs with ctypes (no Python extension module, so the
wheel is tagged py3-none-<platform>). The variants here and there must agree (tests/test_cpu_kernel.py checks it).
"""

from __future__ import annotations

import os
import platform

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.modified import newer_group

KERNEL_SOURCES = ["kernels/cpu_attention.cc", "kernels/cpu_int8.cc"]
KERNEL_HEADERS = ["kernels/cpu_parallel.h"]
# -ffast-math on the compile line only: on the link line GCC < 13 (and clang) add crtfastmath.o, whose constructor
# turns on flush-to-zero / denormals-are-zero for the whole process that loads the library.
COMPILE_FLAGS = ["-std=c++17", "-O3", "-ffast-math", "-fopenmp-simd", "-g0", "-Wno-maybe-uninitialized"]
LINK_FLAGS: list[str] = []
# Best first; kernels/cpu_library.py has the same names (and the CPU features each needs).
X86_VARIANTS = {
    "amx": ["-march=x86-64-v4", "-mavx512vnni", "-mamx-tile", "-mamx-int8"],
    "avx512_vnni": ["-march=x86-64-v4", "-mavx512vnni"],
    "avx2": ["-march=x86-64-v3"],
    "generic": [],
}
PACKAGE = "sce_jax.kernels"


def variants() -> dict[str, list[str]]:
    """The builds for the machine this runs on: every x86-64 variant there, the portable one elsewhere."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_VARIANTS
    return {"generic": []}


def extensions() -> list[Extension]:
    kernels = [Extension(f"{PACKAGE}.libsce_jax_cpu_{name}", KERNEL_SOURCES, depends=KERNEL_HEADERS,
                         extra_compile_args=COMPILE_FLAGS + flags, language="c++")
               for name, flags in variants().items()]
    probe = Extension(f"{PACKAGE}.libsce_jax_cpu_features", ["kernels/cpu_features.cc"],
                      extra_compile_args=COMPILE_FLAGS, language="c++")
    return [probe, *kernels]


class BuildLibraries(build_ext):
    """Plain shared libraries (no CPython suffix), each compiled into a build directory of its own (the variants
    share their sources), in parallel; the kernels against the FFI headers of the jax in the build environment."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext: Extension) -> None:
        target = self.get_ext_fullpath(ext.name)
        if not (self.force or newer_group([*ext.sources, *ext.depends], target, "newer")):
            return
        includes = []
        if ext.sources != ["kernels/cpu_features.cc"]:
            import jax.ffi

            includes = ["-isystem", jax.ffi.include_dir()]  # -isystem: no warnings from jax's headers
        objects = self.compiler.compile(ext.sources, output_dir=os.path.join(self.build_temp, ext.name),
                                        extra_postargs=includes + ext.extra_compile_args, depends=ext.depends)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.compiler.link_shared_object(objects, target, extra_postargs=LINK_FLAGS, target_lang="c++")


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: native code, but no CPython ABI."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildLibraries, "bdist_wheel": PlatformWheel})

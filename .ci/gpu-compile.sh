#!/usr/bin/env bash
# Deviceless GPU compile check: compiles the attention kernel, the whole model and the 8-GPU training step for an
# H100/H200 (sm_90) with XLA's CUDA plugin and a pinned ptxas, on this CPU-only machine, and fails on a compile
# error, a register spill, shared memory over the limit, or TF32 in float32 (benchmarks/gpu_compile.py,
# docs/kernels.md). Own virtual environment from Python 3.12 and the project's constraints. Arguments go to
# gpu_compile.py (e.g. --wide: head size 64 and sm_80 too, before a release).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PY312=${PY312:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1)}
if [ -z "$PY312" ]; then echo "gpu-compile: no Python 3.12 found (set PY312)" >&2; exit 1; fi
VENV=.venv-gpu-compile
rm -rf "$VENV"
"$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# jax[cuda13-local]: the plugin without the CUDA runtime libraries (nothing runs on a GPU here); ptxas from the
# nvidia-cuda-nvcc wheel, not whatever CUDA toolkit the machine has; triton and jax-triton for attention_impl="triton".
"$VENV/bin/python" -m pip install -q -c constraints/py312.txt -c constraints/gpu-compile.txt \
    . 'jax[cuda13-local]' nvidia-cuda-nvcc triton jax-triton
echo "gpu-compile: install took $((SECONDS - start)) s"
# From the checkout's root: the driver imports sce_jax from the working tree (the same code as the install).
"$VENV/bin/python" benchmarks/gpu_compile.py "$@"
echo "gpu-compile: took $((SECONDS - start)) s"

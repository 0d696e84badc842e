"""The document-row attention forward as a plain Triton kernel (the `triton` package), for the measurement that
decides the GPU kernel's backend (docs/kernels.md, "Backend"): what it takes, whether it compiles for sm_90 and
sm_80 without a GPU and with how many registers and spills, and whether it can be tested on CPU.

    python benchmarks/triton_forward.py --interpret     # Triton's interpreter on CPU vs a float64 numpy reference
    python benchmarks/triton_forward.py --compile       # Triton -> PTX for sm_90 and sm_80, then ptxas -v
                                                        # ($TRITON_PTXAS_PATH, else ptxas on PATH)

The kernel is `sce_jax.kernels.triton_attention` (attention_impl="triton"). Needs `pip install triton`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import triton  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sce_jax.kernels.triton_attention import doc_attention_forward, kernel_settings  # noqa: E402


# --- checks -----------------------------------------------------------------------------------------------------


def reference(q, k, v, kg, vg, doc_mask, global_mask, window):
    """float64 numpy: outputs [D, L, H, K] and log-sum-exp [D, H, L]."""
    D, L, H, K = q.shape
    pos = np.arange(L)
    band = np.ones((L, L), bool) if window is None else np.abs(pos[:, None] - pos[None, :]) <= window
    out, lse = np.zeros(q.shape), np.zeros((D, H, L))
    for d in range(D):
        keys, values = np.concatenate([kg[d], k[d]]), np.concatenate([vg[d], v[d]])
        visible = np.concatenate([np.broadcast_to(global_mask[d] > 0, (L, kg.shape[1])), band & (doc_mask[d] > 0)], 1)
        for h in range(H):
            s = np.where(visible, q[d, :, h] @ keys[:, h].T / np.sqrt(K), -np.inf)
            top = np.where(visible.any(1), s.max(1), 0.0)[:, None]
            e = np.where(visible, np.exp(s - top), 0.0)
            total = e.sum(1, keepdims=True)
            out[d, :, h] = e / np.maximum(total, 1e-300) @ values[:, h]
            lse[d, h] = np.where(total[:, 0] > 0, top[:, 0] + np.log(np.maximum(total[:, 0], 1e-300)), 0.0)
    return out, lse


def random_inputs(D=3, L=70, G=7, H=2, K=32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((D, L, H, K)).astype(np.float32) for _ in range(3))
    kg, vg = (rng.standard_normal((D, G, H, K)).astype(np.float32) for _ in range(2))
    doc_mask = (np.arange(L)[None, :] < np.array([L, L - 9, 0])[:D, None]).astype(np.int32)
    global_mask = (np.arange(G)[None, :] < np.array([G, 3, 0])[:D, None]).astype(np.int32)
    return q, k, v, kg, vg, doc_mask, global_mask


def run_interpreted(window, block_q=32, block_k=16) -> float:
    """The kernel in Triton's interpreter (CPU, torch tensors) against the numpy reference: max |error|."""
    import torch

    arrays = random_inputs()
    q, k, v, kg, vg, doc_mask, global_mask = arrays
    D, L, H, K = q.shape
    out = torch.zeros(q.shape)
    lse = torch.zeros((D, H, L))
    settings = {**kernel_settings(L, kg.shape[1], H, K, window, np.float32), "BLOCK_Q": block_q, "BLOCK_K": block_k}
    doc_attention_forward[(triton.cdiv(L, block_q), H, D)](*(torch.from_numpy(a) for a in arrays), out, lse,
                                                           **settings)
    expected_out, expected_lse = reference(*(a.astype(np.float64) for a in arrays), window)
    return max(float(np.abs(out.numpy() - expected_out).max()), float(np.abs(lse.numpy() - expected_lse).max()))


def compile_for(arch: int, dtype: str, window, L=4096, G=33, H=12, K=32) -> dict:
    """Triton -> PTX for `sm_{arch}` (no GPU needed) at the shipped tiles, then ptxas's statistics."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = {"float32": "*fp32", "bfloat16": "*bf16"}[dtype]
    signature = {name: pointer for name in ("q_ptr", "k_ptr", "v_ptr", "kg_ptr", "vg_ptr")}
    signature.update(doc_mask_ptr="*i32", global_mask_ptr="*i32", out_ptr=pointer, lse_ptr="*fp32")
    consts = kernel_settings(L, G, H, K, window, dtype)
    options = {name: consts.pop(name) for name in ("num_warps", "num_stages")}
    signature.update({name: "constexpr" for name in consts})
    source = ASTSource(doc_attention_forward, signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    stats = ptxas_statistics(ptx, arch)
    stats.update(shared_memory=compiled.metadata.shared, tensor_core_ops=sorted(set(
        re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\b|\btf32\b", ptx))))
    return stats


def ptxas_statistics(ptx: str, arch: int) -> dict:
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or shutil.which("ptxas")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.ptx")
        open(path, "w").write(ptx)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        result = subprocess.run([ptxas, "-v", f"-arch={arch_name}", path, "-o", path + ".cubin"],
                                capture_output=True, text=True, check=True)
    text = result.stderr + result.stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return dict(registers=int(re.search(r"Used (\d+) registers", text)[1]), spill_stores=int(spills[1]),
                spill_loads=int(spills[2]), ptxas=version)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    failed = False
    if args.interpret:
        for window in (1, 4, 16, None):
            error = run_interpreted(window)
            failed |= error > 1e-5
            print(f"interpreter, window {window}: max |kernel - float64 reference| = {error:.2e}")
    if args.compile:
        for arch in (90, 80):
            for dtype in ("float32", "bfloat16"):
                for head in (32, 64):
                    stats = compile_for(arch, dtype, 4, K=head)
                    failed |= stats["spill_stores"] > 0 or (dtype == "float32" and bool(stats["tensor_core_ops"]))
                    print(f"sm_{arch} {dtype} K={head}: {stats}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The document-row attention forward as a plain Triton kernel (the `triton` package), for the measurement that
decides the GPU kernel's backend (docs/kernels.md, "Backend"): what it takes, whether it compiles for sm_90 and
sm_80 without a GPU and with how many registers and spills, and whether it can be tested on CPU.

    python benchmarks/triton_forward.py --interpret     # Triton's interpreter on CPU vs a float64 numpy reference
    python benchmarks/triton_forward.py --compile       # Triton -> PTX for sm_90 and sm_80, then ptxas -v
    python benchmarks/triton_forward.py --jax           # through jax_triton.triton_call, compiled by XLA for sm_90

Same contract as `windowed_attention`'s forward (docs/architecture.md): row i of a document attends in one float32
softmax to document keys j with |i - j| <= window and doc_mask[j], and to the valid global keys; writes the output
and the row's log-sum-exp. Needs `pip install triton` (and `jax-triton` for --jax, Python >= 3.12).
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
import triton.language as tl  # noqa: E402

MASK_VALUE = tl.constexpr(-0.7 * float(np.finfo(np.float32).max))



@triton.jit
def doc_attention_forward(q_ptr, k_ptr, v_ptr, kg_ptr, vg_ptr, doc_mask_ptr, global_mask_ptr, out_ptr, lse_ptr,
                          L: tl.constexpr, G: tl.constexpr, H: tl.constexpr, scale: tl.constexpr,
                          window: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_G: tl.constexpr, HEAD: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_Q rows of one head of one document. q, k, v, out: [D, L, H, HEAD]; kg, vg: [D, G, H,
    HEAD]; doc_mask [D, L] and global_mask [D, G] int32; lse [D, H, L] float32. window < 0: full attention."""
    qb, h, d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, HEAD)
    doc_base = d * L * H * HEAD + h * HEAD
    q = tl.load(q_ptr + doc_base + rows[:, None] * (H * HEAD) + dims[None, :], mask=rows[:, None] < L, other=0.0)

    # The global keys ([CLS], query) open the online softmax; rows with no visible key keep l == 0.
    g = tl.arange(0, BLOCK_G)
    global_base = d * G * H * HEAD + h * HEAD
    global_offsets = global_base + g[:, None] * (H * HEAD) + dims[None, :]
    kg = tl.load(kg_ptr + global_offsets, mask=g[:, None] < G, other=0.0)
    vg = tl.load(vg_ptr + global_offsets, mask=g[:, None] < G, other=0.0)
    global_visible = (tl.load(global_mask_ptr + d * G + g, mask=g < G, other=0) > 0)[None, :]
    s = tl.where(global_visible, tl.dot(q, tl.trans(kg), input_precision=PRECISION) * scale, MASK_VALUE)
    m = tl.max(s, 1)
    p = tl.where(global_visible, tl.exp(s - m[:, None]), 0.0)
    l = tl.sum(p, 1)
    acc = tl.dot(p.to(vg.dtype), vg, input_precision=PRECISION)

    # The document key tiles the band [first row - window, last row + window] reaches.
    if window < 0:
        lo, hi = 0, L
    else:
        lo = tl.maximum(qb * BLOCK_Q - window, 0) // BLOCK_K * BLOCK_K
        hi = tl.minimum(qb * BLOCK_Q + BLOCK_Q + window, L)
    for start in range(lo, hi, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        key_offsets = doc_base + cols[:, None] * (H * HEAD) + dims[None, :]
        k = tl.load(k_ptr + key_offsets, mask=cols[:, None] < L, other=0.0)
        v = tl.load(v_ptr + key_offsets, mask=cols[:, None] < L, other=0.0)
        visible = (tl.load(doc_mask_ptr + d * L + cols, mask=cols < L, other=0) > 0)[None, :]
        if window >= 0:
            visible = visible & (tl.abs(rows[:, None] - cols[None, :]) <= window)
        s_tile = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, MASK_VALUE)
        m_new = tl.maximum(m, tl.max(s_tile, 1))
        p_tile = tl.where(visible, tl.exp(s_tile - m_new[:, None]), 0.0)
        rescale = tl.exp(m - m_new)
        acc = acc * rescale[:, None] + tl.dot(p_tile.to(v.dtype), v, input_precision=PRECISION)
        l = l * rescale + tl.sum(p_tile, 1)
        m = m_new
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    tl.store(out_ptr + doc_base + rows[:, None] * (H * HEAD) + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rows[:, None] < L)
    tl.store(lse_ptr + (d * H + h) * L + rows, tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), 0.0), mask=rows < L)


def constants(L: int, G: int, H: int, K: int, window: int | None, block_q: int, block_k: int, dtype: str) -> dict:
    """The kernel's compile-time parameters (head size and global keys padded to powers of two >= 16)."""
    return dict(L=L, G=G, H=H, scale=1.0 / math.sqrt(K), window=-1 if window is None else window, BLOCK_Q=block_q,
                BLOCK_K=block_k, BLOCK_G=max(16, triton.next_power_of_2(G)), HEAD=max(16, triton.next_power_of_2(K)),
                PRECISION="ieee" if dtype == "float32" else "tf32")


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
    grid = (triton.cdiv(L, block_q), H, D)
    doc_attention_forward[grid](*(torch.from_numpy(a) for a in arrays), out, lse,
                                **constants(L, kg.shape[1], H, K, window, block_q, block_k, "float32"))
    expected_out, expected_lse = reference(*(a.astype(np.float64) for a in arrays), window)
    return max(float(np.abs(out.numpy() - expected_out).max()), float(np.abs(lse.numpy() - expected_lse).max()))


def compile_for(arch: int, dtype: str, window, L=4096, G=33, H=12, K=32, block_q=32, block_k=16, num_warps=4,
                num_stages=2) -> dict:
    """Triton -> PTX for `sm_{arch}` (no GPU needed), then the pinned ptxas's statistics."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = {"float32": "*fp32", "bfloat16": "*bf16"}[dtype]
    signature = {name: pointer for name in ("q_ptr", "k_ptr", "v_ptr", "kg_ptr", "vg_ptr")}
    signature.update(doc_mask_ptr="*i32", global_mask_ptr="*i32", out_ptr=pointer, lse_ptr="*fp32")
    consts = constants(L, G, H, K, window, block_q, block_k, dtype)
    signature.update({name: "constexpr" for name in consts})
    source = ASTSource(doc_attention_forward, signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    stats = ptxas_statistics(ptx, arch)
    stats.update(shared_memory=compiled.metadata.shared, tensor_core_ops=sorted(set(
        re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\b|\btf32\b", ptx))))
    return stats


def ptxas_statistics(ptx: str, arch: int) -> dict:
    ptxas = os.environ.get("PTXAS") or shutil.which("ptxas") or triton.knobs.nvidia.ptxas.path
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
                    stats = compile_for(arch, dtype, 4, K=head, **({"block_q": 64, "block_k": 32} if dtype == "bfloat16" else {}))
                    failed |= stats["spill_stores"] > 0 or (dtype == "float32" and bool(stats["tensor_core_ops"]))
                    print(f"sm_{arch} {dtype} K={head}: {stats}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU tools that run without a GPU: benchmarks/gpu_check.py's --dry-run (every section on CPU, small shapes,
Pallas interpret mode, no timings) and benchmarks/gpu_compile.py's readers of ptxas's statistics, XLA's kernel
launches, the kernels' final IR and HLO dot precisions (on text as XLA and ptxas write it)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_compile  # noqa: E402

PTXAS_LOG = """\
I1203 18:50:14.857022    7811 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'loop_slice_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_slice_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers
I1203 18:50:18.035570    7855 subprocess_compilation.cc:349] ptxas warning : Registers are spilled to local memory in function 'doc_attention_forward', 128 bytes spill stores, 128 bytes spill loads
ptxas info    : Compiling entry function 'doc_attention_forward' for 'sm_90a'
ptxas info    : Function properties for doc_attention_forward
    136 bytes stack frame, 128 bytes spill stores, 128 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 136 bytes cumulative stack size
"""

THUNKS = """\
004: kCustomKernel [source       | next=005 (1)] loop_convert_fusion grid: [1, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
005: kCustomKernel [prev=004 (1) | next=006 (1)] doc_attention_forward grid: [2, 12, 8] threads: [128, 1, 1]  shared_memory: 32768 bytes
"""


def test_ptxas_statistics_and_launches(tmp_path):
    stats = gpu_compile.ptxas_statistics(PTXAS_LOG)
    assert stats["doc_attention_forward"] == dict(arch="sm_90a", stack=136, spill_stores=128, spill_loads=128,
                                                  registers=255)
    assert stats["loop_slice_fusion"]["registers"] == 24 and stats["loop_slice_fusion"]["spill_stores"] == 0
    (tmp_path / "module_0001.jit_case.thunk_sequence.txt").write_text(THUNKS)
    assert gpu_compile.launches(tmp_path, "case") == {
        "doc_attention_forward": {"grid": [2, 12, 8], "threads": 128, "shared_memory": 32768}}


def test_a_spilling_or_tensor_core_float32_kernel_fails_the_check(tmp_path):
    case = gpu_compile.Case("kernel", "sm90", "float32", inspect_ir=True)
    (tmp_path / f"module_0001.jit_{case.name}.thunk_sequence.txt").write_text(THUNKS)
    # The kernel's passes: a pass name mentions TF32 and an ldmatrix has an mma layout, neither is an mma.
    ir = ("// -----// IR Dump Before RoundF32ToTF32ForTf32DotRewritePass //----- //\n"
          "// -----// IR Dump Before StripDebugInfoPass //----- //\n"
          '"nvvm.ldmatrix"(%1) <{layout = #nvvm.mma_layout<row>}>\n')
    path = tmp_path / f"jit_{case.name}.doc_attention_forward.triton-to-llvm.txt"
    path.write_text(ir)
    assert gpu_compile.tensor_core_ops(tmp_path, case.name) == {"doc_attention_forward": []}
    path.write_text(ir + 'llvm.inline_asm "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32"\n')
    assert gpu_compile.tensor_core_ops(tmp_path, case.name) == {"doc_attention_forward": ["tf32", "wgmma.mma_async"]}

    limits = {"shared_memory_per_block_optin": 232448}
    problems = gpu_compile.check_case(case, None, None, PTXAS_LOG, tmp_path, limits)["problems"]
    assert any("spills 128 B" in p for p in problems) and any("float32 kernel uses" in p for p in problems)
    problems = gpu_compile.check_case(case, None, None, PTXAS_LOG, tmp_path, {"shared_memory_per_block_optin": 1024})
    assert any("shared memory, over" in p for p in problems["problems"])


def test_dot_precisions_count_float32_dots_by_precision():
    hlo = """\
  %dot.1 = f32[8,384]{1,0} dot(f32[8,384]{1,0} %a, f32[384,384]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, operand_precision={highest,highest}
  dot_general.2 = f32[8,384]{1,0} dot(a.1, b.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  dot_general.3 = bf16[8,384]{1,0} dot(a.2, b.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %gemm = (f32[8,384]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"precision_config":{"operand_precision":["HIGHEST","HIGHEST"],"algorithm":"ALG_UNSET"}}}
"""
    assert gpu_compile.dot_precisions(hlo) == {"HIGHEST,HIGHEST": 1, "none": 1, "gemm:HIGHEST,HIGHEST": 1}


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_section(tmp_path):
    """The GPU run's script end to end on CPU: correctness sections pass (interpret mode), speed sections run
    their code once and time nothing."""
    out = tmp_path / "check.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--dry-run", "--json", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and set(report["sections"]) == {
        "kernel", "model", "train_grads", "kernel_speed", "rerank_speed", "train_speed", "memory"}
    entries = [e for section in report["sections"].values() for e in section]
    assert not [e for e in entries if e.get("ok") is False or "error" in e], entries
    assert all(e["ok"] for e in report["sections"]["kernel"]) and len(report["sections"]["kernel"]) == 2 * 2
    assert all(r["best"] is None for r in report["sections"]["rerank_speed"])  # nothing timed
    assert {r["system"] for r in report["sections"]["rerank_speed"]} == {"sce_jax-pallas", "sce_jax-xla",
                                                                         "torch-sdpa-full"}
    memory = report["sections"]["memory"]
    assert all(m["peak_bytes"] > 0 for m in memory)
    assert (out.with_suffix(".log")).read_text().count("section ") == 7

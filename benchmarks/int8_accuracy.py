"""What int8 costs in accuracy: each int8 implementation's scores against its own float32 scores.

    python benchmarks/int8_accuracy.py [--passages 256] [--documents 96] [--output int8_accuracy.json]

On the throughput benchmark's model (the real all-MiniLM-L6-v2 encoder, positions interpolated to 4096, a seeded
random classifier head: an untrained head, so scores are not relevance) and its synthetic texts (passages: 64
per query; documents of ~2900 wordpieces: 16 per query here, so that a top 10 means something; the default 96
documents are 6 queries, ~25 minutes on 2 cores, most of it the peers' full attention), it scores every pair
with sce_jax float32 and int8, ONNX Runtime float32 and int8 (dynamic) and OpenVINO float32 and int8 (NNCF),
each in a fresh subprocess (benchmarks/rerank_throughput.py's workers). Per query: Spearman's rank correlation of
int8 against float32 scores, the overlap of the two top 10s, and max |int8 - float32| / (max - min of the
query's float32 scores). The table shows, per workload and pair, the minimum and mean Spearman, the mean
top-10 overlap and the largest relative score change over queries; the JSON has every query's values.
`--sce-only` leaves the peers out; `SCE_JAX_CPU_KERNELS=avx2` (or another build of the C++ kernels this CPU runs)
checks that build's int8 kernels (the machine line names the build).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rerank_throughput as bench  # noqa: E402

PAIRS = {  # label: (int8 implementation, float32 implementation), names as in rerank_throughput.implementations
    "sce_jax": ("sce_jax sparse int8", "sce_jax sparse f32"),
    "ONNX Runtime": ("ONNX Runtime int8", "ONNX Runtime f32"),
    "OpenVINO": ("OpenVINO int8", "OpenVINO f32"),
}
PER_QUERY = {"passages": 64, "documents": 16}


def per_query_metrics(reference: np.ndarray, other: np.ndarray, doc_query: np.ndarray) -> dict:
    """Spearman, top-10 overlap and max |Δ| relative to the reference's spread, one value per query."""
    found = {"spearman": [], "top10_overlap": [], "max_rel_delta": []}
    for query in np.unique(doc_query):
        a, b = reference[doc_query == query], other[doc_query == query]
        found["spearman"].append(float(spearmanr(a, b).statistic))
        k = min(10, len(a))
        found["top10_overlap"].append(len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])))
        found["max_rel_delta"].append(float(np.abs(a - b).max() / (a.max() - a.min())))
    return found


def summary(metrics: dict) -> dict:
    return {"spearman_min": min(metrics["spearman"]), "spearman_mean": float(np.mean(metrics["spearman"])),
            "top10_overlap_mean": float(np.mean(metrics["top10_overlap"])),
            "max_rel_delta": max(metrics["max_rel_delta"]), "queries": len(metrics["spearman"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--documents", type=int, default=96)
    parser.add_argument("--output", default="int8_accuracy.json")
    parser.add_argument("--sce-only", action="store_true", help="sce_jax alone (no ONNX Runtime, OpenVINO)")
    args = parser.parse_args()
    pairs = {"sce_jax": PAIRS["sce_jax"]} if args.sce_only else PAIRS
    if not args.sce_only and not bench.peers_available():
        sys.exit("the peers need the benchmark extra: pip install -e '.[benchmark]'")
    directory = Path(tempfile.mkdtemp(prefix="int8-accuracy-"))
    impls = bench.implementations(with_full=False)
    results = {"machine": bench.machine(), "workloads": {}}
    try:
        model_dir = bench.prepare_models(directory / "model", peers=not args.sce_only)
        for workload, count in (("passages", args.passages), ("documents", args.documents)):
            if count == 0:
                continue
            spec = dict(workload=workload, count=count, per_query=PER_QUERY[workload], model_dir=model_dir, scores=True)
            _, _, doc_query = bench.workload_texts(spec)
            scores = {}
            for int8, f32 in pairs.values():
                for name in (int8, f32):
                    scores[name] = np.array(bench.run_worker(**impls[name], **spec)["scores"], np.float32)
            results["workloads"][workload] = {
                label: {"per_query": (m := per_query_metrics(scores[f32], scores[int8], np.asarray(doc_query))),
                        **summary(m)}
                for label, (int8, f32) in pairs.items()
            }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(format_report(results))


def format_report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", "",
             "| workload | int8 vs its float32 | queries | Spearman min | Spearman mean | top-10 overlap | max abs Δ / spread |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for workload, rows in results["workloads"].items():
        for label, row in rows.items():
            lines.append(f"| {workload} | {label} | {row['queries']} | {row['spearman_min']:.4f} | "
                         f"{row['spearman_mean']:.4f} | {row['top10_overlap_mean']:.2f} | {row['max_rel_delta']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

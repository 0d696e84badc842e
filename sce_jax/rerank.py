"""Re-rank a run with a sparse cross-encoder: `python -m sce_jax.rerank --model M --run INPUT --output RUN`.

INPUT is a JSON/JSONL run with texts (the original's format), a TREC run whose texts come from local files
or an ir_datasets dataset (given, or inferred from the file name), or an ir_datasets id with scoreddocs.
Settings come from a YAML file (`--config`), then from flags; see configs/rerank.yaml and docs/rerank.md.
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import pandas as pd

from sce_jax import irds
from sce_jax.cli_config import add_dataclass_flags, resolve_dataclass
from sce_jax.evaluation import DEFAULT_MEASURES, evaluate, format_results, parse_measures, read_qrels, write_results
from sce_jax.runs import InputError, is_json_run, read_json_run, read_trec_run, select_top, write_trec_run
from sce_jax.texts import TEXT_COLUMNS, complete_texts

logger = logging.getLogger("sce_jax.rerank")


@dataclasses.dataclass
class RerankConfig:
    run: str | None = None
    output: str | None = None
    model: str = "webis/sparse-cross-encoder-4-512"
    depth: int = 100
    batch_size: int = 32
    max_length: int = 512
    max_query_length: int = 32
    max_p: bool = False
    qrels: str | None = None
    measures: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MEASURES))
    dataset: str | None = None
    queries: str | None = None
    docs: str | None = None
    devices: int | None = None
    attention_impl: str = "auto"
    dtype: str = "float32"
    run_tag: str = "sce_jax"
    eval_output: str | None = None


HELP = {
    "run": "input: JSON/JSONL run (optionally .gz), TREC run, or ir_datasets id with scoreddocs",
    "output": "re-ranked TREC run to write",
    "model": "converted sce_jax directory, Hugging Face directory, or hub id",
    "depth": "documents per query taken from the input (by input rank, then score); 0 keeps all",
    "batch_size": "documents per forward pass",
    "max_length": "tokens per query-document input ([CLS] + query + document)",
    "max_query_length": "query wordpieces + 2 [SEP]",
    "max_p": "score over-long documents by their best 50%%-overlapping chunk (MaxP) instead of truncating",
    "qrels": "TREC qrels file for evaluation (default: the dataset's qrels, if any)",
    "measures": "ir_measures measures",
    "dataset": "ir_datasets id for texts and qrels (default: inferred from a TREC run's file name)",
    "queries": "TSV file qid<TAB>text with the query texts",
    "docs": "TSV (docno<TAB>text) or JSONL file with the document texts",
    "devices": "local devices to split documents over (default: all)",
    "attention_impl": "attention implementation: auto (the C++ kernel on CPU, Pallas on GPU), cpu, xla, dense or pallas",
    "dtype": "float32, bfloat16 or int8 (int8 linear layers, docs/int8.md)",
    "run_tag": "tag in the output run's last column",
    "eval_output": "JSON file for the evaluation results (default: OUTPUT.eval.json)",
}


def load_config(path: str | None, overrides: dict) -> RerankConfig:
    """Defaults, then the YAML file's values, then `overrides` (flags)."""
    config = resolve_dataclass(RerankConfig, path, overrides, InputError)
    for name in ("run", "output"):
        if getattr(config, name) is None:
            raise InputError(f"no {name} given (--{name} or '{name}:' in the config)")
    for name in ("depth", "batch_size", "max_length", "max_query_length", "devices"):
        value = getattr(config, name)
        if value is not None and value < (0 if name == "depth" else 1):
            raise InputError(f"{name} must be {'>= 0' if name == 'depth' else 'positive'}, got {value}")
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sce_jax.rerank", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    add_dataclass_flags(parser, RerankConfig, HELP)
    return parser


def load_input(config: RerankConfig) -> tuple[pd.DataFrame, str | None]:
    """The run to re-rank (depth-cut, every text filled in) and the ir_datasets id it belongs to, if any."""
    path = Path(config.run)
    if path.is_file():
        run = read_json_run(path) if is_json_run(path) else read_trec_run(path)
        dataset_id = config.dataset
        texts_missing = any(column not in run or run[column].isna().any() for column in TEXT_COLUMNS)
        local_texts = config.queries is not None and config.docs is not None
        if dataset_id is None and texts_missing and not local_texts:
            dataset_id = irds.infer_dataset_id(path)
    else:
        if not irds.is_dataset_id(config.run):
            raise irds.UnknownDatasetError(f"run {config.run!r} is neither a file nor a known ir_datasets id")
        dataset_id = config.dataset or config.run
        run = irds.dataset_run(config.run)
    if dataset_id is not None:
        irds.load_dataset(dataset_id)
    run = select_top(run, config.depth or None)
    if run.empty:
        raise InputError(f"{config.run}: the run is empty")
    run = complete_texts(run, source=config.run, queries_file=config.queries, docs_file=config.docs,
                         dataset_id=dataset_id)
    return run, dataset_id


def load_qrels(config: RerankConfig, dataset_id: str | None) -> pd.DataFrame | None:
    if config.qrels is not None:
        return read_qrels(config.qrels)
    if dataset_id is not None and irds.load_dataset(dataset_id).has_qrels():
        return irds.dataset_qrels(dataset_id)
    return None


def load_encoder(config: RerankConfig):
    from sce_jax.encoder import SparseCrossEncoder  # imports JAX: only once the input has been checked

    try:
        return SparseCrossEncoder.load(config.model, max_length=config.max_length,
                                       max_query_length=config.max_query_length,
                                       attention_impl=config.attention_impl, dtype=config.dtype,
                                       devices=config.devices)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load model {config.model!r}: {error}") from None


def rerank(config: RerankConfig) -> dict | None:
    """Re-rank, write the run, and evaluate if there are qrels; returns the evaluation results."""
    if not Path(config.output).absolute().parent.is_dir():
        raise InputError(f"output directory {Path(config.output).parent} does not exist")
    measures = parse_measures(config.measures)
    run, dataset_id = load_input(config)
    qrels = load_qrels(config, dataset_id)
    logger.info("re-ranking %d documents of %d queries", len(run), run["qid"].nunique())

    encoder = load_encoder(config)
    reranked = encoder.rerank(run, batch_size=config.batch_size, max_p=config.max_p)
    logger.info("%d distinct batch shapes were compiled", len(encoder.compiled_shapes))
    write_trec_run(config.output, reranked, config.run_tag)
    logger.info("wrote %s", config.output)

    if qrels is None:
        return None
    # The input run is evaluated in its first-stage order (the order `select_top` left it in).
    first_stage = run.assign(score=-run.groupby("qid", sort=False).cumcount().astype(float))
    results = evaluate(qrels, {"input": first_stage, "reranked": reranked}, measures)
    if not results or not any(results.values()):
        logger.warning("none of the run's queries have qrels: nothing to evaluate")
        return None
    print(format_results(results))
    eval_output = config.eval_output or f"{config.output}.eval.json"
    write_results(eval_output, results)
    logger.info("wrote %s", eval_output)
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sce_jax").setLevel(logging.INFO)
    args = vars(build_parser().parse_args(argv))
    try:
        rerank(load_config(args.pop("config", None), args))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

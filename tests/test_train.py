"""Fine-tuning on CPU with a tiny random model: data, configuration, resume, data parallelism, multi-process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sce_jax import train as train_module
from sce_jax.checkpoint import load_model_dir
from sce_jax.errors import run_cli
from sce_jax.train_data import (
    BatchStream,
    DocPairSamples,
    JsonlSamples,
    KDDocPairs,
    TrainDataError,
    prefetched,
    register_kd_docpairs,
    sample_order,
)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "train-tiny.yaml"
TINY_DATA = REPO / "tests" / "data" / "train-tiny.jsonl"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by the in-process runs and the subprocesses (each run rebuilds the jitted
    step, so without it every run would recompile the same program)."""
    directory = str(tmp_path_factory.mktemp("xla-cache"))
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield directory
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def tiny_args(model_dir, output_dir, *extra) -> list[str]:
    # The random 2-layer test model learns visibly in a few steps only at a large learning rate.
    return ["--config", str(TINY_CONFIG), "--model", str(model_dir), "--train-data", str(TINY_DATA),
            "--output-dir", str(output_dir), "--learning-rate", "1e-2", *extra]


def run_in_process(args) -> dict:
    return train_module.train(train_module.resolve_config(train_module.build_parser().parse_args(args)))


def run_subprocess(args, *, env_extra: dict, cache: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "sce_jax.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def final_params(output_dir) -> dict:
    return load_model_dir(output_dir)[1]


def max_difference(a: dict, b: dict) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def step_metrics(output_dir) -> np.ndarray:
    """[steps, 2]: each step's loss and gradient norm from metrics.jsonl."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["loss"], r["grad_norm"]] for r in records])


def assert_same_steps(output_dir, reference_dir, *, params_atol: float) -> None:
    """Two runs took the same steps: every step's loss and gradient norm agree to 1e-5 relative (Adam's update
    all but ignores the gradients' scale: in the parameters a mis-scaled gradient shows only through eps, at
    near-zero gradients), and so do the final parameters."""
    np.testing.assert_allclose(step_metrics(output_dir), step_metrics(reference_dir), rtol=1e-5)
    assert max_difference(final_params(output_dir), final_params(reference_dir)) <= params_atol


@pytest.fixture(scope="module")
def baseline(tiny_hf_dir, tmp_path_factory, compile_cache):
    """4 uninterrupted steps of the tiny config on one device."""
    output_dir = tmp_path_factory.mktemp("baseline") / "out"
    record = run_in_process(tiny_args(tiny_hf_dir, output_dir))
    return output_dir, record


# --- data -------------------------------------------------------------------------------------------------------


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ({"query": "q", "docs": ["a"]}, "line 2: missing field(s) labels"),
        ({"query": "q", "docs": ["a", "b"], "labels": [1.0]}, "line 2: 2 docs but 1 labels"),
        ({"query": "q", "docs": [], "labels": []}, "line 2: docs must be a non-empty list"),
        ({"query": 3, "docs": ["a"], "labels": [1]}, "line 2: query must be a string"),
        ('{"query": "q", "docs": ["a"], "labels": [NaN]}', "line 2: labels must be a list of finite numbers"),
        ("{not json", "line 2: not valid JSON"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "train.jsonl", [{"query": "q", "docs": ["a"], "labels": [1]}, line])
    with pytest.raises(TrainDataError, match=re.escape(f"train.jsonl: {message}")):
        JsonlSamples(path)


def test_jsonl_reads_samples_by_index(tmp_path):
    records = [{"query": f"q{i}", "docs": [f"d{i}"] * (1 + i % 3), "labels": [float(i)] * (1 + i % 3)}
               for i in range(5)]
    path = write_lines(tmp_path / "train.jsonl", [records[0], "", *records[1:]])  # blank lines are skipped
    samples = JsonlSamples(path)
    assert len(samples) == 5 and samples.num_docs == 3
    assert [tuple(samples[i]) for i in (4, 0, 2)] == [tuple(records[i].values()) for i in (4, 0, 2)]
    with pytest.raises(TrainDataError, match="no training samples"):
        JsonlSamples(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_sample_order_is_a_seeded_permutation_per_epoch():
    first = sample_order(7, seed=3, start=0, count=21)
    for epoch in range(3):
        assert sorted(first[7 * epoch : 7 * (epoch + 1)]) == list(range(7))
    assert not np.array_equal(first[:7], first[7:14])
    np.testing.assert_array_equal(sample_order(7, seed=3, start=5, count=10), first[5:15])
    assert not np.array_equal(sample_order(7, seed=4, start=0, count=7), first[:7])


class CharTokenizer:
    """One token per character (ids 1000+), with the QueryDocTokenizer layout, to check batching exactly."""

    def encode_queries(self, queries):
        return [[1000 + ord(c) for c in q][:4] + [102, 102] for q in queries]

    def encode_docs(self, query_tokens, docs):
        return [[1000 + ord(c) for c in d][: 16 - 3 - len(q)] + [102, 102] for q, d in zip(query_tokens, docs)]


def test_batches_split_over_hosts_and_micro_batches(tmp_path):
    records = [{"query": f"q{i}", "docs": ["x" * i, "y"][: 1 + i % 2], "labels": [i, -i][: 1 + i % 2]}
               for i in range(6)]
    samples = JsonlSamples(write_lines(tmp_path / "t.jsonl", records))
    kwargs = dict(batch_size=4, grad_accum=2, max_query_length=8, max_length=16, seed=1)
    whole = BatchStream(samples, CharTokenizer(), **kwargs).batch_at(3)
    order = sample_order(6, seed=1, start=3, count=4)
    assert whole.query_ids.shape == (2, 2, 8) and whole.doc_ids.shape[:2] == (2, 4)
    for a in range(2):
        for row in range(2):
            index = order[2 * a + row]
            assert whole.labels[a, row, 0] == index
            np.testing.assert_array_equal(whole.label_mask[a, row], [True, index % 2 == 1])
            np.testing.assert_array_equal(whole.doc_query[a, 2 * row : 2 * row + 2], [row, row])
            expected_doc = [1000 + ord("x")] * min(index, 9) + [102, 102]
            np.testing.assert_array_equal(whole.doc_ids[a, 2 * row, : len(expected_doc)], expected_doc)
            assert not whole.doc_ids[a, 2 * row + 1].any() or index % 2 == 1  # padding document slot
    # Two hosts: host 1 holds the second half of every micro-batch, pointing at global query rows.
    host = BatchStream(samples, CharTokenizer(), process_index=1, process_count=2, **kwargs).batch_at(3)
    np.testing.assert_array_equal(host.labels, whole.labels[:, 1:])
    np.testing.assert_array_equal(host.doc_query, whole.doc_query[:, 2:])
    np.testing.assert_array_equal(host.doc_ids, whole.doc_ids[:, 2:])  # same padded length as one host


def test_prefetch_hands_over_items_and_errors():
    def produce():
        yield from range(3)
        raise RuntimeError("broken input")

    items = prefetched(produce(), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="broken input"):
        next(items)


def test_ir_datasets_docpairs_with_teacher_scores(tmp_path):
    import ir_datasets
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import TsvDocs, TsvQueries
    from ir_datasets.util import LocalDownload

    (tmp_path / "docs.tsv").write_text("p1\tfirst passage\np2\tsecond passage\np3\tthird passage\n")
    (tmp_path / "queries.tsv").write_text("q1\twhat is first\nq2\twhat is third\n")
    (tmp_path / "kd.tsv").write_text("9.5\t1.25\tq1\tp1\tp2\n7.0\t-3.0\tq2\tp3\tp1\n")
    dataset_id = f"sce-test/{tmp_path.name}"
    ir_datasets.registry.register(dataset_id, Dataset(
        TsvDocs(LocalDownload(tmp_path / "docs.tsv")), TsvQueries(LocalDownload(tmp_path / "queries.tsv")),
        KDDocPairs(LocalDownload(tmp_path / "kd.tsv")),
    ))
    samples = DocPairSamples.from_ir_datasets(dataset_id)
    assert len(samples) == 2 and samples.num_docs == 2
    assert tuple(samples[1]) == ("what is third", ["third passage", "first passage"], [7.0, -3.0])
    with pytest.raises(TrainDataError, match="neither a file nor an ir_datasets id"):
        DocPairSamples.from_ir_datasets("no/such/dataset")


def test_kd_docpairs_is_registered_from_the_teacher_score_file():
    import ir_datasets

    register_kd_docpairs()
    register_kd_docpairs()  # idempotent
    dataset = ir_datasets.load("msmarco-passage/train/kd-docpairs")
    assert isinstance(dataset.docpairs_handler(), KDDocPairs)
    assert dataset.has_docs() and dataset.has_queries() and dataset.has_qrels()


# --- configuration and bad input --------------------------------------------------------------------------------


def test_flags_override_yaml(tmp_path):
    args = train_module.build_parser().parse_args(
        ["--config", str(TINY_CONFIG), "--steps", "9", "--max-grad-norm", "none", "--attention-window", "full",
         "--resume", "--learning-rate", "2e-5"]
    )
    cfg = train_module.resolve_config(args)
    assert (cfg.steps, cfg.max_grad_norm, cfg.resume, cfg.learning_rate) == (9, None, True, 2e-5)
    assert cfg.batch_size == 4  # from the YAML
    assert cfg.model_overrides["attention_window_size"] is None and cfg.model_overrides["doc_cls_attention"]
    recipe = train_module.resolve_config(train_module.build_parser().parse_args(["--config", "configs/train.yaml"]))
    assert (recipe.batch_size, recipe.learning_rate, recipe.warmup_steps, recipe.steps, recipe.save_every) == (
        32, 7e-6, 1000, 100_000, 5000)
    assert recipe.model_overrides["attention_window_size"] == 4 and not recipe.model_overrides["query_doc_attention"]
    assert recipe.loss_reduction == "batch"
    assert (recipe.model_overrides["hidden_dropout_prob"], recipe.model_overrides["attention_probs_dropout_prob"]) == (
        0.1, 0.1)
    attention_only = train_module.resolve_config(train_module.build_parser().parse_args(
        ["--config", "configs/train.yaml", "--dropout", "0.2", "--attention-dropout", "0"]))
    assert (attention_only.model_overrides["hidden_dropout_prob"],
            attention_only.model_overrides["attention_probs_dropout_prob"]) == (0.2, 0.0)


def test_schedules():
    cfg = train_module.TrainConfig(learning_rate=1.0, warmup_steps=4, steps=12)
    constant = train_module.make_schedule(cfg)
    linear = train_module.make_schedule(train_module.TrainConfig(learning_rate=1.0, warmup_steps=4, steps=12,
                                                                 schedule="linear"))
    np.testing.assert_allclose([constant(s) for s in (0, 2, 4, 11)], [0, 0.5, 1, 1])
    np.testing.assert_allclose([linear(s) for s in (0, 2, 4, 8, 12)], [0, 0.5, 1, 0.5, 0])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "hinge"], "unknown loss 'hinge'"),
        (["--batch-size", "6", "--grad-accum", "4"], "batch_size 6 is not divisible by grad_accum 4"),
        (["--devices", "2"], "--devices 2, but this machine has 1 local device"),
        (["--train-data", "EMPTY"], "contains no training samples"),
        (["--train-data", "MISSING_FIELD"], "bad.jsonl: line 1: missing field"),
        (["--loss", "margin-mse", "--train-data", "THREE_DOCS"], "margin-mse needs 2 documents"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--dtype", "int8"], "dtype int8 is for inference only"),
        (["--loss-reduction", "mean"], "unknown loss_reduction 'mean'; choose one of batch, sample"),
        (["--attention-dropout", "1"], "attention_dropout must be in [0, 1), got 1.0"),
    ],
)
def test_bad_input_fails_before_training(tiny_hf_dir, tmp_path, capsys, extra, message):
    files = {
        "EMPTY": write_lines(tmp_path / "empty.jsonl", []),
        "MISSING_FIELD": write_lines(tmp_path / "bad.jsonl", [{"query": "q", "docs": ["a"]}]),
        "THREE_DOCS": write_lines(tmp_path / "three.jsonl",
                                  [{"query": "q", "docs": ["a", "b", "c"], "labels": [1, 0, 0]}]),
    }
    extra = [str(files.get(x, x)) for x in extra]
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_batch_not_divisible_by_devices(tiny_hf_dir, tmp_path, compile_cache):
    process = run_subprocess(tiny_args(tiny_hf_dir, tmp_path / "out", "--batch-size", "3"), cache=compile_cache,
                             env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "batch_size 3 / grad_accum 1 = 3 is not divisible by 2 devices" in output


# --- training ---------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_logs_and_evaluates(tiny_hf_dir, tmp_path, compile_cache):
    """Sixteen steps on the 16-sample file lower the mean MarginMSE over that file (scored without dropout);
    the evaluation on a run of the first 4 samples' pairs matches nDCG@10 computed from the saved model."""
    from sce_jax.encoder import SparseCrossEncoder

    samples = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    eval_run = write_lines(tmp_path / "eval.jsonl", [
        {"qid": f"q{i}", "query": s["query"], "docno": f"d{i}-{j}", "text": doc, "rank": j + 1}
        for i, s in enumerate(samples[:4]) for j, doc in enumerate(s["docs"])
    ])
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("".join(f"q{i} 0 d{i}-0 1\n" for i in range(4)))

    def scores(model_dir, **load_kwargs) -> np.ndarray:
        encoder = SparseCrossEncoder.load(model_dir, max_length=64, max_query_length=8, **load_kwargs)
        return np.array([encoder.score(s["query"], s["docs"]) for s in samples])

    def file_loss(scores_Sx2) -> float:
        labels_Sx2 = np.array([s["labels"] for s in samples])
        return float(np.mean(((scores_Sx2[:, 0] - scores_Sx2[:, 1]) - (labels_Sx2[:, 0] - labels_Sx2[:, 1])) ** 2))

    output_dir = tmp_path / "out"
    run_in_process(tiny_args(tiny_hf_dir, output_dir, "--steps", "16", "--save-every", "16", "--eval-run",
                             str(eval_run), "--eval-qrels", str(qrels), "--eval-every", "8"))
    sparse = {"attention_window_size": 4, **train_module.PATTERNS["sparse"]}  # the tiny config's
    final_scores = scores(output_dir)
    before, after = file_loss(scores(tiny_hf_dir, config_overrides=sparse)), file_loss(final_scores)
    assert after < 0.85 * before, (before, after)

    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert all({"loss", "learning_rate", "steps_per_second"} <= set(r) for r in records)
    # A rate from the first line on (the first includes compilation): positive, finite, no 0.0 placeholder.
    assert all(0 < r["steps_per_second"] < float("inf") for r in records)
    assert [r["learning_rate"] for r in records[:3]] == pytest.approx([0.0, 1e-2, 1e-2])  # 1 warm-up step
    assert [r["step"] for r in records if "eval/nDCG@10" in r] == [8, 16]
    # One relevant document of two: nDCG@10 is 1 when it is ranked first, else 1 / log2(3).
    expected = np.mean([1.0 if s0 > s1 else 1 / np.log2(3) for s0, s1 in final_scores[:4]])
    assert records[-1]["eval/nDCG@10"] == pytest.approx(expected, abs=1e-6)
    saved = (output_dir / "train_config.yaml").read_text()
    assert "steps: 16" in saved and "loss: margin-mse" in saved
    assert json.loads((output_dir / "config.json").read_text())["attention_window_size"] == 4


def test_resume_equals_uninterrupted(baseline, tiny_hf_dir, tmp_path, compile_cache, capsys):
    baseline_dir, _ = baseline
    output_dir = tmp_path / "out"
    run_in_process(tiny_args(tiny_hf_dir, output_dir, "--steps", "2"))
    # Without --resume an existing run is not overwritten; with it, training continues from step 2.
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir)) == 2
    assert "pass --resume" in capsys.readouterr().err
    run_in_process(tiny_args(tiny_hf_dir, output_dir, "--resume"))
    assert max_difference(final_params(output_dir), final_params(baseline_dir)) <= 1e-6
    metrics = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4]
    assert sorted(int(p.name) for p in (output_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]

    # Resuming with another model shape is refused before training.
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir, "--resume", "--attention-window", "3")) == 2
    assert "trains a different model (attention_window_size 4 -> 3)" in capsys.readouterr().err


def test_gradient_accumulation_equals_one_big_batch(tiny_hf_dir, tmp_path, compile_cache):
    no_dropout = ("--dropout", "0", "--steps", "2", "--save-every", "2")
    run_in_process(tiny_args(tiny_hf_dir, tmp_path / "one", *no_dropout))
    run_in_process(tiny_args(tiny_hf_dir, tmp_path / "accum", *no_dropout, "--grad-accum", "2"))
    # Adam's first update moves each weight by about lr * sign(gradient), so near-zero gradients turn the float
    # reduction-order noise of accumulation into differences well above it, yet far below lr (1e-2).
    assert_same_steps(tmp_path / "accum", tmp_path / "one", params_atol=1e-4)


def test_two_devices_equal_one(baseline, tiny_hf_dir, tmp_path, compile_cache):
    output_dir = tmp_path / "out"
    finish(run_subprocess(tiny_args(tiny_hf_dir, output_dir), cache=compile_cache,
                          env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    assert_same_steps(output_dir, baseline[0], params_atol=1e-5)


def test_two_processes_equal_one(baseline, tiny_hf_dir, tmp_path, compile_cache):
    """Two processes on localhost (one CPU device each, gloo collectives) train the same model as one."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    output_dir = tmp_path / "out"
    processes = [
        run_subprocess(tiny_args(tiny_hf_dir, output_dir), cache=compile_cache, env_extra={
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    for process in processes:
        finish(process)
    assert_same_steps(output_dir, baseline[0], params_atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_hf_dir, tmp_path, compile_cache, capsys):
    output_dir = tmp_path / "out"
    code = train_module.main(tiny_args(tiny_hf_dir, output_dir, "--learning-rate", "1e30", "--warmup-steps", "0",
                                       "--max-grad-norm", "none", "--save-every", "1", "--steps", "4"))
    error = capsys.readouterr().err
    assert code == 1 and "stopped. Last good checkpoint: step" in error
    last = int(error.split("Last good checkpoint: step ")[1].split()[0])
    assert last < 4
    params = final_params(output_dir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# --- resume safety, paths, bad data ---------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def baseline_copy(baseline, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(baseline[0], copy)
    return copy


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--seed", "1"], "--seed 0 -> 1"),
        (["--batch-size", "8"], "--batch-size 4 -> 8"),
        (["--grad-accum", "2"], "--grad-accum 1 -> 2"),
        (["--max-length", "32"], "--max-length 64 -> 32"),
        (["--max-query-length", "6"], "--max-query-length 8 -> 6"),
        (["--loss", "ranknet"], "--loss 'margin-mse' -> 'ranknet'"),
        (["--train-data", "OTHER"], "--train-data"),
    ],
)
def test_resume_refuses_a_different_data_stream(baseline_copy, tiny_hf_dir, tmp_path, capsys, extra, named):
    other = tmp_path / "other.jsonl"
    other.write_bytes(TINY_DATA.read_bytes())
    extra = [str(other) if x == "OTHER" else x for x in extra]
    before = snapshot(baseline_copy)
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, baseline_copy, "--resume", "--steps", "6", *extra)) == 2
    error = capsys.readouterr().err
    assert "cannot resume" in error and "(step 4)" in error and named in error, error
    assert snapshot(baseline_copy) == before  # nothing written


def test_resume_refuses_another_process_count():
    current = {"batch_size": 4, "processes": 2}
    train_module.check_stream({"batch_size": 4, "processes": 2}, current, Path("out"), 3)
    with pytest.raises(train_module.ConfigError, match="processes 1 -> 2"):
        train_module.check_stream({"batch_size": 4, "processes": 1}, current, Path("out"), 3)


def test_resume_skips_a_damaged_latest_step_and_a_torn_metrics_line(baseline, baseline_copy, tiny_hf_dir, capsys):
    """The newest step's array files are truncated and an empty step directory lies beyond it: training resumes
    from step 2 and ends with the uninterrupted run's parameters."""
    for data_file in (baseline_copy / "checkpoints" / "4" / "params").rglob("*"):
        if data_file.is_file() and data_file.parent.name == "d":
            data_file.write_bytes(data_file.read_bytes()[:3])
    (baseline_copy / "checkpoints" / "6").mkdir()
    with open(baseline_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, baseline_copy, "--resume")) == 0
    output = capsys.readouterr()
    assert "checkpoints/6 is incomplete" in output.err and "step 4 cannot be restored" in output.err
    assert "dropped 1 unreadable line" in output.err
    assert f"Model saved in {baseline_copy} (step 4)" in output.out
    assert max_difference(final_params(baseline_copy), final_params(baseline[0])) <= 1e-6
    metrics = [json.loads(line)["step"] for line in (baseline_copy / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4]
    names = sorted(p.name for p in (baseline_copy / "checkpoints").iterdir())
    assert "4.incomplete" in names and "6.incomplete" in names and "4" in names


def test_resume_without_config_json_writes_nothing(baseline_copy, tiny_hf_dir, capsys):
    (baseline_copy / "config.json").unlink()
    before = snapshot(baseline_copy)
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, baseline_copy, "--resume", "--steps", "6")) == 2
    assert "has checkpoints but no config.json" in capsys.readouterr().err
    assert snapshot(baseline_copy) == before


def test_relative_and_home_output_dirs(baseline, tiny_hf_dir, tmp_path, monkeypatch, compile_cache):
    """--output-dir relative to the working directory, then resumed as ~/...; the model loads from anywhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_in_process(tiny_args(tiny_hf_dir, "runs/rel", "--steps", "2"))
    assert (elsewhere / "runs" / "rel" / "checkpoints" / "2").is_dir()
    monkeypatch.setenv("HOME", str(elsewhere))
    monkeypatch.chdir(tmp_path)
    run_in_process(tiny_args(tiny_hf_dir, "~/runs/rel", "--resume"))
    assert max_difference(final_params(elsewhere / "runs" / "rel"), final_params(baseline[0])) <= 1e-6
    assert not (tmp_path / "runs").exists() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("case", ["jsonl-bytes", "jsonl-surrogate", "pairs-line", "docs-surrogate", "docs-missing"])
def test_bad_training_data_is_one_line_and_writes_nothing(tiny_hf_dir, tmp_path, capsys, case):
    good_docs = '{"docno": "7", "text": "a passage"}\n{"docno": "8", "text": "another"}\n'
    files = {
        "jsonl-bytes": ("t.jsonl", b'{"query": "q", "docs": ["a", "b"], "labels": [1, 0]}\n'
                                   b'{"query": "q\xe9", "docs": ["a", "b"], "labels": [1, 0]}\n', None),
        "jsonl-surrogate": ("t.jsonl", b'{"query": "q", "docs": ["a", "\\udc00"], "labels": [1, 0]}\n', None),
        "pairs-line": ("p.tsv", b"1\t7\t8\t1.0\t0.5\n1\t7\n", good_docs),
        "docs-surrogate": ("p.tsv", b"1\t7\t8\t1.0\t0.5\n", '{"docno": "7", "text": "x \\ud800"}\n'
                                                              '{"docno": "8", "text": "y"}\n'),
        "docs-missing": ("p.tsv", b"1\t7\t9\t1.0\t0.5\n", good_docs),
    }
    name, content, docs = files[case]
    (tmp_path / name).write_bytes(content)
    extra = ["--train-data", str(tmp_path / name)]
    if docs is not None:
        (tmp_path / "q.tsv").write_text("1\ta query\n")
        (tmp_path / "d.jsonl").write_text(docs)
        extra += ["--queries", str(tmp_path / "q.tsv"), "--docs", str(tmp_path / "d.jsonl")]
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and "Traceback" not in error
    expected = {"jsonl-bytes": "t.jsonl: line 2: not valid UTF-8", "jsonl-surrogate": "t.jsonl: line 1: text is "
                "not valid Unicode", "pairs-line": "p.tsv: line 2: expected 5", "docs-surrogate": "d.jsonl",
                "docs-missing": "1 ids have no text in --docs"}[case]
    assert expected in error, error
    assert not (tmp_path / "out").exists()


def test_local_pairs_train_as_the_same_jsonl(tiny_hf_dir, tmp_path, compile_cache, capsys):
    samples = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    (tmp_path / "q.tsv").write_text("".join(f"{i}\t{s['query']}\n" for i, s in enumerate(samples)))
    (tmp_path / "d.tsv").write_text("".join(f"{2 * i + j}\t{d}\n" for i, s in enumerate(samples)
                                            for j, d in enumerate(s["docs"])))
    (tmp_path / "p.tsv").write_text("".join(f"{i}\t{2 * i}\t{2 * i + 1}\t{s['labels'][0]}\t{s['labels'][1]}\n"
                                            for i, s in enumerate(samples)))
    run_in_process(tiny_args(tiny_hf_dir, tmp_path / "jsonl", "--steps", "2"))
    run_in_process(tiny_args(tiny_hf_dir, tmp_path / "pairs", "--steps", "2", "--train-data", str(tmp_path / "p.tsv"),
                             "--queries", str(tmp_path / "q.tsv"), "--docs", str(tmp_path / "d.tsv")))
    # Labels travel as float32 either way, so the two runs see identical batches.
    assert max_difference(final_params(tmp_path / "pairs"), final_params(tmp_path / "jsonl")) == 0


# --- one run per output directory, the training file's content, interrupted checkpoints, evaluation -------------


def test_a_second_run_on_a_locked_output_dir_refuses_naming_the_first(tiny_hf_dir, tmp_path, capsys):
    """The lock is held (by this process, on another descriptor: `flock` locks conflict between open files)."""
    from sce_jax.files import exclusive_lock

    output_dir = tmp_path / "out"
    with exclusive_lock(Path(f"{output_dir}.lock"), "held"):
        assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir)) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: --output-dir {output_dir} is in use by pid {os.getpid()} on {socket.gethostname()} "
                     f"(lock file {output_dir}.lock); wait for it to finish, or stop it first")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def pair_files_of(samples, directory: Path, *, swap: bool = False) -> list[str]:
    """The samples as pairs + queries + docs files; `swap`: each pair's documents and labels exchanged (the same
    number of lines and bytes, other training data)."""
    (directory / "q.tsv").write_text("".join(f"{i}\t{s['query']}\n" for i, s in enumerate(samples)))
    (directory / "d.tsv").write_text("".join(f"{2 * i + j}\t{d}\n" for i, s in enumerate(samples)
                                             for j, d in enumerate(s["docs"])))
    order = (1, 0) if swap else (0, 1)
    (directory / "p.tsv").write_text("".join(
        f"{i}\t{2 * i + order[0]}\t{2 * i + order[1]}\t{s['labels'][order[0]]}\t{s['labels'][order[1]]}\n"
        for i, s in enumerate(samples)))
    return ["--train-data", str(directory / "p.tsv"), "--queries", str(directory / "q.tsv"), "--docs",
            str(directory / "d.tsv")]


def test_resume_refuses_a_pairs_file_rewritten_with_other_pairs(tiny_hf_dir, tmp_path, compile_cache, capsys):
    samples = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    data = pair_files_of(samples, tmp_path)
    output_dir = tmp_path / "out"
    run_in_process(tiny_args(tiny_hf_dir, output_dir, "--steps", "2", *data))
    size = (tmp_path / "p.tsv").stat().st_size
    pair_files_of(samples, tmp_path, swap=True)
    assert (tmp_path / "p.tsv").stat().st_size == size
    before = snapshot(output_dir)
    capsys.readouterr()
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir, "--resume", *data)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "cannot resume" in error and "(step 2)" in error, error
    assert f"--train-data {tmp_path / 'p.tsv'} has other content ({size} bytes, blake2b" in error, error
    assert snapshot(output_dir) == before


def _unfinished_first_checkpoint(baseline_dir: Path, output_dir: Path) -> None:
    """What a run killed while it wrote its first checkpoint (step 2) leaves: the model files, metrics lines and
    Orbax's temporary directory with part of the step."""
    import shutil

    output_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "train_config.yaml"):
        shutil.copy(baseline_dir / name, output_dir / name)
    (output_dir / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (baseline_dir / "metrics.jsonl").read_text().splitlines()[:2]))
    shutil.copytree(baseline_dir / "checkpoints" / "2" / "params", output_dir / "checkpoints" /
                    "2.orbax-checkpoint-tmp" / "params.orbax-checkpoint-tmp")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_during_its_first_checkpoint_is_relaunched_by_the_same_command(baseline, tiny_hf_dir, tmp_path,
                                                                                    compile_cache, capsys, resume):
    baseline_dir, _ = baseline
    output_dir = tmp_path / "out"
    _unfinished_first_checkpoint(baseline_dir, output_dir)
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir, *(["--resume"] if resume else []))) == 0
    error = capsys.readouterr().err
    assert "holds no complete checkpoint (a run stopped during its first); starting from step 0" in error
    assert f"removed {output_dir / 'checkpoints' / '2.orbax-checkpoint-tmp'}" in error
    assert max_difference(final_params(output_dir), final_params(baseline_dir)) <= 1e-6
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["2", "4"]
    metrics = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4]


def test_a_damaged_only_checkpoint_is_set_aside_and_training_starts_over(baseline, tiny_hf_dir, tmp_path,
                                                                        compile_cache, capsys):
    """A step directory without its arrays' metadata (no complete checkpoint at all): set aside, not a refusal."""
    import shutil

    baseline_dir, _ = baseline
    output_dir = tmp_path / "out"
    _unfinished_first_checkpoint(baseline_dir, output_dir)
    shutil.rmtree(output_dir / "checkpoints" / "2.orbax-checkpoint-tmp")
    shutil.copytree(baseline_dir / "checkpoints" / "2", output_dir / "checkpoints" / "2")
    (output_dir / "checkpoints" / "2" / "opt_state" / "_METADATA").unlink()
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir)) == 0
    assert "checkpoints/2 is incomplete (opt_state/_METADATA missing)" in capsys.readouterr().err
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["2", "2.incomplete", "4"]
    assert max_difference(final_params(output_dir), final_params(baseline_dir)) <= 1e-6


@pytest.mark.parametrize("signum", [2, 15])  # SIGINT, SIGTERM
def test_a_signal_during_a_checkpoint_stops_after_it_is_complete(baseline, tiny_hf_dir, tmp_path, compile_cache,
                                                                 capsys, monkeypatch, signum):
    """The signal arrives while step 2 is being saved: one line, exit 128 + signal, step 2 complete on disk and
    nothing unfinished; the same command with --resume then ends as the uninterrupted run."""
    import signal

    from sce_jax import train_checkpoints

    save = train_checkpoints.CheckpointStore.save

    def save_interrupted(self, state):
        os.kill(os.getpid(), signum)
        save(self, state)

    monkeypatch.setattr(train_checkpoints.CheckpointStore, "save", save_interrupted)
    output_dir = tmp_path / "out"
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir, "--resume")) == 128 + signum
    error = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.startswith("training")]
    assert error == [f"stopped ({signal.Signals(signum).name}): training stopped after step 2; the newest checkpoint: "
                     "step 2 (the same command with --resume continues from it)"], error
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    assert run_cli(train_module.main, tiny_args(tiny_hf_dir, output_dir, "--resume")) == 0
    assert max_difference(final_params(output_dir), final_params(baseline[0])) <= 1e-6


def test_the_evaluator_compiles_once_and_scores_each_evaluations_parameters(tiny_hf_dir, tmp_path, compile_cache):
    """Two evaluations with different parameters: the second traces nothing, and both equal a scorer built from
    scratch with those parameters."""
    from sce_jax.encoder import SparseCrossEncoder, build_model
    from sce_jax.tokenization import QueryDocTokenizer

    samples = [json.loads(line) for line in TINY_DATA.read_text().splitlines()][:4]
    eval_run = write_lines(tmp_path / "eval.jsonl", [
        {"qid": f"q{i}", "query": s["query"], "docno": f"d{i}-{j}", "text": doc, "rank": j + 1}
        for i, s in enumerate(samples) for j, doc in enumerate(s["docs"])])
    (tmp_path / "qrels.txt").write_text("".join(f"q{i} 0 d{i}-0 1\n" for i in range(4)))
    cfg = train_module.resolve_config(train_module.build_parser().parse_args(tiny_args(
        tiny_hf_dir, tmp_path / "out", "--eval-run", str(eval_run), "--eval-qrels", str(tmp_path / "qrels.txt"))))
    config, params, tokenizer_dir = train_module.load_model_dir(cfg.model)
    config = config.replace(**cfg.model_overrides)
    tokenizer = QueryDocTokenizer.from_dir(tokenizer_dir, max_length=cfg.max_length,
                                           max_query_length=cfg.max_query_length)
    evaluator = train_module.Evaluator(cfg, config, tokenizer)
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kwargs: traces.append(event) if "trace" in event else None)
    rng = np.random.default_rng(0)
    for round_ in range(2):
        if round_:
            params = jax.tree.map(lambda x: x + rng.normal(scale=0.3, size=x.shape).astype(x.dtype), params)
        traces.clear()
        got = evaluator(jax.tree.map(jax.numpy.asarray, params))["eval/nDCG@10"]
        if round_:
            assert traces == [], traces
        fresh = SparseCrossEncoder(build_model(config, params), tokenizer)
        scores = [fresh.score(s["query"], s["docs"]) for s in samples]
        expected = np.mean([1.0 if s[0] > s[1] else 1 / np.log2(3) for s in scores])
        assert got == pytest.approx(expected, abs=1e-6)
        np.testing.assert_allclose(evaluator.encoder.score_pairs(evaluator.queries, evaluator.texts,
                                                                 evaluator.doc_query, progress=False),
                                   np.concatenate(scores), atol=1e-5)

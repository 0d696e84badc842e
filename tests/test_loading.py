"""Loading models as a user would: relative paths, bad config.json / weights / settings / texts -> one line and
exit status 2 with nothing written, file modes under the umask, the max_length default, the offline route."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sce_jax import SparseCrossEncoder
from sce_jax.checkpoint import load_model_dir
from sce_jax.convert import main as convert_main
from sce_jax.errors import InputError, SettingsError, run_cli
from sce_jax.tokenization import QueryDocTokenizer, TextError

REPO = Path(__file__).resolve().parents[1]
DOCS = ["the cat sat on the mat", "a dog", "telescopes see far into space and time " * 3]


def convert(*args) -> int:
    return run_cli(convert_main, [str(a) for a in args])


def one_error_line(capsys) -> str:
    """The command's stderr, which must be exactly one `error: ...` line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def assert_trees_equal(a, b):
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "sce"
    assert convert(tiny_hf_dir, out) == 0
    return out


# --- 1. relative paths and ~ ---------------------------------------------------------------------------------

def test_relative_paths_from_another_working_directory(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """Convert, load, export and re-rank with paths relative to a working directory that is not the repository's."""
    work = tmp_path / "work"
    shutil.copytree(tiny_hf_dir, work / "hf")
    monkeypatch.chdir(work)
    assert convert("hf", "models/x") == 0, capsys.readouterr().err
    assert (work / "models" / "x" / "params").is_dir()
    _, expected, _ = load_model_dir(tiny_hf_dir)
    assert convert("--export", "models/x", "exported/x") == 0
    for relative in ("models/x", "./models/x", "exported/x"):
        _, params, directory = load_model_dir(relative)
        assert directory == work / relative.removeprefix("./")
        assert_trees_equal(params, expected)
        assert SparseCrossEncoder.load(relative).config.hidden_size == 32

    from sce_jax.rerank import main as rerank_main

    lines = (REPO / "examples" / "run.jsonl").read_text().splitlines()[:3]  # few documents: few compilations
    (work / "run.jsonl").write_text("\n".join(lines) + "\n")
    assert rerank_main(["--model", "models/x", "--run", "run.jsonl", "--output", "out.run", "--max-length", "64",
                        "--max-query-length", "16", "--batch-size", "8"]) == 0
    assert len((work / "out.run").read_text().splitlines()) == 3


def test_home_directory_is_expanded(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert convert(tiny_hf_dir, "~/models/x") == 0
    assert (tmp_path / "models" / "x" / "config.json").exists()
    assert not Path("~").exists()
    assert SparseCrossEncoder.load("~/models/x").config.hidden_size == 32


# --- 3. bad config.json ----------------------------------------------------------------------------------------

def _with_config(tiny_hf_dir, directory: Path, change) -> Path:
    shutil.copytree(tiny_hf_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    text = change(config)
    (directory / "config.json").write_bytes(text if isinstance(text, bytes) else json.dumps(text).encode())
    return directory


BAD_CONFIGS = {
    "a list": (lambda c: [c], "expected a JSON object of settings, got list"),
    "string sizes": (lambda c: {**c, "hidden_size": "32"}, "field hidden_size: must be a positive integer, got '32'"),
    "zero heads": (lambda c: {**c, "num_attention_heads": 0}, "field num_attention_heads: must be a positive integer"),
    "heads not dividing": (lambda c: {**c, "num_attention_heads": 5}, "field num_attention_heads: 5 does not divide"),
    "float layers": (lambda c: {**c, "num_hidden_layers": 2.5}, "field num_hidden_layers: must be a positive integer"),
    "bool size": (lambda c: {**c, "intermediate_size": True}, "field intermediate_size: must be a positive integer"),
    "string eps": (lambda c: {**c, "layer_norm_eps": "1e-12"}, "field layer_norm_eps: must be a number"),
    "numeric flag": (lambda c: {**c, "query_doc_attention": 1}, "field query_doc_attention: must be true or false"),
    "window 0": (lambda c: {**c, "attention_window_size": 0}, "field attention_window_size: must be an integer >= 1"),
    "pad id outside vocab": (lambda c: {**c, "pad_token_id": 40000}, "field pad_token_id: must be a token id"),
    "two labels": (lambda c: {**c, "id2label": {"0": "a", "1": "b"}}, "field id2label: a re-ranker needs a single"),
    "one token type": (lambda c: {**c, "type_vocab_size": 1}, "field type_vocab_size: must be >= 2"),
    "labels not a map": (lambda c: {**c, "id2label": ["a"]}, "field id2label: expected an object"),
    "not JSON": (lambda c: b'{"hidden_size": 32,\n', "line 2: not valid JSON"),
    "not UTF-8": (lambda c: b'{"model_type": "\xff"}', "not UTF-8 text"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_json_is_one_line_naming_file_and_field(tiny_hf_dir, tmp_path, capsys, name):
    change, message = BAD_CONFIGS[name]
    source = _with_config(tiny_hf_dir, tmp_path / "bad", change)
    assert convert(source, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{source / 'config.json'}: " in line and message in line, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="config.json"):
        SparseCrossEncoder.load(source)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tiny_hf_dir, tmp_path):
    source = _with_config(tiny_hf_dir, tmp_path / "small", lambda c: {**c, "vocab_size": 1000})
    with pytest.raises(InputError, match="the tokenizer has 30522 tokens, but config.json's vocab_size is 1000"):
        SparseCrossEncoder.load(source)


# --- 3. truncated / unreadable weights and mismatches -----------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_safetensors_is_one_line(tiny_hf_dir, tmp_path, capsys):
    source = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, source)
    _truncate(source / "model.safetensors")
    assert convert(source, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{source / 'model.safetensors'}: cannot read the weights" in line and "truncated" in line
    assert not (tmp_path / "out").exists()


def _bin_copy(hf_dir, directory):
    import torch
    from safetensors.numpy import load_file

    shutil.copytree(hf_dir, directory, ignore=shutil.ignore_patterns("model.safetensors"))
    state = {k: torch.from_numpy(v) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_pytorch_bin_is_one_line(tiny_hf_dir, tmp_path, capsys, keep):
    source = _bin_copy(tiny_hf_dir, tmp_path / "bin")
    _truncate(source / "pytorch_model.bin", keep)
    assert convert(source, tmp_path / "out") == 2
    assert f"{source / 'pytorch_model.bin'}: cannot read the weights" in one_error_line(capsys)


def test_code_running_pickle_is_refused_in_one_line(tiny_hf_dir, tmp_path, capsys):
    import pickle

    source = tmp_path / "bin"
    shutil.copytree(tiny_hf_dir, source, ignore=shutil.ignore_patterns("model.safetensors"))

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    import torch

    torch.save({"x": Exploit()}, source / "pytorch_model.bin", pickle_module=pickle)
    assert convert(source, tmp_path / "out") == 2
    assert "pytorch_model.bin: cannot read the weights" in one_error_line(capsys)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("which", ["largest", "manifest.ocdbt", "_METADATA", "_CHECKPOINT_METADATA"])
def test_truncated_orbax_files_are_one_line(converted, tmp_path, capfd, which):
    """Also no tracebacks from Orbax's worker threads or absl log lines (capfd sees all of stderr)."""
    copy = tmp_path / "sce"
    shutil.copytree(converted, copy)
    files = [p for p in (copy / "params").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size) if which == "largest" else copy / "params" / which
    _truncate(target, 0.3)
    assert convert(copy, tmp_path / "out") == 2
    line = one_error_line(capfd)
    assert f"{copy / 'params'}" in line and ("truncated" in line or "corrupt" in line) and len(line) < 500, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="truncated"):
        SparseCrossEncoder.load(copy)


def test_truncated_orbax_manifest_in_a_fresh_process_is_one_line(converted, tmp_path):
    """In a process of its own (as a user runs it), a truncated manifest used to print ~190 lines of tracebacks
    from Orbax's worker threads at exit, after the error line."""
    copy = tmp_path / "sce"
    shutil.copytree(converted, copy)
    _truncate(copy / "params" / "manifest.ocdbt", 0.3)
    done = subprocess.run([sys.executable, "-m", "sce_jax.convert", str(copy), str(tmp_path / "out")],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: All log messages before")]
    assert done.returncode == 2 and len(lines) == 1 and "manifest.ocdbt" in lines[0], done.stderr[-3000:]


def test_without_torch_loading_and_scoring_print_nothing_but_real_warnings(converted, tmp_path):
    """Where torch is not installed, transformers advises so on import ("PyTorch was not found..."): sce_jax needs
    torch only for .bin checkpoints, so importing sce_jax first silences that one advisory, and nothing else."""
    no_torch = ("import importlib.util, logging, sys; real = importlib.util.find_spec; "
                "importlib.util.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' else real(n, *a, **k)\n")
    use_sce = ("import sce_jax; sce_jax.SparseCrossEncoder.load(sys.argv[1], max_length=64).score('q', ['d'])\n"
               # Loading a converted model and scoring need neither (their imports cost seconds of start-up).
               "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'imported'\n")
    warn = "import transformers; logging.getLogger('transformers').warning('another warning')\n"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRANSFORMERS_VERBOSITY", None)
    for script, advisory in ((no_torch + use_sce + warn, False), (no_torch + warn, True)):
        done = subprocess.run([sys.executable, "-c", script, str(converted)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        # Only the warning logged on purpose (transformers may print it through its handler and the root's).
        lines = done.stderr.strip().splitlines()
        assert "another warning" in done.stderr, done.stderr
        assert all("another warning" in line or "PyTorch was not found" in line for line in lines), done.stderr
        assert ("PyTorch was not found" in done.stderr) == advisory, done.stderr


def test_a_training_output_loads_without_absl_warnings(converted, tmp_path, caplog):
    """A training output directory (config, tokenizer, an Orbax CheckpointManager step with a `params` item, as
    sce_jax.train writes it) loads with the converted directory's parameters and nothing logged at WARNING."""
    import logging

    import orbax.checkpoint as ocp

    config, params, _ = load_model_dir(converted)
    out = tmp_path / "trained"
    out.mkdir()
    for name in os.listdir(converted):
        if name != "params":
            shutil.copy(converted / name, out / name)
    with ocp.CheckpointManager(out / "checkpoints", item_names=("params",)) as manager:
        manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    with caplog.at_level(logging.WARNING):
        _, restored, _ = load_model_dir(out)
    assert_trees_equal(restored, params)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_orbax_params_not_matching_config_is_summarised(converted, tmp_path, capsys):
    copy = tmp_path / "sce"
    shutil.copytree(converted, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    assert convert(copy, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "parameters do not match config.json: 6 tensors differ, first: layers.0.intermediate.bias stored (64,) " \
           "expected (48,)" in line, line
    assert len(line) < 400


def test_hf_weights_not_matching_config_is_one_line(tiny_hf_dir, tmp_path, capsys):
    source = _with_config(tiny_hf_dir, tmp_path / "hf", lambda c: {**c, "num_hidden_layers": 12})
    assert convert(source, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "does not match its config.json: 160 missing tensors: bert.encoder.layer.10.attention.output.LayerNorm.bias" \
           in line and "and 157 more" in line, line
    assert len(line) < 500


@pytest.fixture(scope="module")
def bare_bert_dir(tmp_path_factory, minilm_dir):
    """A tiny BertModel (an encoder without classifier, like sentence-transformers models), MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(3)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    directory = tmp_path_factory.mktemp("bare") / "bert"
    BertModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(directory)
    return directory


def test_bare_bert_model_says_it_is_no_cross_encoder(bare_bert_dir, tmp_path, capsys):
    assert convert(bare_bert_dir, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "bare BERT encoder (BertModel, no classifier), not a sequence-classification cross-encoder" in line
    assert "--add-untrained-head" in line and "bert.embeddings" not in line
    assert not (tmp_path / "out").exists()


def test_untrained_head_keeps_the_encoder_and_runs(bare_bert_dir, tmp_path, capsys):
    import torch
    from transformers import BertModel

    assert convert(bare_bert_dir, tmp_path / "sce", "--add-untrained-head") == 0
    assert "UNTRAINED" in capsys.readouterr().out
    encoder = SparseCrossEncoder.load(tmp_path / "sce")
    scores = encoder.score("cat on a mat", DOCS)
    assert np.isfinite(scores).all() and len(set(scores.tolist())) == len(DOCS)
    # The encoder is the BertModel's: the pooled [CLS] state through the head equals our score.
    bert = BertModel.from_pretrained(str(bare_bert_dir)).eval()
    _, params, _ = load_model_dir(tmp_path / "sce")
    np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                  bert.embeddings.word_embeddings.weight.detach().numpy())
    q = encoder.tokenizer.encode_queries(["cat on a mat"])[0]
    (d,) = encoder.tokenizer.encode_docs([q], [DOCS[0]])
    ids = torch.tensor([[encoder.tokenizer.cls_token_id, *q, *d]])
    types = torch.tensor([[0] * (1 + len(q)) + [1] * len(d)])
    with torch.no_grad():
        pooled = bert(input_ids=ids, token_type_ids=types).pooler_output[0].numpy()
    head = params["classifier"]
    assert abs(float(pooled @ head["kernel"][:, 0] + head["bias"][0]) - float(scores[0])) < 1e-5
    # A model with a classifier gets no second one.
    capsys.readouterr()
    assert convert(tmp_path / "sce", tmp_path / "again", "--add-untrained-head") == 2
    assert "has a classifier" in one_error_line(capsys)


@pytest.mark.slow
def test_offline_route_from_the_packaged_minilm(minilm_dir, tmp_path):
    """The README's offline route, as a user types it: python -m sce_jax.convert, then load and score."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "sce_jax.convert", str(minilm_dir), "minilm-untrained",
                           "--add-untrained-head"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "UNTRAINED" in done.stdout
    encoder = SparseCrossEncoder.load(tmp_path / "minilm-untrained")
    assert encoder.tokenizer.max_length == 512
    assert np.isfinite(encoder.score("cat", DOCS)).all()


def test_python_dash_m_convert_reports_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "sce_jax.convert", "no/such-model-here", str(tmp_path / "out")],
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'no/such-model-here'"), done.stderr
    # convert takes the model as its first argument (it has no --model); HF_HUB_OFFLINE is already set.
    assert "local model directory in its place" in lines[0] and "sce_jax.convert" in lines[0]
    assert "--model" not in lines[0] and "HF_HUB_OFFLINE is set" in lines[0] and "set HF_HUB_OFFLINE=1" not in lines[0]
    wrapper = subprocess.run([sys.executable, str(REPO / "convert_torch_checkpoint.py"), "--help"], env=env,
                             capture_output=True, text=True)
    assert wrapper.returncode == 0 and "--add-untrained-head" in wrapper.stdout


def test_offline_hint_suggests_hf_hub_offline_only_where_it_is_not_set(monkeypatch):
    from huggingface_hub import constants

    from sce_jax.checkpoint import offline_hint

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "set HF_HUB_OFFLINE=1 to use models already in the Hugging Face cache" in offline_hint()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in offline_hint() and "set HF_HUB_OFFLINE=1" not in offline_hint()


# --- 3. converter output ----------------------------------------------------------------------------------------

def test_output_that_is_a_file_is_refused_untouched(tiny_hf_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    for args in ([tiny_hf_dir, target], ["--export", tiny_hf_dir, target], [tiny_hf_dir, target / "sub"]):
        assert convert(*args) == 2
        assert str(target) in one_error_line(capsys)
    assert target.read_text() == "keep me"
    assert tree(tmp_path) == ["taken"]


def test_output_in_a_read_only_directory_is_refused(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root may write anyway: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    try:
        for output in (locked / "out", locked / "deeper" / "out"):
            assert convert(tiny_hf_dir, output) == 2
            assert f"directory {locked} is not writable" in one_error_line(capsys)
        assert tree(locked) == []
    finally:
        locked.chmod(0o755)


def test_missing_parent_directories_are_created_and_removed_on_failure(tiny_hf_dir, converted, tmp_path, capsys):
    assert convert(tiny_hf_dir, tmp_path / "a" / "b" / "out") == 0
    assert (tmp_path / "a" / "b" / "out" / "config.json").exists()
    # A failure while writing leaves no directories behind.
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    _truncate(max((p for p in (broken / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size))
    assert convert("--export", broken, tmp_path / "c" / "d" / "out") == 2
    one_error_line(capsys)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("export", [False, True])
def test_full_disk_while_converting_is_one_line_and_leaves_nothing(tiny_hf_dir, converted, small_fs, capfd, export):
    """Orbax's writer threads failed with 316 lines of tracebacks; safetensors with a traceback."""
    disk = small_fs.mount(1500)  # the tokenizer files fit, the weights do not
    assert convert(*(["--export", converted] if export else [tiny_hf_dir]), disk / "out") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write {disk / 'out'}: No space left on device (nothing was left behind)"]
    assert tree(disk) == []


def test_a_writer_threads_late_callback_on_a_closed_loop_is_not_printed_and_other_errors_are(capfd, monkeypatch):
    """On a full disk an Orbax writer thread handed its failure to the checkpointer's already closed asyncio loop;
    the command printed that thread's traceback after its one error line."""
    import asyncio
    import gc

    from sce_jax import errors

    loop = asyncio.new_event_loop()
    loop.close()

    class Late:  # raises where Python can only hand the error to sys.unraisablehook
        def __del__(self):
            loop.call_soon_threadsafe(print)

    class Other:
        def __del__(self):
            raise RuntimeError("Event loop is closed")  # the same words from anywhere else: printed

    monkeypatch.setattr(sys, "unraisablehook", errors._redeliver_interrupts)
    Late(), Other()
    gc.collect()
    err = capfd.readouterr().err
    assert err.count("RuntimeError: Event loop is closed") == 1 and "call_soon_threadsafe" not in err, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_converting_leaves_no_staging_directory(tiny_hf_dir, tmp_path, signum):
    """SIGTERM left a hidden staging directory; SIGINT during Orbax's write printed two tracebacks and left it."""
    script = (
        "import os, sys\n"
        "from sce_jax import checkpoint\n"
        "from sce_jax.convert import cli\n"
        "copy = checkpoint.copy_tokenizer_files\n"
        f"checkpoint.copy_tokenizer_files = lambda *a: (copy(*a), os.kill(os.getpid(), {int(signum)}))\n"
        f"sys.argv = ['sce-jax-convert', {str(tiny_hf_dir)!r}, {str(tmp_path / 'out')!r}]\n"
        "cli()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert done.stderr.strip().splitlines() == [f"stopped ({name}): {tmp_path / 'out'} was not written (its partial "
                                                "directory was removed)"]
    assert tree(tmp_path) == []
    # A killed conversion's staging directory (its lock gone with it) is removed by the next conversion.
    (tmp_path / ".out.abcd1234.partial" / "params").mkdir(parents=True)
    assert convert(tiny_hf_dir, tmp_path / "out") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- 8. file modes follow the umask ----------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_model_directories_follow_the_umask(tiny_hf_dir, converted, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert convert(tiny_hf_dir, tmp_path / "sce") == 0
        assert convert("--export", converted, tmp_path / "hf") == 0
    finally:
        os.umask(old)
    for directory in (tmp_path / "sce", tmp_path / "hf"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask, directory
        for path in directory.rglob("*"):
            expected = (0o777 if path.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(path.stat().st_mode) == expected, path


# --- 5. settings errors name the setting; 10. max_length defaults to the model's positions -----------------------

@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, minilm_dir):
    """A tiny cross-encoder with 4096 positions, like webis/sparse-cross-encoder-4-4096."""
    import torch
    from conftest import _save_hf_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(4)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=4096, num_labels=1, initializer_range=0.2)
    return _save_hf_model(BertForSequenceClassification(config), minilm_dir, tmp_path_factory.mktemp("long") / "hf")


def test_max_length_defaults_to_the_models_positions(long_model_dir, tiny_hf_dir):
    assert SparseCrossEncoder.load(long_model_dir).tokenizer.max_length == 4096
    assert SparseCrossEncoder.load(tiny_hf_dir).tokenizer.max_length == 128
    assert SparseCrossEncoder.load(long_model_dir, max_length=1000).tokenizer.max_length == 1000
    # A long document is no longer cut at 512 tokens: its score changes with tokens beyond 512.
    encoder = SparseCrossEncoder.load(long_model_dir)
    base = "word " * 700
    a, b = encoder.score("q", [base + "alpha beta", base + "gamma delta"])
    assert a != b


@pytest.mark.parametrize("kwargs, setting, message", [
    ({"max_length": 5000}, "max_length", "max_length 5000 exceeds the model's 4096 positions"),
    ({"max_length": "512"}, "max_length", "max_length must be an integer >= 8, got '512'"),
    ({"max_length": 0}, "max_length", "max_length must be an integer >= 8, got 0"),
    ({"max_length": 30, "max_query_length": 32}, "max_length", "leaves no room for documents"),
    ({"max_query_length": 2}, "max_query_length", "max_query_length must be an integer >= 3"),
    ({"dtype": "float16"}, "dtype", "unknown dtype 'float16'; choose one of float32, tf32, bfloat16"),
    ({"attention_impl": "flash"}, "attention_impl", "unknown attention_impl 'flash'"),
    ({"devices": 99}, "devices", "devices=99, but this machine has"),
    ({"devices": 0}, "devices", "devices=0"),
    ({"config_overrides": {"window": 3}}, "config_overrides", "unknown config field(s) window"),
    ({"config_overrides": {"attention_window_size": 0}}, "config_overrides", "attention_window_size: must be"),
])
def test_bad_settings_are_settings_errors_naming_the_setting(long_model_dir, kwargs, setting, message):
    with pytest.raises(SettingsError) as info:
        SparseCrossEncoder.load(long_model_dir, **kwargs)
    assert info.value.setting == setting
    assert message in str(info.value)


def test_settings_are_checked_before_the_weights_are_read(tiny_hf_dir, tmp_path):
    source = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, source)
    _truncate(source / "model.safetensors")
    with pytest.raises(SettingsError, match="max_length 512 exceeds"):
        SparseCrossEncoder.load(source, max_length=512)
    with pytest.raises(SettingsError, match="dtype"):
        SparseCrossEncoder.load(source, dtype="half")


# --- 3. texts the tokenizer cannot take; 5. no "indexing errors" warning -----------------------------------------

def test_unencodable_text_names_which_text(tiny_hf_dir):
    tokenizer = QueryDocTokenizer.from_dir(tiny_hf_dir, max_length=64)
    for bad in ("caf\ud83d", None, 1.5):
        with pytest.raises(TextError) as info:
            tokenizer.encode_queries(["fine", "also fine", bad])
        assert info.value.index == 2 and str(info.value).startswith("text 2: ")
    with pytest.raises(TextError, match=r"text 1: not valid Unicode \(surrogates not allowed '\\ud83d' at character 3"):
        tokenizer.encode_docs([[5, 6]] * 2, ["ok", "abc\ud83d"])
    encoder = SparseCrossEncoder.load(tiny_hf_dir, max_length=64)
    with pytest.raises(InputError, match="text 0"):
        encoder.score("query", ["\udcff"])


def test_no_sequence_length_warning_for_long_texts(tiny_hf_dir):
    """transformers warns of "indexing errors" for texts longer than the model; we truncate them ourselves."""
    import logging

    import transformers

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")  # transformers' loggers report here (and do not propagate)
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    library_logger.addHandler(handler)
    try:
        tokenizer = QueryDocTokenizer.from_dir(tiny_hf_dir, max_length=64)
        (q,) = tokenizer.encode_queries(["query " * 600])
        (d,) = tokenizer.encode_docs([q], ["word " * 1000])
        # What transformers says to a plain call (a fresh tokenizer: each warns once), so the check would see it.
        transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir))(["word " * 1000])
    finally:
        library_logger.removeHandler(handler)
        transformers.logging.set_verbosity(previous)
    assert len(q) == 32 and len(d) == 64 - 1 - len(q)
    messages = [record.getMessage() for record in records]
    assert len(messages) == 1 and "longer than the specified maximum" in messages[0], messages


def test_corrupt_tokenizer_is_one_line(tiny_hf_dir, tmp_path):
    source = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, source)
    (source / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot load the tokenizer"):
        QueryDocTokenizer.from_dir(source)
    with pytest.raises(InputError, match="no tokenizer files"):
        QueryDocTokenizer.from_dir(tmp_path)


def test_the_commands_loader_names_the_flag_of_a_rejected_setting(tiny_sparse_dir):
    from sce_jax.encoder import load_for_command

    with pytest.raises(InputError, match=r"^--max-length: max_length 9999 exceeds the model's \d+ positions"):
        load_for_command(tiny_sparse_dir, max_length=9999)
    with pytest.raises(InputError, match=r"^--attention-impl: "):
        load_for_command(tiny_sparse_dir, attention_impl="flash")

"""Converter and exporter round trips on a tiny random BERT, and their error messages."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sce_jax import SparseCrossEncoder
from sce_jax.checkpoint import load_model_dir
from sce_jax.convert import main
from sce_jax.errors import run_cli
from sce_jax.weights import CheckpointError, extend_position_embeddings, read_hf_state_dict

DOCS = ["the cat sat on the mat", "a dog", "telescopes see far into space and time " * 3]


def convert_main(argv: list[str]) -> int:
    """The command as its console script runs it: bad input is one line and exit status 2."""
    return run_cli(main, argv)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "sce"
    assert convert_main([str(tiny_hf_dir), str(out)]) == 0
    return out


def _bin_copy(hf_dir, directory):
    """The same model as a pytorch_model.bin pickle (what older hub checkpoints hold)."""
    import torch

    shutil.copytree(hf_dir, directory, ignore=shutil.ignore_patterns("model.safetensors"))
    state = {k: torch.from_numpy(v) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_bin_and_safetensors_give_the_same_model(tiny_hf_dir, tmp_path):
    bin_dir = _bin_copy(tiny_hf_dir, tmp_path / "bin")
    _, from_bin, _ = load_model_dir(bin_dir)
    _, from_safetensors, _ = load_model_dir(tiny_hf_dir)
    _assert_trees_equal(from_bin, from_safetensors)


def test_bin_without_torch_says_what_to_install(tiny_hf_dir, tmp_path, monkeypatch):
    bin_dir = _bin_copy(tiny_hf_dir, tmp_path / "bin")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="needs torch"):
        read_hf_state_dict(bin_dir)


def test_converted_directory_scores_like_the_hf_directory(tiny_hf_dir, converted):
    assert sorted(p.name for p in converted.iterdir()) >= ["config.json", "params", "tokenizer.json"]
    from_hf = SparseCrossEncoder.load(tiny_hf_dir, max_length=128).score("cat on a mat", DOCS)
    from_converted = SparseCrossEncoder.load(converted, max_length=128).score("cat on a mat", DOCS)
    np.testing.assert_array_equal(from_hf, from_converted)


def test_export_then_reimport_is_the_identity(tiny_hf_dir, converted, tmp_path):
    exported = tmp_path / "exported"
    assert convert_main(["--export", str(converted), str(exported)]) == 0
    original = {k: v for k, v in load_file(str(tiny_hf_dir / "model.safetensors")).items() if "position_ids" not in k}
    again = load_file(str(exported / "model.safetensors"))
    assert sorted(original) == sorted(again)
    for key in original:
        np.testing.assert_array_equal(original[key], again[key], err_msg=key)
    _, params, _ = load_model_dir(converted)
    _, reimported, _ = load_model_dir(exported)
    _assert_trees_equal(params, reimported)


def test_export_loads_in_transformers_and_scores_the_same(tiny_hf_dir, converted, tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    exported = tmp_path / "exported"
    assert convert_main(["--export", str(converted), str(exported)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "[CLS] query [SEP] [SEP] document [SEP] [SEP]" in notes[0]  # full attention
    original = BertForSequenceClassification.from_pretrained(str(tiny_hf_dir)).eval()
    reloaded = BertForSequenceClassification.from_pretrained(str(exported)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    tokens = tokenizer(["cat", "a dog on a mat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_array_equal(original(**tokens).logits.numpy(), reloaded(**tokens).logits.numpy())


def test_exported_scores_need_sce_jax_input_layout(tiny_sparse_dir, tmp_path):
    """What the export note says, on a model with O(1) logits made full attention: BertForSequenceClassification
    gives sce_jax's score for [CLS] q [SEP] [SEP] d [SEP] [SEP], not for the tokenizer's pair encoding."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    full = ["--attention-window", "none", "--query-cls-attention", "--query-doc-attention"]
    assert convert_main([str(tiny_sparse_dir), str(tmp_path / "full"), *full]) == 0
    assert convert_main(["--export", str(tmp_path / "full"), str(tmp_path / "exported")]) == 0
    model = BertForSequenceClassification.from_pretrained(str(tmp_path / "exported")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
    query, doc = "cat on a mat", DOCS[2]
    expected = SparseCrossEncoder.load(tmp_path / "full", max_length=128).score(query, [doc])[0]
    q, d = (tokenizer(text, add_special_tokens=False)["input_ids"] + [102, 102] for text in (query, doc))
    layout = {"input_ids": torch.tensor([[101] + q + d]), "token_type_ids": torch.tensor([[0] * (1 + len(q)) + [1] * len(d)])}
    with torch.no_grad():
        assert model(**layout).logits.item() == pytest.approx(expected, abs=1e-5)
        assert abs(model(**tokenizer(query, doc, return_tensors="pt")).logits.item() - expected) > 1e-3


def test_sparse_override_and_config_fields(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "sparse"
    assert convert_main([str(tiny_hf_dir), str(out), "--sparse", "--attention-window", "2", "--query-doc-attention"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["attention_window_size"] == 2
    assert config["query_doc_attention"] is True and config["query_cls_attention"] is False
    assert config["architectures"] == ["ListformerModelForSequenceClassification"]
    assert "window 2" in capsys.readouterr().out
    assert convert_main(["--export", str(out), str(tmp_path / "exported")]) == 0
    assert "loads it as FULL attention" in capsys.readouterr().out  # a sparse export says so


def _corrupted_copy(tiny_hf_dir, tmp_path, change):
    directory = tmp_path / "corrupt"
    shutil.copytree(tiny_hf_dir, directory)
    state = load_file(str(directory / "model.safetensors"))
    change(state)
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_missing_tensor_is_named(tiny_hf_dir, tmp_path, capsys):
    directory = _corrupted_copy(tiny_hf_dir, tmp_path, lambda s: s.pop("bert.encoder.layer.1.output.dense.bias"))
    assert convert_main([str(directory), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "1 missing tensors: bert.encoder.layer.1.output.dense.bias" in err
    assert not (tmp_path / "out").exists()


def test_misshaped_and_unexpected_tensors_are_named(tiny_hf_dir, tmp_path):
    def change(state):
        state["bert.pooler.dense.weight"] = state["bert.pooler.dense.weight"][:, :16].copy()
        state["lm_head.weight"] = np.zeros((2, 2), np.float32)

    directory = _corrupted_copy(tiny_hf_dir, tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        load_model_dir(directory)
    assert "1 wrong shapes: bert.pooler.dense.weight (32, 16) (expected (32, 32))" in str(info.value)
    assert "1 unexpected tensors: lm_head.weight" in str(info.value)


def test_unknown_source_and_existing_output(tiny_hf_dir, converted, capsys):
    assert convert_main(["nobody/no-such-model", "/tmp/never-written"]) == 2
    assert not Path("/tmp/never-written").exists()
    assert "nobody/no-such-model" in capsys.readouterr().err
    assert convert_main([str(tiny_hf_dir), str(converted)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_position_extension_interpolates_linearly(tiny_hf_dir, tmp_path):
    table = np.arange(8, dtype=np.float32)[:, None] * np.array([[1.0, -2.0]], np.float32)
    extended = extend_position_embeddings(table, 15)
    # Rows land at 0, 0.5, 1, ..., 7 of the old table.
    np.testing.assert_allclose(extended[:, 0], np.arange(15) / 2)
    np.testing.assert_allclose(extended[:, 1], -np.arange(15))
    prefix = extend_position_embeddings(table, 9, trained_length=5)  # rows 0..4 stretched onto 9
    np.testing.assert_allclose(prefix[:, 0], np.arange(9) / 2)

    out = tmp_path / "long"
    assert convert_main([str(tiny_hf_dir), str(out), "--extend-positions", "256"]) == 0
    encoder = SparseCrossEncoder.load(out, max_length=256)
    assert encoder.config.max_position_embeddings == 256
    assert np.isfinite(encoder.score("cat", ["the cat " * 100])).all()


def test_hub_id_loads_from_the_local_hub_cache(tiny_hf_dir, tmp_path, monkeypatch):
    """The hub code path, offline: a model already in the Hugging Face cache loads by its id."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--webis--tiny-test" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_hf_dir, snapshot)
    (tmp_path / "models--webis--tiny-test" / "refs").mkdir()
    (tmp_path / "models--webis--tiny-test" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _, params, directory = load_model_dir("webis/tiny-test")
    assert directory == snapshot
    _, expected, _ = load_model_dir(tiny_hf_dir)
    _assert_trees_equal(params, expected)

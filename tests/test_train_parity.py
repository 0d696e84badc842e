"""A training step against independent references: one-step gradients against Hugging Face's
`BertForSequenceClassification` in torch (full attention) and against finite differences of the float64 numpy
model (tests/dense_reference.py, sparse pattern); the exact loss reduction under gradient accumulation and over
devices; and the statistics of attention-probability dropout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dense_reference
from sce_jax import attention
from sce_jax.batch import Batch
from sce_jax.checkpoint import load_model_dir
from sce_jax.encoder import build_model
from sce_jax.train import make_loss_and_grad
from sce_jax.train_data import TrainBatch
from sce_jax.weights import params_to_hf

REPO = Path(__file__).resolve().parents[1]
LOSS_NAMES = ("margin-mse", "ranknet", "listnet", "listmle", "approx-ndcg", "localized-contrastive")

# Samples of a training batch: (query length, [document lengths], labels); a None length is a padding slot.
# Distinct labels per sample (ListMLE's ties are ordered differently by the original), unequal numbers of labelled
# pairs and of real documents, every sample with a positive gain (ApproxNDCG).
LIST_SAMPLES = [(5, [9, 4, 12], [2.0, 0.5, 1.0]), (3, [7, None, 6], [0.7, 0.0, 1.5]),
                (6, [11, 3, None], [1.0, 2.0, 0.0])]
PAIR_SAMPLES = [(5, [9, 4], [1.8, -0.2]), (3, [7, 10], [0.3, 1.1]), (6, [11, None], [1.0, 0.0]),
                (4, [5, 8], [2.5, 0.4])]


def samples_for(loss: str):
    return PAIR_SAMPLES if loss == "margin-mse" else LIST_SAMPLES


def make_batch(samples, seed: int = 0, micro_batches: int = 1) -> tuple[TrainBatch, list]:
    """A TrainBatch of random token ids (A micro-batches of len(samples) / A samples) and, per document slot, the
    (query ids, doc ids) of the real documents (None for padding)."""
    rng = np.random.default_rng(seed)
    num_docs = len(samples[0][1])
    query_length = max(q for q, _, _ in samples)
    doc_length = max(d or 0 for _, docs, _ in samples for d in docs)
    query_ids = np.zeros((len(samples), query_length), np.int32)
    doc_ids = np.zeros((len(samples) * num_docs, doc_length), np.int32)
    labels = np.zeros((len(samples), num_docs), np.float32)
    sequences = []
    for i, (q_len, doc_lengths, sample_labels) in enumerate(samples):
        query_ids[i, :q_len] = rng.integers(1000, 30000, q_len)
        labels[i] = sample_labels
        for j, d_len in enumerate(doc_lengths):
            if d_len is None:
                sequences.append(None)
                continue
            doc_ids[i * num_docs + j, :d_len] = rng.integers(1000, 30000, d_len)
            sequences.append((query_ids[i, :q_len].tolist(), doc_ids[i * num_docs + j, :d_len].tolist()))
    mask = np.array([[d is not None for d in docs] for _, docs, _ in samples])
    per_micro = len(samples) // micro_batches
    doc_query = np.tile(np.repeat(np.arange(per_micro, dtype=np.int32), num_docs), micro_batches)
    split = lambda x: x.reshape(micro_batches, -1, *x.shape[1:])  # noqa: E731
    batch = TrainBatch(split(query_ids), split(doc_ids), doc_query.reshape(micro_batches, -1), split(labels),
                       split(mask))
    return batch, sequences


def sce_loss_and_grad(model_dir, loss: str, batch: TrainBatch, *, attention_impl="auto"):
    """(loss, gradients as Hugging Face-named float arrays) of sce_jax's training step, dropout off."""
    config, params, _ = load_model_dir(model_dir)
    config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = build_model(config, params, attention_impl=attention_impl)
    graphdef, state = nnx.split(model, nnx.Param)
    value, grads = jax.jit(make_loss_and_grad(graphdef, loss))(nnx.to_pure_dict(state), batch,
                                                                jax.random.PRNGKey(0), 0)
    return float(value), params_to_hf(jax.tree.map(np.asarray, grads), config)


# --- the original's losses with its reductions, for torch and numpy scores [B, N] -----------------------------------


def reference_loss(xp, name: str, s, t, m):
    """The loss of a batch as the original computes it (`LossFunc.aggregate`: RankNet over all labelled pairs,
    ListMLE over all real positions, MarginMSE over complete samples, the rest over samples). `xp`: the module
    (torch or numpy) with the operations below; `m` a boolean mask."""
    ops = _Ops(xp)
    if name == "margin-mse":
        complete = m.all(-1)
        err = ((s[:, 0] - s[:, 1]) - (t[:, 0] - t[:, 1])) ** 2
        return (err * complete).sum() / complete.sum()
    if name == "ranknet":
        pairs = (t[:, :, None] > t[:, None, :]) & m[:, :, None] & m[:, None, :]
        x = s[:, :, None] - s[:, None, :]
        return (ops.softplus(-x) * pairs).sum() / pairs.sum()
    neg = -1e4
    s_masked, t_masked = ops.where(m, s, neg), ops.where(m, t, neg)
    if name == "listnet":
        return -(ops.softmax(t_masked) * ops.log_softmax(s_masked) * m).sum(-1).mean()
    if name == "localized-contrastive":
        best = ops.argmax(t_masked)
        return -ops.take(ops.log_softmax(s_masked), best).mean()
    if name == "listmle":
        order = ops.argsort_desc(t_masked)
        s_sorted, m_sorted = ops.take_all(s, order), ops.take_all(m, order)
        exp = ops.exp(s_sorted) * m_sorted
        tail = ops.flip_cumsum(exp)
        terms = (ops.log(ops.where(m_sorted, tail, 1.0)) - s_sorted) * m_sorted
        return terms.sum() / m_sorted.sum()
    if name == "approx-ndcg":
        other = m[:, None, :] & m[:, :, None] & ~ops.eye(s.shape[-1])
        ranks = 1 + (ops.sigmoid(s[:, None, :] - s[:, :, None]) * other).sum(-1)
        gains = (2.0**t - 1) * m
        dcg = (gains / ops.log2(1 + ranks)).sum(-1)
        ideal = ops.sort_desc(gains)
        idcg = (ideal / ops.log2(2 + ops.arange(s.shape[-1]))).sum(-1)
        return (1 - dcg / idcg).mean()
    raise ValueError(name)


class _Ops:
    """The few operations the reference losses need, for torch tensors or numpy arrays."""

    def __init__(self, xp):
        self.xp, self.torch = xp, xp.__name__ == "torch"

    def __getattr__(self, name):
        xp = self.xp
        if self.torch:
            return {
                "softplus": xp.nn.functional.softplus, "where": xp.where, "exp": xp.exp, "log": xp.log,
                "log2": xp.log2, "sigmoid": xp.sigmoid, "softmax": lambda x: xp.softmax(x, -1),
                "log_softmax": lambda x: xp.log_softmax(x, -1), "argmax": lambda x: x.argmax(-1),
                "take": lambda x, i: x.gather(-1, i[:, None])[:, 0], "argsort_desc": lambda x: xp.argsort(
                    x, dim=-1, descending=True, stable=True), "take_all": lambda x, i: x.gather(-1, i),
                "flip_cumsum": lambda x: x.flip(-1).cumsum(-1).flip(-1), "eye": lambda n: xp.eye(n, dtype=bool),
                "sort_desc": lambda x: x.sort(-1, descending=True).values, "arange": lambda n: xp.arange(n),
            }[name]
        from scipy.special import expit, log_softmax, softmax

        return {
            "softplus": lambda x: np.logaddexp(0, x), "where": np.where, "exp": np.exp, "log": np.log,
            "log2": np.log2, "sigmoid": expit, "softmax": lambda x: softmax(x, -1),
            "log_softmax": lambda x: log_softmax(x, -1), "argmax": lambda x: x.argmax(-1),
            "take": lambda x, i: np.take_along_axis(x, i[:, None], -1)[:, 0],
            "argsort_desc": lambda x: np.argsort(-x, -1, kind="stable"),
            "take_all": lambda x, i: np.take_along_axis(x, i, -1),
            "flip_cumsum": lambda x: x[:, ::-1].cumsum(-1)[:, ::-1], "eye": lambda n: np.eye(n, dtype=bool),
            "sort_desc": lambda x: -np.sort(-x, -1), "arange": np.arange,
        }[name]


def assert_grads_close(got: dict, expected: dict, rtol: float):
    """Every tensor: max |got - expected| <= rtol * max |expected|, and no tensor left out. Gradients that are 0
    in exact arithmetic (key biases: a softmax is blind to a constant added to a row's scores; the classifier bias
    under pairwise losses) are float noise on both sides: a tensor whose largest expected entry is under 0.1% of
    the largest gradient of all is measured against that largest gradient."""
    assert set(got) == set(expected)
    largest = max(float(np.abs(v).max()) for v in expected.values())
    errors = {}
    for k in got:
        scale = float(np.abs(expected[k]).max())
        errors[k] = float(np.abs(got[k] - expected[k]).max()) / (scale if scale > 1e-3 * largest else largest)
    assert max(errors.values()) <= rtol, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


# --- full attention: Hugging Face torch --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_hf_dir(tmp_path_factory, minilm_dir):
    """A tiny random BERT cross-encoder (2 layers, hidden 32) drawn wide enough that logits are O(1)."""
    from conftest import _save_hf_model, _tiny_bert

    model = _tiny_bert(seed=3, initializer_range=0.15)
    return _save_hf_model(model, minilm_dir, tmp_path_factory.mktemp("wide") / "hf")


def torch_loss_and_grad(model_dir, loss: str, batch: TrainBatch, sequences) -> tuple[float, dict]:
    import torch
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(model_dir)).eval()
    cls = model.config.cls_token_id if getattr(model.config, "cls_token_id", None) is not None else 101
    scores = []
    for seq in sequences:
        if seq is None:
            scores.append(torch.zeros(()))
            continue
        query, doc = seq
        ids = torch.tensor([[cls, *query, *doc]])
        types = torch.tensor([[0] * (1 + len(query)) + [1] * len(doc)])
        scores.append(model(input_ids=ids, token_type_ids=types).logits[0, 0])
    labels = torch.tensor(batch.labels[0])
    value = reference_loss(torch, loss, torch.stack(scores).reshape(labels.shape), labels,
                           torch.tensor(batch.label_mask[0]))
    value.backward()
    return float(value.detach()), {n: p.grad.numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gradients_match_hugging_face_full_attention(wide_hf_dir, loss):
    """One training step's loss and every gradient, dropout off, float32: within 1e-5 (relative to each tensor's
    largest gradient) of torch's autograd through `BertForSequenceClassification` and the original's loss."""
    batch, sequences = make_batch(samples_for(loss))
    value, grads = sce_loss_and_grad(wide_hf_dir, loss, batch)
    expected_value, expected = torch_loss_and_grad(wide_hf_dir, loss, batch, sequences)
    assert 0.05 < abs(expected_value) and value == pytest.approx(expected_value, rel=1e-6)
    assert_grads_close(grads, {k: v for k, v in expected.items() if k in grads}, rtol=1e-5)


# --- sparse pattern: finite differences of the float64 numpy model -----------------------------------------------


def numpy_loss(state, hf_config, pattern, window, loss, batch: TrainBatch, sequences) -> float:
    scores = np.array([0.0 if seq is None else dense_reference.forward(state, hf_config, *seq, pattern, window)[0]
                       for seq in sequences])
    labels = batch.labels[0].astype(np.float64)
    return float(reference_loss(np, loss, scores.reshape(labels.shape), labels, batch.label_mask[0]))


@pytest.mark.parametrize("loss", ["margin-mse", "ranknet", "listmle"])
def test_gradients_match_float64_finite_differences_sparse(tiny_sparse_dir, loss):
    """Under the released sparse pattern (window 2), through the training path's attention (the C++ kernel's
    forward where built), the loss and, for every parameter tensor, its largest gradient entry and one random
    entry agree with central differences of the float64 reference model (step 1e-4)."""
    from safetensors.numpy import load_file

    from sce_jax.config import PATTERN_FLAGS

    hf_config = json.loads((Path(tiny_sparse_dir) / "config.json").read_text())
    pattern = {flag: hf_config[flag] for flag in PATTERN_FLAGS}
    window = hf_config["attention_window_size"]
    state = {k: v.astype(np.float64) for k, v in load_file(str(Path(tiny_sparse_dir) / "model.safetensors")).items()}
    batch, sequences = make_batch(samples_for(loss), seed=1)
    value, grads = sce_loss_and_grad(tiny_sparse_dir, loss, batch)
    f = lambda: numpy_loss(state, hf_config, pattern, window, loss, batch, sequences)  # noqa: E731
    assert value == pytest.approx(f(), rel=1e-5)
    rng = np.random.default_rng(0)
    step = 1e-4
    for name, grad in grads.items():
        scale = np.abs(grad).max()
        for index in {np.unravel_index(np.abs(grad).argmax(), grad.shape),
                      tuple(int(rng.integers(n)) for n in grad.shape)}:
            original = state[name][index]
            state[name][index] = original + step
            up = f()
            state[name][index] = original - step
            down = f()
            state[name][index] = original
            numeric = (up - down) / (2 * step)
            assert abs(grad[index] - numeric) <= 1e-4 * scale + 1e-7, (name, index, grad[index], numeric)


# --- exact reduction under accumulation and over devices ----------------------------------------------------------


@pytest.mark.parametrize("loss", ["ranknet", "listmle", "margin-mse"])
def test_accumulated_gradients_equal_one_batch(tiny_sparse_dir, loss):
    """The same 6 samples as 1, 2 or 3 micro-batches (unequal numbers of pairs, positions and complete samples in
    each): the same loss and gradients (dropout off)."""
    samples = samples_for(loss)
    samples = (samples * 2)[:6]
    results = [sce_loss_and_grad(tiny_sparse_dir, loss, make_batch(samples, micro_batches=a)[0], attention_impl="xla")
               for a in (1, 2, 3)]
    for value, grads in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        assert_grads_close(grads, results[0][1], rtol=1e-5)


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    import test_train_parity as t

    batch, _ = t.make_batch(t.LIST_SAMPLES + t.LIST_SAMPLES[::-1][:1], micro_batches=2)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "data"))), batch)
    one = t.sce_loss_and_grad(sys.argv[1], "ranknet", batch, attention_impl="xla")
    with jax.set_mesh(mesh):
        two = t.sce_loss_and_grad(sys.argv[1], "ranknet", sharded, attention_impl="xla")
    assert len(jax.devices()) == 2
    assert abs(one[0] - two[0]) <= 1e-6 * abs(one[0]), (one[0], two[0])
    t.assert_grads_close(two[1], one[1], rtol=1e-5)
    print("equal")
""")


def test_gradients_over_two_devices_equal_one(tiny_sparse_dir):
    """A batch sharded over two devices (each holding samples with different numbers of labelled pairs) gives the
    loss and gradients of the same batch on one device."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(tiny_sparse_dir)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "equal" in result.stdout, result.stderr[-3000:]


# --- attention-probability dropout --------------------------------------------------------------------------------


@pytest.fixture
def recorded_dropout(monkeypatch):
    """Records (probabilities in, probabilities out, dropout) of every attention-probability dropout call."""
    calls = []
    drop = attention.drop_probs

    def recording(probs, dropout):
        out = drop(probs, dropout)
        if dropout is not None:
            calls.append((np.asarray(probs), np.asarray(out), dropout))
        return out

    monkeypatch.setattr(attention, "drop_probs", recording)
    return calls


def dropout_model(model_dir, rate: float, attention_impl="xla", **overrides):
    config, params, _ = load_model_dir(model_dir)
    config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=rate, **overrides)
    return build_model(config, params, attention_impl=attention_impl)


def long_batch() -> Batch:
    rng = np.random.default_rng(5)
    query_ids = np.zeros((2, 16), np.int32)
    query_ids[0, :16], query_ids[1, :12] = rng.integers(1000, 30000, 16), rng.integers(1000, 30000, 12)
    doc_ids = rng.integers(1000, 30000, (6, 40)).astype(np.int32)
    doc_ids[1, 30:] = 0
    return Batch(query_ids, doc_ids, np.array([0, 0, 0, 1, 1, 1], np.int32))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_attention_dropout_sites_rate_and_scaling(tiny_sparse_dir, recorded_dropout, rate):
    """Every layer drops probabilities at its [CLS], query and document rows with the config's
    attention_probs_dropout_prob: at each site the kept fraction of the non-zero probabilities is 1 - rate
    (within 5 binomial standard deviations), kept ones are scaled by 1 / (1 - rate), dropped ones are 0, and
    each site and layer draws its own mask."""
    model = dropout_model(tiny_sparse_dir, rate)
    model(long_batch(), dropout_rng=jax.random.PRNGKey(7), return_hidden_states=True)
    layers = model.config.num_hidden_layers
    assert len(recorded_dropout) == 3 * layers
    masks = []
    for probs, out, dropout in recorded_dropout:
        assert dropout.rate == rate
        live = probs > 0
        kept = live & (out != 0)
        n = live.sum()
        assert n > 1000
        assert abs(kept.sum() / n - (1 - rate)) <= 5 * np.sqrt(rate * (1 - rate) / n), (kept.sum() / n, n)
        np.testing.assert_allclose(out[kept], probs[kept] / (1 - rate), rtol=1e-6)
        assert not out[~kept].any()
        masks.append(kept)
    # The same site in two layers: different masks (the layer index is folded into the key).
    for site in range(3):
        assert masks[site].shape == masks[3 + site].shape and not np.array_equal(masks[site], masks[3 + site])


def test_attention_dropout_is_a_function_of_the_key(tiny_sparse_dir):
    """The same key gives the same scores; another key other scores; no key (inference) no dropout; with the
    rate 0, the scores of a dropout key are those of no dropout at all (hidden dropout off)."""
    model, batch = dropout_model(tiny_sparse_dir, 0.3), long_batch()
    plain = np.asarray(model(batch))
    first = np.asarray(model(batch, dropout_rng=jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(first, np.asarray(model(batch, dropout_rng=jax.random.PRNGKey(1))))
    assert np.abs(first - np.asarray(model(batch, dropout_rng=jax.random.PRNGKey(2)))).max() > 1e-3
    assert np.abs(first - plain).max() > 1e-3
    off = dropout_model(tiny_sparse_dir, 0.0)
    np.testing.assert_array_equal(np.asarray(off(batch, dropout_rng=jax.random.PRNGKey(1))), plain)


def test_kernels_fall_back_to_xla_while_dropping(tiny_sparse_dir, caplog):
    """The C++ kernel has no dropout: with a dropout key the model runs the XLA path (the same scores as
    attention_impl='xla', said once at INFO), and without one the kernel (inference unchanged)."""
    from sce_jax.attention import _cpu_kernel_available

    if not _cpu_kernel_available()[0]:
        pytest.skip(f"no CPU kernel: {_cpu_kernel_available()[1]}")
    batch, key = long_batch(), jax.random.PRNGKey(4)
    xla, cpu = dropout_model(tiny_sparse_dir, 0.2), dropout_model(tiny_sparse_dir, 0.2, attention_impl="cpu")
    assert cpu.attention_impl == "cpu"
    attention._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="sce_jax.attention"):
        np.testing.assert_allclose(np.asarray(cpu(batch, dropout_rng=key)), np.asarray(xla(batch, dropout_rng=key)),
                                   rtol=1e-6, atol=1e-6)
        cpu(batch, dropout_rng=key)
    assert [r.levelname for r in caplog.records if "no attention-probability dropout" in r.message] == ["INFO"]
    np.testing.assert_allclose(np.asarray(cpu(batch)), np.asarray(xla(batch)), rtol=1e-5, atol=1e-6)

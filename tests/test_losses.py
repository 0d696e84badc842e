"""Each loss against a plain-Python reference written from its paper's definition, with padding slots."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import losses

RNG = np.random.default_rng(0)
SCORES = RNG.normal(size=(3, 4)).astype(np.float32)
LABELS = np.array([[2.0, 0.0, 1.0, 3.0], [0.0, 1.0, 0.0, 9.0], [1.0, 1.0, 0.0, 0.0]], np.float32)
# Sample 1's last slot is padding (its label 9 must be ignored); sample 2 has two padding slots.
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], bool)


def _softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def _valid(b):
    return SCORES[b][MASK[b]].astype(np.float64), LABELS[b][MASK[b]].astype(np.float64)


def ranknet_reference(s, t):
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if t[i] > t[j]]
    return sum(math.log(1 + math.exp(-(s[i] - s[j]))) for i, j in pairs) / max(len(pairs), 1)


def listnet_reference(s, t):
    return -np.sum(_softmax(t) * np.log(_softmax(s)))


def listmle_reference(s, t):
    order = sorted(range(len(s)), key=lambda i: -t[i])  # Python's sort is stable, as the loss documents
    return sum(math.log(sum(math.exp(s[j]) for j in order[k:])) - s[order[k]] for k in range(len(order)))


def approx_ndcg_reference(s, t):
    ranks = [1 + sum(1 / (1 + math.exp(-(s[j] - s[i]))) for j in range(len(s)) if j != i) for i in range(len(s))]
    gains = [2**x - 1 for x in t]
    dcg = sum(g / math.log2(1 + r) for g, r in zip(gains, ranks))
    idcg = sum(g / math.log2(2 + k) for k, g in enumerate(sorted(gains, reverse=True)))
    return 1 - dcg / idcg if idcg > 0 else 0.0


def contrastive_reference(s, t):
    return -np.log(_softmax(s)[int(np.argmax(t))])


@pytest.mark.parametrize(
    "name, reference",
    [
        ("ranknet", ranknet_reference),
        ("listnet", listnet_reference),
        ("listmle", listmle_reference),
        ("approx-ndcg", approx_ndcg_reference),
        ("localized-contrastive", contrastive_reference),
    ],
)
def test_listwise_losses_match_reference(name, reference):
    got = losses.get_loss(name)(jnp.asarray(SCORES), jnp.asarray(LABELS), jnp.asarray(MASK))
    expected = [reference(*_valid(b)) for b in range(len(SCORES))]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_margin_mse_by_hand():
    scores = jnp.array([[2.0, 0.5], [1.0, 1.0], [0.0, 3.0]])
    labels = jnp.array([[5.0, 1.0], [2.0, 0.0], [7.0, 7.0]])
    mask = jnp.array([[True, True], [True, True], [True, False]])
    # (1.5 - 4)^2 = 6.25; (0 - 2)^2 = 4; the third sample has a padding document.
    np.testing.assert_allclose(losses.margin_mse(scores, labels, mask), [6.25, 4.0, 0.0])


def test_margin_mse_rejects_lists():
    with pytest.raises(ValueError, match="exactly 2 documents"):
        losses.margin_mse(jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.ones((1, 3), bool))


def test_padding_slots_do_not_change_loss_or_get_gradient():
    """Changing a padding slot's score or label leaves every loss and every real gradient unchanged."""
    scores, labels = jnp.asarray(SCORES), jnp.asarray(LABELS)
    moved_scores = scores.at[2, 2:].set(50.0)
    moved_labels = labels.at[2, 2:].set(-7.0)
    for name, loss in losses.LOSSES.items():
        if name == "margin-mse":
            continue
        mean_loss = lambda s, t: loss(s, t, jnp.asarray(MASK)).mean()  # noqa: E731
        np.testing.assert_allclose(mean_loss(scores, labels), mean_loss(moved_scores, moved_labels), rtol=1e-6)
        grad = jax.grad(mean_loss)(scores, labels)
        assert np.isfinite(np.asarray(grad)).all(), name
        assert not np.asarray(grad)[~MASK].any(), name
        assert np.abs(np.asarray(grad)[MASK]).sum() > 0, name


def test_gradients_finite_with_fully_padded_sample_and_extreme_scores():
    scores = jnp.array([[100.0, -100.0, 0.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = jnp.array([[True, True, False], [False, False, False]])
    for name, loss in losses.LOSSES.items():
        s, t, m = (scores[:, :2], labels[:, :2], mask[:, :2]) if name == "margin-mse" else (scores, labels, mask)
        value, grad = jax.value_and_grad(lambda x: loss(x, t, m).mean())(s)
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all(), name


def test_unknown_loss_lists_choices():
    with pytest.raises(losses.UnknownLossError, match="margin-mse"):
        losses.get_loss("hinge")

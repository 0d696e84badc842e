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


# --- reductions: the original's `LossFunc.aggregate`, written out in numpy -----------------------------------------

PAD_VALUE = -10000.0  # the original marks padding slots with this value in logits and labels


def _padded(values_BxN, mask_BxN):
    return np.where(mask_BxN, np.asarray(values_BxN, np.float64), PAD_VALUE)


def ranknet_original(scores_BxN, labels_BxN, mask_BxN):
    """Binary cross-entropy with logits s_i - s_j and target [t_i > t_j] for every pair, then the mean over the
    entries not masked (padding on either side, or t_i <= t_j) of the whole batch."""
    s, t = _padded(scores_BxN, mask_BxN), _padded(labels_BxN, mask_BxN)
    greater = t[:, :, None] > t[:, None, :]
    pad_s, pad_t = s == PAD_VALUE, t == PAD_VALUE
    mask = pad_s[:, :, None] | pad_s[:, None] | pad_t[:, :, None] | pad_t[:, None] | ~greater
    x = s[:, :, None] - s[:, None, :]
    bce = np.maximum(x, 0) - x * greater + np.log1p(np.exp(-np.abs(x)))
    return bce[~mask].mean()


def listmle_original(scores_BxN, labels_BxN, mask_BxN):
    """Scores sorted by label (padding last), log of the reversed cumulative sum of exp(s - max) minus (s - max)
    at every position (the original adds 1e-6 inside the log, left out here), padding positions 0; the mean over
    the real positions of the batch (the original's mean over its padded [B, N] counts padding positions as 0
    terms: the same value when no sample is padded)."""
    s, t = _padded(scores_BxN, mask_BxN), _padded(labels_BxN, mask_BxN)
    order = np.argsort(-t, axis=-1, kind="stable")
    t_sorted, s_sorted = np.take_along_axis(t, order, -1), np.take_along_axis(s, order, -1)
    mask = t_sorted == PAD_VALUE
    s_sorted = np.where(mask, np.finfo(np.float64).min, s_sorted)
    diff = s_sorted - s_sorted.max(-1, keepdims=True)
    cumsum = np.cumsum(np.exp(diff)[:, ::-1], axis=-1)[:, ::-1]
    with np.errstate(divide="ignore", invalid="ignore"):  # padding positions: log(0)
        loss = np.where(mask, 0.0, np.log(cumsum) - diff)
    return loss.sum() / (~mask).sum()


def margin_mse_original(scores_BxN, labels_BxN, mask_BxN):
    """Squared error of the margins, the mean over samples with no padding slot."""
    s, t = _padded(scores_BxN, mask_BxN), _padded(labels_BxN, mask_BxN)
    mask = ((s == PAD_VALUE) | (t == PAD_VALUE)).any(-1)
    loss = ((s[:, 0] - s[:, 1]) - (t[:, 0] - t[:, 1])) ** 2
    return loss[~mask].mean()


def mean_over_samples(reference):
    def per_batch(scores_BxN, labels_BxN, mask_BxN):
        return np.mean([reference(scores_BxN[b][mask_BxN[b]].astype(np.float64),
                                  labels_BxN[b][mask_BxN[b]].astype(np.float64)) for b in range(len(scores_BxN))])

    return per_batch


# Distinct labels within each sample (the original shuffles ties at random); 6, 3 and 1 labelled pairs.
LIST_SCORES = np.array([[0.3, -1.2, 0.8, 1.9], [2.2, 0.1, -0.4, 5.0], [-0.6, 0.9, 3.0, -2.0]], np.float32)
LIST_LABELS = np.array([[3.0, 1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 0.0], [1.0, 0.0, 4.0, 4.0]], np.float32)
LIST_MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], bool)
PAIR_SCORES = np.array([[2.0, 0.5], [1.0, 1.0], [0.0, 3.0], [-1.0, 0.5]], np.float32)
PAIR_LABELS = np.array([[5.0, 1.0], [2.0, 0.0], [7.0, 7.0], [0.5, 1.5]], np.float32)
PAIR_MASK = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], bool)  # sample 2 is incomplete

ORIGINAL_REDUCTIONS = [
    ("ranknet", ranknet_original, LIST_SCORES, LIST_LABELS, LIST_MASK),
    ("listmle", listmle_original, LIST_SCORES, LIST_LABELS, LIST_MASK),
    ("listmle", listmle_original, LIST_SCORES, LIST_LABELS, np.ones_like(LIST_MASK)),  # no padding
    ("margin-mse", margin_mse_original, PAIR_SCORES, PAIR_LABELS, PAIR_MASK),
    ("listnet", mean_over_samples(listnet_reference), LIST_SCORES, LIST_LABELS, LIST_MASK),
    ("approx-ndcg", mean_over_samples(approx_ndcg_reference), LIST_SCORES, LIST_LABELS, LIST_MASK),
    ("localized-contrastive", mean_over_samples(contrastive_reference), LIST_SCORES, LIST_LABELS, LIST_MASK),
]


@pytest.mark.parametrize("name, reference, scores, labels, mask", ORIGINAL_REDUCTIONS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ORIGINAL_REDUCTIONS)])
def test_batch_reduction_is_the_originals(name, reference, scores, labels, mask):
    """The default ("batch") reduction gives the original's loss of the batch, and split into micro-batches the
    sums and counts add up to it."""
    expected = reference(scores, labels, mask)
    got = losses.reduce_loss(name, "batch", *(jnp.asarray(a) for a in (scores, labels, mask)))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    sum_count = losses.loss_sum_count(name, "batch")
    parts = [sum_count(*(jnp.asarray(a[part]) for a in (scores, labels, mask)))
             for part in (slice(0, 1), slice(1, None))]
    total, count = (sum(float(p[i]) for p in parts) for i in range(2))
    np.testing.assert_allclose(total / count, expected, rtol=1e-6)


@pytest.mark.parametrize("name, scores, labels, mask", [
    ("ranknet", LIST_SCORES, LIST_LABELS, LIST_MASK),
    ("listmle", LIST_SCORES, LIST_LABELS, LIST_MASK),
    ("margin-mse", PAIR_SCORES, PAIR_LABELS, PAIR_MASK),
])
def test_sample_reduction_is_the_mean_of_per_sample_losses(name, scores, labels, mask):
    """"sample" averages `LOSSES[name]` over samples; on these batches it differs from the original's reduction
    (unequal numbers of pairs, list lengths, an incomplete pair), so the two cannot be confused."""
    args = [jnp.asarray(a) for a in (scores, labels, mask)]
    per_sample = float(losses.get_loss(name)(*args).mean())
    np.testing.assert_allclose(float(losses.reduce_loss(name, "sample", *args)), per_sample, rtol=1e-6)
    assert abs(per_sample - float(losses.reduce_loss(name, "batch", *args))) > 0.05 * abs(per_sample)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="unknown loss reduction 'mean'"):
        losses.loss_sum_count("ranknet", "mean")

"""Ranking losses as pure JAX functions.

Every loss takes `scores_BxN` (model logits), `labels_BxN` (teacher scores or relevance) and `mask_BxN` (True for
real documents, False for padding slots). `LOSSES[name]` gives the loss of each sample, `[B]` float32.

Training reduces a batch by `loss_sum_count(name, reduction)`, which returns the sum of the loss terms and how many
terms there are, so that gradient accumulation and data parallelism add sums and counts and divide once:

- reduction "batch" (the original's `LossFunc.aggregate`): RankNet is the mean over every valid pair (label_i >
  label_j, both real) of the whole batch, ListMLE the mean over every real list position of the batch, MarginMSE
  the mean over complete samples (a sample with a padding slot is left out); ListNet, ApproxNDCG and localized
  contrastive are means over samples.
- reduction "sample": the mean over samples of `LOSSES[name]` (RankNet averaged within each sample, ListMLE summed
  within each sample, an incomplete MarginMSE sample counted as 0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (sum of the loss terms, number of terms), both float32 scalars.
SumCountFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
REDUCTIONS = ("batch", "sample")


class UnknownLossError(ValueError):
    pass


# Finite stand-in for -inf at padding slots: exp() of it is 0, yet no inf - inf turns gradients into NaN.
_NEG = -1e30


def _masked_fill(x: jax.Array, mask: jax.Array, value: float) -> jax.Array:
    return jnp.where(mask, x, value)


def _margin_mse_terms(scores_BxN, labels_BxN, mask_BxN):
    """Each sample's squared margin error (0 where incomplete) and whether the sample is complete."""
    if scores_BxN.shape[-1] != 2:
        raise ValueError(f"margin-mse needs exactly 2 documents per sample, got {scores_BxN.shape[-1]}")
    margin_B = scores_BxN[:, 0] - scores_BxN[:, 1]
    teacher_margin_B = labels_BxN[:, 0] - labels_BxN[:, 1]
    valid_B = mask_BxN.all(axis=-1)
    return jnp.where(valid_B, (margin_B - teacher_margin_B) ** 2, 0.0), valid_B


def margin_mse(scores_BxN, labels_BxN, mask_BxN):
    """(s_0 - s_1 - (t_0 - t_1))^2 (Hofstätter et al., 2020); samples hold exactly 2 documents (else 0)."""
    return _margin_mse_terms(scores_BxN, labels_BxN, mask_BxN)[0]


def _ranknet_terms(scores_BxN, labels_BxN, mask_BxN):
    """-log sigmoid(s_i - s_j) for every pair (i, j) with label_i > label_j, both real (0 elsewhere), and which
    pairs those are."""
    pair_BxNxN = (
        (labels_BxN[:, :, None] > labels_BxN[:, None, :]) & mask_BxN[:, :, None] & mask_BxN[:, None, :]
    )
    diff_BxNxN = scores_BxN[:, :, None] - scores_BxN[:, None, :]
    return jnp.where(pair_BxNxN, jax.nn.softplus(-diff_BxNxN), 0.0), pair_BxNxN


def ranknet(scores_BxN, labels_BxN, mask_BxN):
    """Mean over pairs (i, j) with label_i > label_j of -log sigmoid(s_i - s_j) (Burges et al., 2005)."""
    pair_loss_BxNxN, pair_BxNxN = _ranknet_terms(scores_BxN, labels_BxN, mask_BxN)
    num_pairs_B = pair_BxNxN.sum(axis=(1, 2))
    return pair_loss_BxNxN.sum(axis=(1, 2)) / jnp.maximum(num_pairs_B, 1)


def listnet(scores_BxN, labels_BxN, mask_BxN):
    """Cross-entropy between softmax(labels) and softmax(scores) over a sample's documents (Cao et al., 2007)."""
    target_BxN = jax.nn.softmax(_masked_fill(labels_BxN, mask_BxN, _NEG), axis=-1)
    log_probs_BxN = jax.nn.log_softmax(_masked_fill(scores_BxN, mask_BxN, _NEG), axis=-1)
    return -jnp.where(mask_BxN, target_BxN * log_probs_BxN, 0.0).sum(axis=-1)


def _listmle_terms(scores_BxN, labels_BxN, mask_BxN):
    """Each list position's term of the Plackett-Luce likelihood (0 at padding), and which positions are real."""
    order_BxN = jnp.argsort(_masked_fill(-labels_BxN, mask_BxN, -_NEG), axis=-1, stable=True)
    sorted_scores_BxN = jnp.take_along_axis(scores_BxN, order_BxN, axis=-1)
    sorted_mask_BxN = jnp.take_along_axis(mask_BxN, order_BxN, axis=-1)
    masked_BxN = _masked_fill(sorted_scores_BxN, sorted_mask_BxN, _NEG)
    # logsumexp over the documents ranked at or below each position: a reversed cumulative logsumexp.
    tail_lse_BxN = jax.lax.cumlogsumexp(masked_BxN, axis=1, reverse=True)
    return jnp.where(sorted_mask_BxN, tail_lse_BxN - sorted_scores_BxN, 0.0), sorted_mask_BxN


def listmle(scores_BxN, labels_BxN, mask_BxN):
    """Negative log-likelihood of the label order under Plackett-Luce (Xia et al., 2008), summed over a sample's
    positions.

    Ties keep the input order (the original breaks them with an unseeded shuffle).
    """
    return _listmle_terms(scores_BxN, labels_BxN, mask_BxN)[0].sum(axis=-1)


def approx_ndcg(scores_BxN, labels_BxN, mask_BxN, temperature: float = 1.0):
    """1 - nDCG with ranks approximated by sigmoids of score differences (Qin et al., 2010).

    Gains are 2^label - 1; a sample without any positive gain has loss 0.
    """
    pair_BxNxN = mask_BxN[:, :, None] & mask_BxN[:, None, :] & ~jnp.eye(mask_BxN.shape[-1], dtype=bool)
    beats_BxNxN = jax.nn.sigmoid((scores_BxN[:, None, :] - scores_BxN[:, :, None]) / temperature)
    approx_rank_BxN = 1.0 + jnp.where(pair_BxNxN, beats_BxNxN, 0.0).sum(axis=-1)
    gains_BxN = jnp.where(mask_BxN, 2.0**labels_BxN - 1.0, 0.0)
    dcg_B = (gains_BxN / jnp.log2(1.0 + approx_rank_BxN)).sum(axis=-1)
    ideal_gains_BxN = -jnp.sort(-gains_BxN, axis=-1)
    ideal_discounts_N = 1.0 / jnp.log2(2.0 + jnp.arange(gains_BxN.shape[-1]))
    idcg_B = (ideal_gains_BxN * ideal_discounts_N).sum(axis=-1)
    return jnp.where(idcg_B > 0, 1.0 - dcg_B / jnp.where(idcg_B > 0, idcg_B, 1.0), 0.0)


def localized_contrastive(scores_BxN, labels_BxN, mask_BxN):
    """Softmax cross-entropy with the highest-labelled document as the one positive (Gao et al., 2021)."""
    positive_B = jnp.argmax(_masked_fill(labels_BxN, mask_BxN, _NEG), axis=-1)
    log_probs_BxN = jax.nn.log_softmax(_masked_fill(scores_BxN, mask_BxN, _NEG), axis=-1)
    return -jnp.take_along_axis(log_probs_BxN, positive_B[:, None], axis=-1)[:, 0]


LOSSES: dict[str, LossFn] = {
    "margin-mse": margin_mse,
    "ranknet": ranknet,
    "listnet": listnet,
    "listmle": listmle,
    "approx-ndcg": approx_ndcg,
    "localized-contrastive": localized_contrastive,
}


# Losses whose "batch" reduction averages finer terms than samples: their terms and which terms count.
_BATCH_TERMS = {"margin-mse": _margin_mse_terms, "ranknet": _ranknet_terms, "listmle": _listmle_terms}


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownLossError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


def loss_sum_count(name: str, reduction: str = "batch") -> SumCountFn:
    """`f(scores_BxN, labels_BxN, mask_BxN) -> (sum, count)`: the loss of a batch is sum / count, and of several
    (micro-)batches the sum of their sums over the sum of their counts (see the module docstring)."""
    per_sample = get_loss(name)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    terms = _BATCH_TERMS.get(name) if reduction == "batch" else None

    def sum_count(scores_BxN, labels_BxN, mask_BxN):
        if terms is None:
            loss_B = per_sample(scores_BxN, labels_BxN, mask_BxN)
            return loss_B.sum(), jnp.float32(loss_B.shape[0])
        loss, valid = terms(scores_BxN, labels_BxN, mask_BxN)
        return loss.sum(), valid.sum().astype(jnp.float32)

    return sum_count


def reduce_loss(name: str, reduction: str, scores_BxN, labels_BxN, mask_BxN) -> jax.Array:
    """The loss of one batch: sum / count (0 when no term counts, e.g. RankNet without a labelled pair)."""
    total, count = loss_sum_count(name, reduction)(scores_BxN, labels_BxN, mask_BxN)
    return total / jnp.maximum(count, 1.0)

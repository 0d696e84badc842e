"""Ranking losses as pure JAX functions.

Every loss takes `scores_BxN` (model logits), `labels_BxN` (teacher scores or relevance) and `mask_BxN` (True for
real documents, False for padding slots) and returns the loss of each sample, `[B]` float32. The training step
averages over samples, so gradient accumulation over equal-sized micro-batches gives the same mean.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class UnknownLossError(ValueError):
    pass


# Finite stand-in for -inf at padding slots: exp() of it is 0, yet no inf - inf turns gradients into NaN.
_NEG = -1e30


def _masked_fill(x: jax.Array, mask: jax.Array, value: float) -> jax.Array:
    return jnp.where(mask, x, value)


def margin_mse(scores_BxN, labels_BxN, mask_BxN):
    """(s_0 - s_1 - (t_0 - t_1))^2 (Hofstätter et al., 2020); samples hold exactly 2 documents."""
    if scores_BxN.shape[-1] != 2:
        raise ValueError(f"margin-mse needs exactly 2 documents per sample, got {scores_BxN.shape[-1]}")
    margin_B = scores_BxN[:, 0] - scores_BxN[:, 1]
    teacher_margin_B = labels_BxN[:, 0] - labels_BxN[:, 1]
    valid_B = mask_BxN.all(axis=-1)
    return jnp.where(valid_B, (margin_B - teacher_margin_B) ** 2, 0.0)


def ranknet(scores_BxN, labels_BxN, mask_BxN):
    """Mean over pairs (i, j) with label_i > label_j of -log sigmoid(s_i - s_j) (Burges et al., 2005)."""
    pair_BxNxN = (
        (labels_BxN[:, :, None] > labels_BxN[:, None, :]) & mask_BxN[:, :, None] & mask_BxN[:, None, :]
    )
    diff_BxNxN = scores_BxN[:, :, None] - scores_BxN[:, None, :]
    pair_loss_BxNxN = jnp.where(pair_BxNxN, jax.nn.softplus(-diff_BxNxN), 0.0)
    num_pairs_B = pair_BxNxN.sum(axis=(1, 2))
    return pair_loss_BxNxN.sum(axis=(1, 2)) / jnp.maximum(num_pairs_B, 1)


def listnet(scores_BxN, labels_BxN, mask_BxN):
    """Cross-entropy between softmax(labels) and softmax(scores) over a sample's documents (Cao et al., 2007)."""
    target_BxN = jax.nn.softmax(_masked_fill(labels_BxN, mask_BxN, _NEG), axis=-1)
    log_probs_BxN = jax.nn.log_softmax(_masked_fill(scores_BxN, mask_BxN, _NEG), axis=-1)
    return -jnp.where(mask_BxN, target_BxN * log_probs_BxN, 0.0).sum(axis=-1)


def listmle(scores_BxN, labels_BxN, mask_BxN):
    """Negative log-likelihood of the label order under Plackett-Luce (Xia et al., 2008).

    Ties keep the input order (the original breaks them with an unseeded shuffle).
    """
    order_BxN = jnp.argsort(_masked_fill(-labels_BxN, mask_BxN, -_NEG), axis=-1, stable=True)
    sorted_scores_BxN = jnp.take_along_axis(scores_BxN, order_BxN, axis=-1)
    sorted_mask_BxN = jnp.take_along_axis(mask_BxN, order_BxN, axis=-1)
    masked_BxN = _masked_fill(sorted_scores_BxN, sorted_mask_BxN, _NEG)
    # logsumexp over the documents ranked at or below each position: a reversed cumulative logsumexp.
    tail_lse_BxN = jax.lax.cumlogsumexp(masked_BxN, axis=1, reverse=True)
    return jnp.where(sorted_mask_BxN, tail_lse_BxN - sorted_scores_BxN, 0.0).sum(axis=-1)


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


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownLossError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None

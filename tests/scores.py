"""The documented bound on how far a document's score moves with its batch mates (`sce_jax.encoder`)."""

import numpy as np

from sce_jax.encoder import BATCH_TOLERANCE


def assert_batch_close(actual, expected, err_msg: str = "") -> None:
    """Scores of the same documents computed in different batches: within BATCH_TOLERANCE * max(1, |score|)."""
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE, err_msg=err_msg)

"""Actual and hypothetical DeepLIFT-SHAP scores of a chunk, from one forward and backward.

TF-MoDISco needs the hypothetical contributions, which need the multipliers of every
(region, reference) pair, not only their average times (x - r). The Explainer's public
`pair_multipliers` returns those (through the same passes as `attribute`), and
`liftir.genomics.hypothetical_contributions` turns them into hypothetical scores, so the
pipeline runs no private part of the Explainer.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..explainer import Explainer
from ..genomics import hypothetical_contributions


def pair_multipliers(explainer: Explainer, x: np.ndarray, refs: np.ndarray, target=None,
                     output: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DeepLIFT multipliers of each (region, reference) pair and the explained differences.

    x (n, ...) in the model's input layout, refs (n, S, ...) each region's own references.
    Returns m (n, S, ...) in x's dtype and f(x) - f(r) (n, S) in float64, from one pass
    (the pipeline sizes its batches itself, under its memory budget).
    """
    m, diff = explainer.pair_multipliers(x, refs, target, output=output, max_memory=None)
    if m.ndim != refs.ndim:
        raise InputError("the genome pipeline explains one target per region; give an int --target "
                         "(or a tensor with one value per region as --output)")
    return m.astype(x.dtype, copy=False), diff


def shap_scores(explainer: Explainer, x: np.ndarray, refs: np.ndarray, channels_first: bool,
                target=None, output: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(actual, hypothetical, delta) for one-hot x (n, L, 4) and references (n, S, L, 4).

    actual = mean_r m (x - r), hypothetical_b = mean_r (m_b - sum_b' m_b' r_b'), both
    (n, L, 4) float32; delta (n,) = sum(actual) - mean_r (f(x) - f(r)), float64: each
    region's summation-to-delta residual, checked on what is stored.
    """
    if channels_first:
        m, diff = pair_multipliers(explainer, np.ascontiguousarray(x.transpose(0, 2, 1)),
                                   np.ascontiguousarray(refs.transpose(0, 1, 3, 2)), target, output)
        m = m.transpose(0, 1, 3, 2)
    else:
        m, diff = pair_multipliers(explainer, x, refs, target, output)
    actual = (m * (x[:, None] - refs)).mean(axis=1)
    hypothetical = hypothetical_contributions(m, refs)
    delta = actual.astype(np.float64).reshape(len(x), -1).sum(axis=1) - diff.mean(axis=1)
    return actual.astype(np.float32), hypothetical.astype(np.float32), delta

"""Actual and hypothetical DeepLIFT-SHAP scores of a chunk, from one forward and backward.

TF-MoDISco needs the hypothetical contributions, which need the multipliers of every
(region, reference) pair, not only their average times (x - r). The public
`Explainer.attribute` returns the latter, so this module is the one place that runs the
Explainer's forward and backward itself (its `_forward`, `_seed` and `_explained_difference`
helpers, the scheduler's `PairedRun`), to get both from a single pass. When the
Explainer gains a public multipliers option, only `pair_multipliers` changes.
"""
from __future__ import annotations

import numpy as np

from .. import scheduler
from ..backend import to_host
from ..explainer import Explainer


def pair_multipliers(explainer: Explainer, x: np.ndarray, refs: np.ndarray, target=None,
                     output: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DeepLIFT multipliers of each (region, reference) pair and the explained differences.

    x (n, ...) in the model's input layout, refs (n, S, ...) each region's own references.
    Returns m (n, S, ...) and f(x) - f(r) (n, S) in float64.
    """
    out = explainer._output_for_call(output)
    n, s = refs.shape[:2]
    xs, ref_list, _ = explainer.prepare_inputs(x, refs, need_reference=True, distribution=True)
    flat_refs = [r.reshape((-1,) + r.shape[2:]) for r in ref_list]
    explained, stripped = explainer.explained_tensor(out)
    run = scheduler.PairedRun(explainer._forward(xs, flat_refs, explained), s, tile_references=False)
    value = run.device(explained)
    axis = explainer._softmax_axis(out) if stripped else -1
    seed = explainer._seed((n,) + tuple(value.shape[1:]), target, stripped, axis)
    if seed.shape[0] != 1:
        raise ValueError("the genome pipeline explains one target per region")
    seed = np.repeat(seed, s, axis=1)
    name = explainer.input_names[0]
    grads = scheduler.backward(run, {explained: explainer.xp.asarray(seed.astype(value.dtype))},
                               (name,), (explained,))
    m = grads[name]
    shape = (n, s) + x.shape[1:]
    m = np.zeros(shape, x.dtype) if m is None else to_host(m[0]).astype(x.dtype).reshape(shape)
    diff = explainer._explained_difference(seed, run, explained)
    return m, diff[0].reshape(n, s)


def shap_scores(explainer: Explainer, x: np.ndarray, refs: np.ndarray, channels_first: bool,
                target=None, output: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(actual, hypothetical, delta) for one-hot x (n, L, 4) and references (n, S, L, 4).

    actual = mean_r m (x - r), hypothetical_b = mean_r (m_b - sum_b' m_b' r_b'), both
    (n, L, 4) float32; delta (n,) = sum(actual) - mean_r (f(x) - f(r)), float64.
    """
    if channels_first:
        m, diff = pair_multipliers(explainer, np.ascontiguousarray(x.transpose(0, 2, 1)),
                                   np.ascontiguousarray(refs.transpose(0, 1, 3, 2)), target, output)
        m = m.transpose(0, 1, 3, 2)
    else:
        m, diff = pair_multipliers(explainer, x, refs, target, output)
    actual = (m * (x[:, None] - refs)).mean(axis=1)
    hypothetical = (m - (m * refs).sum(axis=-1, keepdims=True)).mean(axis=1)
    delta = actual.astype(np.float64).reshape(len(x), -1).sum(axis=1) - diff.mean(axis=1)
    return actual.astype(np.float32), hypothetical.astype(np.float32), delta

"""How well do per-position scores find the embedded motifs? (numpy only)

For each motif type, the positions inside its instances are the positives and the
positions inside no motif instance are the background; the score is the auROC of
ranking positions by |attribution| (or by signed attribution). 1.0 means every motif
base outranks every background base, 0.5 means no better than chance. The paper's
Figure 3 is the qualitative version of this: DeepLIFT lights up GATA and CAGATG,
gradient*input misses GATA.
"""
from __future__ import annotations

import numpy as np


def motif_mask(motif_positions, length: int, motif: str | None = None) -> np.ndarray:
    """Boolean (N, length): True inside instances of `motif` (any motif if None)."""
    mask = np.zeros((len(motif_positions), length), dtype=bool)
    for i, records in enumerate(motif_positions):
        for name, start, end in records:
            if motif is None or name == motif:
                mask[i, start:end] = True
    return mask


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic; ties count one half."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    values = np.concatenate([pos, neg])
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]  # average rank within ties
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def motif_auroc(scores: np.ndarray, motif_positions, motifs=None, use_abs: bool = True,
                sequences: np.ndarray | None = None) -> dict[str, float]:
    """auROC of "inside motif X" vs background, per motif type.

    Parameters
    ----------
    scores : (N, L) per-position scores, or (N, L, 4) per-base ones (summed over bases:
        for contributions w.r.t. one-hot input only the present base is non-zero).
    motif_positions : list of N lists of (name, start, end), as simulate() returns.
    motifs : motif names to score (default: all that occur).
    use_abs : rank by |score| (finds motifs whatever the sign) or by the signed score
        (rewards positive evidence for the class).
    sequences : optional boolean mask or indices of the sequences to use, e.g. the
        correctly predicted positives, as in the paper.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 3:
        s = s.sum(axis=-1)
    if s.ndim != 2 or s.shape[0] != len(motif_positions):
        raise ValueError(f"scores must be (N, L) or (N, L, 4) with N = {len(motif_positions)}, "
                         f"got {np.shape(scores)}")
    if use_abs:
        s = np.abs(s)
    rows = np.arange(len(s)) if sequences is None else np.arange(len(s))[sequences]
    positions = [motif_positions[i] for i in rows]
    s = s[rows]
    background = ~motif_mask(positions, s.shape[1])
    if motifs is None:
        motifs = sorted({name for recs in positions for name, _, _ in recs})
    return {m: auroc(s[motif_mask(positions, s.shape[1], m)], s[background]) for m in motifs}


if __name__ == "__main__":
    from simulate import simulate

    x, y, pos = simulate(200, seed=0)
    rng = np.random.default_rng(0)
    oracle = motif_mask(pos, x.shape[1]) + 0.1 * rng.normal(size=x.shape[:2])
    print("oracle:", motif_auroc(oracle, pos))
    print("noise: ", motif_auroc(rng.normal(size=x.shape[:2]), pos))

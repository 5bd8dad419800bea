"""Dinucleotide shuffles: liftir vs tangermeme 1.6, same sequences, side by side.

    python benchmarks/bench_shuffle.py --sequences 200 --shuffles 20 --length 2114

Prints seconds for each and the extrapolated time for 10k sequences. Both keep the exact
dinucleotide counts; liftir's are also uniform over all sequences with those counts
(tests/test_genomics.py), tangermeme's reuse the original sequence's last exits.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from liftir.genomics import dinucleotide_shuffle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--length", type=int, default=2114)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (args.sequences, args.length))]
    rows = []
    started = time.perf_counter()
    dinucleotide_shuffle(x, args.shuffles, seed=0)
    rows.append(("liftir, one seed", time.perf_counter() - started))
    started = time.perf_counter()
    dinucleotide_shuffle(x, args.shuffles, seeds=[(0, i) for i in range(len(x))])
    rows.append(("liftir, seed per sequence", time.perf_counter() - started))
    try:
        import torch
        from tangermeme.ersatz import dinucleotide_shuffle as tm_shuffle
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))
        started = time.perf_counter()
        tm_shuffle(xt, n=args.shuffles, random_state=0)
        rows.append(("tangermeme 1.6", time.perf_counter() - started))
    except ImportError:
        pass
    for name, seconds in rows:
        print(f"{name:28s} {seconds:7.2f} s  ({args.sequences} x {args.shuffles} x {args.length} bp; "
              f"10k sequences: {seconds * 1e4 / args.sequences:6.0f} s)")


if __name__ == "__main__":
    main()

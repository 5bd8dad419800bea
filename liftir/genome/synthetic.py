"""A small synthetic genome with implanted GATA and TAL1 motifs, for tests and examples.

Chromosomes are drawn i.i.d. with 41 % GC, with runs of N and soft-masked (lower-case)
stretches as in a real assembly. Peaks are placed on them: each peak's summit carries
a GATA site (AGATAA) and, in half of the peaks, a TAL1 E-box (CAGATG) a few bases
away. The peaks are written as a narrowPeak file (summit in column 10); a few sit so
close to a chromosome end that a wide window falls off it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GATA = "AGATAA"
TAL1 = "CAGATG"
CHROMOSOMES = {"chr1": 40_000, "chr2": 30_000, "chrM": 1_000}


def random_dna(rng: np.random.Generator, n: int, gc: float = 0.41) -> np.ndarray:
    p = np.array([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2])
    return np.frombuffer(b"ACGT", dtype=np.uint8)[rng.choice(4, size=n, p=p)]


def _implant(seq: np.ndarray, pos: int, motif: str, rng: np.random.Generator) -> None:
    site = motif if rng.random() < 0.5 else _revcomp(motif)
    seq[pos:pos + len(site)] = np.frombuffer(site.encode(), dtype=np.uint8)


def _revcomp(s: str) -> str:
    return s[::-1].translate(str.maketrans("ACGT", "TGCA"))


def make_genome(folder, n_peaks: int = 200, seed: int = 0, edge_peaks: int = 3,
                peak_width: int = 120, chromosomes: dict[str, int] | None = None
                ) -> tuple[Path, Path]:
    """Write genome.fa and peaks.narrowPeak into `folder`; returns their paths.

    The last `edge_peaks` peaks lie within 40 bp of a chromosome end. Peaks are spread
    over chr1 and chr2, at least 300 bp apart (give larger `chromosomes` for more).
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = dict(chromosomes or CHROMOSOMES)
    seqs = {name: random_dna(rng, size) for name, size in sizes.items()}
    rows = []
    slots = {name: np.arange(400, size - 400, 300) for name, size in sizes.items()
             if name != "chrM"}
    pool = [(name, int(p)) for name, ps in slots.items() for p in ps]
    picked = rng.choice(len(pool), size=n_peaks - edge_peaks, replace=False)
    for k in sorted(picked):
        name, summit = pool[k]
        summit += int(rng.integers(-20, 20))
        _implant(seqs[name], summit - 3, GATA, rng)
        if rng.random() < 0.5:
            _implant(seqs[name], summit + int(rng.integers(8, 20)), TAL1, rng)
        start = summit - int(rng.integers(20, peak_width - 20))
        rows.append((name, start, start + peak_width, summit - start))
    for k in range(edge_peaks):  # near the ends: a wide window falls off
        name = list(sizes)[k % len(sizes)]
        size = sizes[name]
        start = 5 if k % 2 == 0 else size - 45
        rows.append((name, start, start + 40, 20))
    # assembly texture: N runs and soft-masked repeats
    for name, seq in seqs.items():
        for _ in range(3):
            lo = int(rng.integers(0, len(seq) - 50))
            seq[lo:lo + int(rng.integers(5, 30))] = ord("N")
        for _ in range(10):
            lo = int(rng.integers(0, len(seq) - 200))
            hi = lo + int(rng.integers(20, 200))
            seq[lo:hi] = np.frombuffer(seq[lo:hi].tobytes().lower(), dtype=np.uint8)
    fasta = folder / "genome.fa"
    with open(fasta, "w") as handle:
        for name, seq in seqs.items():
            handle.write(f">{name}\n")
            text = seq.tobytes().decode()
            for i in range(0, len(text), 60):
                handle.write(text[i:i + 60] + "\n")
    bed = folder / "peaks.narrowPeak"
    with open(bed, "w") as handle:
        for i, (name, start, end, summit) in enumerate(rows):
            handle.write(f"{name}\t{start}\t{end}\tpeak{i}\t500\t.\t5.0\t10.0\t8.0\t{summit}\n")
    return fasta, bed


def training_set(n: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(one-hot (n, 4, length) float32, target (n, 1) float32) for the shipped model.

    The target is a BPNet-style log count: it rises with the GATA sites of a sequence and,
    less, with its TAL1 E-boxes, so both motifs carry positive contributions.
    """
    rng = np.random.default_rng(seed)
    seqs = np.stack([random_dna(rng, length) for _ in range(n)])
    n_gata = rng.integers(0, 3, size=n)
    n_tal1 = rng.integers(0, 2, size=n)
    for i in range(n):
        positions = rng.choice(np.arange(0, length - 8, 10), size=n_gata[i] + n_tal1[i], replace=False)
        for j, pos in enumerate(positions):
            _implant(seqs[i], int(pos), GATA if j < n_gata[i] else TAL1, rng)
    codes = np.full(256, 4, dtype=np.intp)
    for i, b in enumerate(b"ACGT"):
        codes[b] = i
    onehot = np.eye(5, 4, dtype=np.float32)[codes[seqs]].transpose(0, 2, 1)
    target = (1.0 + 1.0 * n_gata + 0.5 * n_tal1 + 0.05 * rng.normal(size=n)).astype(np.float32)
    return np.ascontiguousarray(onehot), target[:, None]

"""One-hot DNA helpers for attribution: encoding, shuffled references, hypothetical scores.

DeepLIFT needs a reference input. For DNA the usual choice is a set of dinucleotide
shuffles of each sequence: they keep the local composition (GC content, CpG) that the
model may legitimately respond to, and destroy the motifs we want to find. The scores
are then averaged over the references and, for TF-MoDISco, turned into *hypothetical*
contributions: what each of the four bases would have received at each position.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["one_hot_encode", "decode", "dinucleotide_shuffle", "hypothetical_contributions",
           "explain_genome", "export_modisco"]


def one_hot_encode(sequences: str | Iterable[str], alphabet: str = "ACGT",
                   dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Encode equal-length strings as an (N, L, len(alphabet)) one-hot array.

    Matching is case-insensitive (soft-masked lower-case bases count). Letters outside
    the alphabet (N, gaps, IUPAC codes) become an all-zero row, so they add nothing to
    any contribution. A single string gives N = 1.
    """
    if isinstance(sequences, (str, bytes)):
        sequences = [sequences]
    seqs = [s.decode("ascii") if isinstance(s, bytes) else s for s in sequences]
    if not all(isinstance(s, str) for s in seqs):
        raise TypeError("one_hot_encode expects a string or an iterable of strings")
    k = len(alphabet)
    if k == 0 or len(set(alphabet.upper())) != k:
        raise ValueError(f"alphabet must be non-empty with distinct letters, got {alphabet!r}")
    if not seqs:
        return np.zeros((0, 0, k), dtype=dtype)
    length = len(seqs[0])
    bad = [i for i, s in enumerate(seqs) if len(s) != length]
    if bad:
        raise ValueError(f"all sequences must have the same length ({length}); "
                         f"sequence {bad[0]} has length {len(seqs[bad[0]])}")
    table = np.full(256, k, dtype=np.intp)  # index k = "not in the alphabet" -> zero row
    for i, letter in enumerate(alphabet.upper()):
        table[ord(letter)] = i
        table[ord(letter.lower())] = i
    try:
        codes = np.frombuffer("".join(seqs).encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError as exc:
        raise ValueError("sequences must be ASCII text") from exc
    tokens = table[codes].reshape(len(seqs), length)
    return np.eye(k + 1, k, dtype=dtype)[tokens]


def decode(onehot: np.ndarray, alphabet: str = "ACGT", unknown: str = "N") -> str | list[str]:
    """Turn a one-hot array back into text: (L, K) gives a str, (N, L, K) a list of str.

    All-zero rows decode to `unknown`; a row with several non-zeros decodes to its argmax.
    """
    x = np.asarray(onehot)
    if x.ndim not in (2, 3) or x.shape[-1] != len(alphabet):
        raise ValueError(f"expected shape (L, {len(alphabet)}) or (N, L, {len(alphabet)}), "
                         f"got {x.shape}")
    letters = np.frombuffer((alphabet + unknown[:1]).encode("ascii"), dtype="S1")
    tokens = np.where(np.any(x != 0, axis=-1), np.argmax(x, axis=-1), len(alphabet))
    chars = letters[tokens]
    if x.ndim == 2:
        return chars.tobytes().decode("ascii")
    return [row.tobytes().decode("ascii") for row in chars]


# --------------------------------------------------------------------------------------
# Dinucleotide shuffle
# --------------------------------------------------------------------------------------

_TREE_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _parent_functions(k: int) -> tuple[np.ndarray, np.ndarray]:
    """All maps g: {0..k-1} -> {0..k-1} as rows of G, and g iterated k times.

    A last-exit assignment is a tree towards the root r iff iterating it from every
    vertex ends at r; k iterations suffice on k vertices.
    """
    if k not in _TREE_CACHE:
        grids = np.meshgrid(*([np.arange(k)] * k), indexing="ij")
        funcs = np.stack([g.ravel() for g in grids], axis=1)  # (k**k, k)
        power = np.tile(np.arange(k), (len(funcs), 1))
        for _ in range(k):
            power = np.take_along_axis(funcs, power, axis=1)
        _TREE_CACHE[k] = (funcs, power)
    return _TREE_CACHE[k]


def _sample_last_exits(counts: np.ndarray, first: np.ndarray, last: np.ndarray,
                       tree_uniforms: np.ndarray) -> np.ndarray:
    """Sample each vertex's last exit for every (sequence, shuffle): (N, S, k) targets.

    The last exits of an Eulerian path form a spanning arborescence towards the final
    letter. Drawing the arborescence with probability proportional to the product of
    its edge multiplicities, then ordering the remaining exits uniformly, gives every
    sequence with the same dinucleotide counts the same probability (Kandel et al.
    1996). With at most 5 letters the arborescences are few, so they are enumerated
    and weighted exactly instead of drawn by rejection. `tree_uniforms` (N, S) are the
    uniform draws, one per shuffle.
    """
    n, k, _ = counts.shape
    n_shuffles = tree_uniforms.shape[1]
    funcs, power = _parent_functions(k)
    present = counts.sum(axis=2) > 0  # vertices with an exit; the root has none left over
    present[np.arange(n), first] = True
    nf = len(funcs)
    out = np.empty((n, n_shuffles, k), dtype=np.intp)
    chunk = max(1, (1 << 22) // (nf * k))
    verts = np.arange(k)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        c, pres, root = counts[lo:hi].astype(np.float64), present[lo:hi], last[lo:hi]
        free = pres & (verts[None, :] != root[:, None])  # vertices whose last exit is drawn
        factor = np.where(free[:, :, None], c, np.eye(k)[None])  # (b, k, k)
        w = np.prod(factor[:, verts[None, :], funcs], axis=2)  # (b, F)
        ok = np.all(~pres[:, None, :] | (power[None] == root[:, None, None]), axis=2)
        w *= ok
        cw = np.cumsum(w, axis=1)
        cw /= cw[:, -1:]
        b = hi - lo
        flat = (cw + np.arange(b)[:, None]).ravel()
        q = tree_uniforms[lo:hi] + np.arange(b)[:, None]
        pick = np.searchsorted(flat, q.ravel(), side="right").reshape(b, n_shuffles)
        pick = np.minimum(pick - np.arange(b)[:, None] * nf, nf - 1)
        out[lo:hi] = funcs[pick]
    return out


def _draw_uniforms(rngs, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """(n, *shape) uniforms: from one Generator, or row i from the i-th of a list of them."""
    if isinstance(rngs, np.random.Generator):
        return rngs.random((n,) + shape)
    return np.stack([g.random(shape) for g in rngs]) if n else np.empty((0,) + shape)


def _shuffle_tokens(tokens: np.ndarray, k: int, n_shuffles: int, rngs) -> np.ndarray:
    """Dinucleotide shuffles of integer sequences (N, L) in 0..k-1 -> (N, S, L).

    After the last-exit tree, the walk draws each next letter from an urn: at letter u
    it takes one of u's unused non-last exits with probability proportional to their
    counts, and u's last exit only when none is left. That is a uniformly random order
    of each letter's exits with the tree's exit last, drawn lazily, so the walk needs
    only (N*S, k, k) counts and one uniform per step, never a sort over the sequence.
    """
    n, length = tokens.shape
    s = n_shuffles
    out = np.empty((n, s, length), dtype=tokens.dtype)
    if length <= 2 or n == 0:
        out[:] = tokens[:, None, :]
        return out
    tree_u = _draw_uniforms(rngs, n, (s,))
    step_u = _draw_uniforms(rngs, n, (s, length - 1))
    counts = np.zeros((n, k, k), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), length - 1), tokens[:, :-1].ravel(),
                       tokens[:, 1:].ravel()), 1)
    first, last = tokens[:, 0], tokens[:, -1]
    parent = _sample_last_exits(counts, first, last, tree_u)  # (N, S, k)

    rows = n * s
    outdeg = counts.sum(axis=2)
    has_last = (outdeg > 0) & (np.arange(k)[None, :] != last[:, None])  # (N, k)
    remaining = np.repeat(counts, s, axis=0)  # (rows, k, k): unused non-last exits
    parent = parent.reshape(rows, k)
    r_idx, u_idx = np.nonzero(np.repeat(has_last, s, axis=0))
    remaining[r_idx, u_idx, parent[r_idx, u_idx]] -= 1
    # Position-major layouts keep every per-step read and write contiguous: the urn
    # counts as (destination, row * k + source), the uniforms and the path as (L, rows).
    remaining = np.ascontiguousarray(remaining.reshape(rows * k, k).T)
    parent = parent.ravel()
    uniforms = np.ascontiguousarray(step_u.reshape(rows, length - 1).T)
    row_k = np.arange(rows) * k
    cur = np.repeat(first, s)
    path = np.empty((length, rows), dtype=tokens.dtype)
    path[0] = cur
    for j in range(1, length):
        slot = row_k + cur
        cum = np.cumsum(remaining[:, slot], axis=0)  # (k, rows)
        total = cum[-1]
        pick = np.minimum((cum <= uniforms[j - 1] * total).sum(axis=0), k - 1)
        urn = total > 0
        cur = np.where(urn, pick, parent[slot])
        remaining[cur, slot] -= urn
        path[j] = cur
    out[:] = path.T.reshape(n, s, length)
    return out


def dinucleotide_shuffle(onehot: np.ndarray, n_shuffles: int = 1,
                         seed: int | np.random.Generator | None = None,
                         axis: int = -1, *, seeds: Sequence | None = None) -> np.ndarray:
    """Dinucleotide-preserving shuffles of one-hot sequences, for use as references.

    Each shuffle keeps the first and last letter and the exact count of every
    dinucleotide of its sequence (Altschul & Erickson 1985): a random Eulerian path
    through the graph of letter transitions, built from a random last-exit spanning
    tree. Unlike the deeplift and tangermeme implementations, which always reuse the
    original sequence's last exits, the tree is drawn with its exact probability, so
    every sequence with the same dinucleotide counts is equally likely.

    Parameters
    ----------
    onehot : array, (N, L, K) or (L, K)
        One-hot sequences; all-zero rows (N bases) are kept as a letter of their own.
    n_shuffles : int
        Shuffles per sequence.
    seed : int, numpy Generator or None
        Same seed, same shuffles.
    axis : int
        Axis of the alphabet within a sequence: -1 for (.., L, K), -2 for (.., K, L).
    seeds : sequence of N ints or SeedSequence-style entropy, optional
        One seed per sequence instead of `seed`: sequence i's shuffles then depend on
        ``seeds[i]`` alone, whatever batch it is shuffled in (the genome pipeline uses
        ``(seed, region index)`` so that chunking never changes the references).

    Returns
    -------
    array, (N, n_shuffles, L, K) (or (N, n_shuffles, K, L) for ``axis=-2``), input dtype.
    """
    x = np.asarray(onehot)
    if x.ndim not in (2, 3):
        raise ValueError(f"expected one-hot sequences of shape (N, L, K) or (L, K), got {x.shape}")
    if axis not in (-1, -2, x.ndim - 1, x.ndim - 2) or (x.ndim == 3 and axis == 0):
        raise ValueError(f"axis must name one of the last two axes (-1 or -2), got {axis}")
    if int(n_shuffles) != n_shuffles or n_shuffles < 1:
        raise ValueError(f"n_shuffles must be a positive integer, got {n_shuffles!r}")
    n_shuffles = int(n_shuffles)
    channels_first = axis in (-2, x.ndim - 2)
    seqs = x[None] if x.ndim == 2 else x
    if channels_first:
        seqs = np.swapaxes(seqs, 1, 2)
    nonzero = seqs != 0
    if not np.all((seqs == 0) | (seqs == 1)) or np.any(nonzero.sum(axis=2) > 1):
        raise ValueError("dinucleotide_shuffle needs one-hot input: entries 0/1 and at most "
                         "one 1 per position (check `axis` if the alphabet axis comes first)")
    k = seqs.shape[2]
    tokens = np.where(nonzero.any(axis=2), nonzero.argmax(axis=2), k).astype(np.int8)
    n_letters = k + 1 if np.any(tokens == k) else k
    if n_letters > 6:
        raise ValueError(f"alphabet of {k} letters is too large for the exact tree sampler "
                         "(at most 5 letters plus N)")
    if seeds is not None:
        if seed is not None:
            raise ValueError("pass either seed or seeds, not both")
        seeds = list(seeds)
        if len(seeds) != len(tokens):
            raise ValueError(f"seeds must hold one seed per sequence ({len(tokens)}), got {len(seeds)}")
        rngs = [np.random.default_rng(sd) for sd in seeds]
        pick = lambda lo, hi: rngs[lo:hi]  # noqa: E731
    else:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        pick = lambda lo, hi: rng  # noqa: E731
    # Chunks of sequences bound the (n, S, L) working arrays to a few tens of MB.
    step = max(1, (1 << 23) // (n_shuffles * max(tokens.shape[1], 1)))
    shuffled = np.concatenate([_shuffle_tokens(tokens[i:i + step], n_letters, n_shuffles,
                                               pick(i, i + step))
                               for i in range(0, max(len(tokens), 1), step)])
    result = (shuffled[..., None] == np.arange(k, dtype=shuffled.dtype)).astype(x.dtype)  # (N, S, L, K)
    if channels_first:
        result = np.swapaxes(result, 2, 3)
    return np.ascontiguousarray(result)


# --------------------------------------------------------------------------------------
# Hypothetical contributions
# --------------------------------------------------------------------------------------

def hypothetical_contributions(multipliers, references, axis: int = -1, *, inputs=None, target=None,
                               **options) -> np.ndarray:
    r"""Contributions each base would get if it were the one present (TF-MoDISco's input).

    With one-hot input x, reference r and DeepLIFT multipliers m (with respect to
    the input, all K bases at every position), the hypothetical contribution of base
    b at position i is

    .. math::  h_{i,b} = \sum_{b'} m_{i,b'}\,(e_b[b'] - r_{i,b'})
                       = m_{i,b} - \sum_{b'} m_{i,b'}\, r_{i,b'},

    averaged over references when several are given. The actual contributions are
    ``h * x`` (summed over bases: ``sum_b' m (x - r)``, which holds for one-hot x). It
    reuses the multipliers computed for the base that is present, the same linear
    approximation as deeplift's and tangermeme's ``hypothetical`` functions (same
    formula; they take one sequence's references at a time).

    Two ways to call it:

    - ``hypothetical_contributions(explainer, references, inputs=x, target=t)``: a
      `liftir.Explainer` with method "deeplift" or "deeplift_shap" computes the
      multipliers through its public ``attribution_func`` hook, pair by pair under its
      memory budget (``max_memory=``, ``batch_size=`` and other ``attribute`` options go
      in `options`), so the (N, R, L, K) multipliers are never all held at once.
      ``references`` are the baselines of ``Explainer.attribute``: (R, L, K) shared,
      (N, R, L, K) per sequence (e.g. `dinucleotide_shuffle`) for DeepLIFT-SHAP.
    - ``hypothetical_contributions(m, references)`` with multipliers already at hand
      (e.g. ``explainer.attribute(x, r, multiply_by_inputs=False)`` for one reference).

    Parameters
    ----------
    multipliers : array, (N, L, K) or (N, R, L, K), or a liftir.Explainer
        Multipliers, one set per reference when R is present.
    references : array or float
        Broadcastable to ``multipliers`` ((N, R, L, K), (R, L, K), (L, K), a scalar
        such as 0.25, ...).
    axis : int
        Alphabet axis: -1 for (.., L, K), -2 for (.., K, L).
    inputs, target, options : with an Explainer: the one-hot inputs (N, L, K), the
        target and further options of ``Explainer.attribute``.

    Returns
    -------
    array, (N, L, K) (or (N, K, L) for ``axis=-2``); (N, T, L, K) for several targets.
    """
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 or -2, got {axis}")
    if hasattr(multipliers, "attribute") and hasattr(multipliers, "method"):
        if inputs is None:
            raise ValueError("with an Explainer, pass the one-hot sequences as inputs=")
        return multipliers.attribute(inputs, references, target, attribution_func=_hypothetical(axis), **options)
    if inputs is not None or target is not None or options:
        raise ValueError("inputs=, target= and other options go with an Explainer, not with multipliers")
    m = np.asarray(multipliers)
    if m.ndim not in (3, 4):
        raise ValueError(f"multipliers must have shape (N, L, K) or (N, R, L, K), got {m.shape}")
    ref = np.asarray(references, dtype=np.result_type(m.dtype, np.float32))
    try:
        ref = np.broadcast_to(ref, np.broadcast_shapes(ref.shape, m.shape))
    except ValueError as exc:
        raise ValueError(f"references of shape {ref.shape} do not broadcast to multipliers "
                         f"of shape {m.shape}") from exc
    if ref.shape != m.shape:
        raise ValueError(f"references of shape {ref.shape} would enlarge the multipliers "
                         f"of shape {m.shape}; pass one multiplier set per reference")
    hyp = _hypothetical(axis)(m, None, ref)
    if m.ndim == 4:
        hyp = hyp.mean(axis=1)
    return hyp


def _hypothetical(axis: int):
    """m, x, r -> m - sum over the alphabet of m * r: an `attribution_func` (NumPy or CuPy)."""
    def combine(m, x, reference):
        return m - (m * reference).sum(axis=axis, keepdims=True)
    return combine

# --------------------------------------------------------------------------------------
# Genome-scale pipeline (needs the `genome` extra; imported on first use)
# --------------------------------------------------------------------------------------

def explain_genome(model, **options):
    """Explain every region of a BED on a FASTA into a Zarr store; see
    `liftir.genome.pipeline.explain_genome` for the options. Imported lazily so that
    `liftir.genomics` works without pyfaidx, zarr and dask."""
    from .genome.pipeline import explain_genome as run
    return run(model, **options)


def export_modisco(store: str, out_dir: str) -> tuple[str, str]:
    """TF-MoDISco's ohe.npz and shap.npz from a finished genome store (lazy import)."""
    from .genome.store import export_modisco as export
    return export(store, out_dir)

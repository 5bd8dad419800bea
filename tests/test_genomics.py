"""One-hot encoding, exact dinucleotide shuffles, hypothetical contributions, examples."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from liftir.genomics import (decode, dinucleotide_shuffle, hypothetical_contributions,
                             one_hot_encode)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dinuc_counts(tokens, k=5):
    """(..., L) integer sequences -> (..., k*k) dinucleotide counts."""
    idx = tokens[..., :-1] * k + tokens[..., 1:]
    return (idx[..., None] == np.arange(k * k)).sum(axis=-2)


def _tokens(onehot):
    return np.where(onehot.any(-1), onehot.argmax(-1), 4)


def _random_seqs(rng, n, length):
    return ["".join(rng.choice(list("ACGT"), length)) for _ in range(n)]


# -- encoding ---------------------------------------------------------------------------

def test_one_hot_encode_and_decode_roundtrip():
    x = one_hot_encode(["ACGTN", "acgtg"])
    assert x.shape == (2, 5, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, :4], np.eye(4))
    assert not x[0, 4].any()  # N is an all-zero row
    np.testing.assert_array_equal(x[1], np.eye(4)[[0, 1, 2, 3, 2]])
    assert decode(x) == ["ACGTN", "ACGTG"]
    assert decode(x[0]) == "ACGTN"
    assert one_hot_encode("GATTACA").shape == (1, 7, 4)
    assert one_hot_encode("ACGU", alphabet="ACGU", dtype=np.int8)[0].sum() == 4


def test_one_hot_encode_errors():
    with pytest.raises(ValueError, match="same length"):
        one_hot_encode(["ACG", "AC"])
    with pytest.raises(ValueError, match="alphabet"):
        one_hot_encode("ACG", alphabet="AAC")


# -- dinucleotide shuffle ---------------------------------------------------------------

def test_shuffle_preserves_dinucleotides_exactly():
    rng = np.random.default_rng(1)
    seqs = _random_seqs(rng, 30, 200)
    seqs[0] = "N" * 5 + seqs[0][5:100] + "NN" + seqs[0][102:]  # N runs are kept as a letter
    seqs[1] = "A" * 150 + "C" * 50  # almost no freedom
    x = one_hot_encode(seqs)
    s = dinucleotide_shuffle(x, n_shuffles=7, seed=3)
    assert s.shape == (30, 7, 200, 4) and s.dtype == x.dtype
    tx, ts = _tokens(x), _tokens(s)
    np.testing.assert_array_equal(_dinuc_counts(ts), np.repeat(_dinuc_counts(tx)[:, None], 7, 1))
    np.testing.assert_array_equal(ts[:, :, 0], np.repeat(tx[:, None, 0], 7, 1))
    np.testing.assert_array_equal(ts[:, :, -1], np.repeat(tx[:, None, -1], 7, 1))
    assert np.all(s.sum(-1) <= 1)
    # Random sequences are actually shuffled (mostly different from the original).
    assert (ts[2:] != tx[2:, None]).mean() > 0.5


def test_shuffle_is_reproducible_and_layouts_agree():
    x = one_hot_encode(_random_seqs(np.random.default_rng(2), 4, 50))
    a = dinucleotide_shuffle(x, 3, seed=11)
    np.testing.assert_array_equal(a, dinucleotide_shuffle(x, 3, seed=11))
    assert not np.array_equal(a, dinucleotide_shuffle(x, 3, seed=12))
    np.testing.assert_array_equal(a, dinucleotide_shuffle(x, 3, seed=np.random.default_rng(11)))
    b = dinucleotide_shuffle(x.transpose(0, 2, 1), 3, seed=11, axis=-2)
    np.testing.assert_array_equal(b, a.transpose(0, 1, 3, 2))
    c = dinucleotide_shuffle(x[0], 3, seed=5)
    assert c.shape == (1, 3, 50, 4)


def test_shuffle_per_sequence_seeds_do_not_depend_on_the_batch():
    """With seeds=, a sequence's shuffles depend on its own seed only (the genome
    pipeline's chunking guarantee), and they keep the dinucleotide counts."""
    x = one_hot_encode(_random_seqs(np.random.default_rng(4), 6, 80))
    seeds = [(7, i) for i in range(6)]
    whole = dinucleotide_shuffle(x, 4, seeds=seeds)
    parts = np.concatenate([dinucleotide_shuffle(x[:2], 4, seeds=seeds[:2]),
                            dinucleotide_shuffle(x[2:], 4, seeds=seeds[2:])])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(whole[3:4], dinucleotide_shuffle(x[3:4], 4, seeds=[(7, 3)]))
    assert not np.array_equal(whole[0], whole[1])
    np.testing.assert_array_equal(_dinuc_counts(_tokens(whole)),
                                  np.repeat(_dinuc_counts(_tokens(x))[:, None], 4, 1))
    with pytest.raises(ValueError, match="one seed per sequence"):
        dinucleotide_shuffle(x, 2, seeds=seeds[:3])
    with pytest.raises(ValueError, match="either seed or seeds"):
        dinucleotide_shuffle(x, 2, seed=1, seeds=seeds)


def test_shuffle_is_uniform_over_all_sequences_with_the_same_dinucleotides():
    """Every sequence with the same counts is equally likely (chi-square test).

    'ACAACGACA' has 12 such sequences; keeping the original last exits (as deeplift and
    tangermeme do) reaches only 6 of them.
    """
    seq = "ACAACGACA"
    length = len(seq)
    tok = _tokens(one_hot_encode(seq))[0]
    every = np.stack(np.unravel_index(np.arange(4 ** length), (4,) * length), axis=1)
    same = (_dinuc_counts(every) == _dinuc_counts(tok)).all(1) & (every[:, 0] == tok[0])
    valid = every[same]
    assert len(valid) == 12
    draws = _tokens(dinucleotide_shuffle(one_hot_encode(seq), 24000, seed=0)[0])
    codes = draws @ (4 ** np.arange(length)[::-1])
    valid_codes = valid @ (4 ** np.arange(length)[::-1])
    assert np.isin(codes, valid_codes).all()
    freq = (codes[:, None] == valid_codes[None]).sum(0)
    expected = len(draws) / len(valid)
    chi2 = ((freq - expected) ** 2 / expected).sum()
    assert chi2 < 31.3  # 99.9 % quantile of chi-square with 11 degrees of freedom


def test_shuffle_edge_cases_and_errors():
    x = one_hot_encode(["AC", "GG"])
    np.testing.assert_array_equal(dinucleotide_shuffle(x, 2, seed=0), np.stack([x, x], 1))
    homo = one_hot_encode("TTTTTTTT")
    np.testing.assert_array_equal(dinucleotide_shuffle(homo, 2, seed=0)[0, 1], homo[0])
    with pytest.raises(ValueError, match="one-hot"):
        dinucleotide_shuffle(np.full((1, 10, 4), 0.25))
    with pytest.raises(ValueError, match="n_shuffles"):
        dinucleotide_shuffle(x, 0)
    with pytest.raises(ValueError, match="shape"):
        dinucleotide_shuffle(np.zeros(4))


# -- hypothetical contributions ---------------------------------------------------------

def _hyp_loop(m, ref):
    """The definition, written out: one hypothetical one-hot base at a time."""
    out = np.zeros(m.shape)
    for b in range(m.shape[-1]):
        e = np.zeros(m.shape[-1])
        e[b] = 1.0
        out[..., b] = np.sum(m * (e - ref), axis=-1)
    return out


def test_hypothetical_contributions_formula_and_identity():
    rng = np.random.default_rng(4)
    x = one_hot_encode(_random_seqs(rng, 3, 25))
    refs = dinucleotide_shuffle(x, 5, seed=1)  # (N, R, L, 4)
    m = rng.normal(size=refs.shape)
    hyp = hypothetical_contributions(m, refs)
    assert hyp.shape == (3, 25, 4)
    np.testing.assert_allclose(hyp, _hyp_loop(m, refs).mean(1), atol=1e-6)
    # Actual contributions: hyp * x summed over bases == mean_r sum_b' m (x - ref).
    actual = (hyp * x).sum(-1)
    np.testing.assert_allclose(actual, (m * (x[:, None] - refs)).sum(-1).mean(1), atol=1e-6)


def test_hypothetical_contributions_broadcasting_and_layout():
    rng = np.random.default_rng(5)
    m = rng.normal(size=(2, 10, 4))
    np.testing.assert_allclose(hypothetical_contributions(m, 0.25),
                               m - m.sum(-1, keepdims=True) / 4)
    np.testing.assert_allclose(hypothetical_contributions(m, 0.0), m)
    ref = np.eye(4)[rng.integers(0, 4, 10)]  # one (L, 4) reference shared by all
    a = hypothetical_contributions(m, ref)
    b = hypothetical_contributions(m.transpose(0, 2, 1), ref.T, axis=-2)
    np.testing.assert_allclose(b, a.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="broadcast"):
        hypothetical_contributions(m, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="per reference"):
        hypothetical_contributions(m, np.zeros((5, 2, 10, 4)))


# -- examples/genomics ------------------------------------------------------------------

def _load(name):
    path = ROOT / "examples" / "genomics" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulated_data_follows_the_paper():
    sim = _load("simulate")
    x, y, motifs = sim.simulate(300, seed=0)
    assert x.shape == (300, 200, 4) and set(np.unique(y)) == {0, 1}
    np.testing.assert_array_equal(x.sum(-1), 1)
    for i in range(300):
        kinds = [name for name, _, _ in motifs[i]]
        if y[i] == 1:
            assert {"GATA", "TAL1"} <= set(kinds)
        else:
            assert len(set(kinds)) == 1 and 1 <= len(kinds) <= 2
        spans = sorted((s, e) for _, s, e in motifs[i])
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # no overlaps
    # The cores are mostly the consensus: GATA inside GATA instances.
    seqs = decode(x)
    gata = [seqs[i][s:e] for i in range(300) for n, s, e in motifs[i] if n == "GATA"]
    assert np.mean(["GATA" in g for g in gata]) > 0.6
    x2, y2, _ = sim.simulate(300, seed=0)
    np.testing.assert_array_equal(x, x2)


def test_motif_auroc():
    score = _load("score")
    motifs = [[("GATA", 10, 16)], [("TAL1", 30, 40), ("GATA", 50, 56)]]
    s = np.zeros((2, 100))
    s[0, 10:16] = 1.0
    s[1, 50:56] = 2.0
    s[1, 30:40] = -3.0
    out = score.motif_auroc(s, motifs)
    assert out["GATA"] == pytest.approx(1.0)
    assert out["TAL1"] == pytest.approx(1.0)  # |score| by default
    assert score.motif_auroc(s, motifs, use_abs=False)["TAL1"] == pytest.approx(0.0)
    assert score.motif_auroc(np.zeros((2, 100)), motifs)["GATA"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 300), rng.normal(0, 1, 400)
    brute = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert score.auroc(pos, neg) == pytest.approx(brute)

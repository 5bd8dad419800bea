"""Memory by default: passes under `max_memory`, the same numbers however the work is cut,
public multipliers (Captum's multiply_by_inputs=False) and hypothetical contributions on them.

Memory is tested without timings: with tracemalloc (NumPy reports its allocations to it) on
models the rules run in float64 on NumPy, and through the pass sizes chosen (`last_pass`).
"""
from __future__ import annotations

import inspect
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from captum.attr import DeepLift, DeepLiftShap, InputXGradient, IntegratedGradients
from onnx import helper

import attr_refs as R
import liftir
from liftir.diagnostics import ConvergenceWarning
from liftir.errors import InputError
from liftir.genomics import dinucleotide_shuffle, hypothetical_contributions, one_hot_encode
from liftir.memory import DEFAULT_MAX_MEMORY, MemoryBudgetWarning, RowCost, parse_memory, plan_pass
from onnx_builders import model as build_model
from test_deeplift_shap import _dna_model

N = 3
TARGETS = [5, 1, 3]


def _peak(fn):
    """(result, peak bytes traced while fn runs)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tiny(ex, *args, **kw):
    """attribute with a budget below one row: one row and one target per pass, with a warning."""
    with pytest.warns(MemoryBudgetWarning, match="one"):
        out = ex.attribute(*args, max_memory=1, **kw)
    assert ex.last_pass.rows == 1 and ex.last_pass.targets == 1
    return out


# --------------------------------------------------------------------------- the budget itself

def test_parse_memory():
    assert parse_memory(None) is None
    assert parse_memory(1000) == 1000
    assert parse_memory("1GiB") == 1024 ** 3 == DEFAULT_MAX_MEMORY
    assert inspect.signature(liftir.Explainer.attribute).parameters["max_memory"].default == DEFAULT_MAX_MEMORY
    assert parse_memory("512 MiB") == 512 * 1024 ** 2
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("1e3") == 1000
    for bad in ("lots", "-1GB", 0, -5, True, [1], "2 parsecs"):
        with pytest.raises(InputError, match="max_memory"):
            parse_memory(bad)


def test_plan_pass_shrinks_rows_then_targets():
    cost = RowCost(activations=1000, largest=100)
    # one pass of r rows and k targets: r * 1000 + r * k * 4 * 100 bytes
    assert plan_pass(None, cost, 50, 7).rows == 50
    assert plan_pass(10 ** 9, cost, 50, 7) .rows == 50
    size = plan_pass(20_000, cost, 50, 7)
    assert (size.rows, size.targets) == (5, 7) and size.estimate <= 20_000
    size = plan_pass(3_000, cost, 50, 7)  # one row with every target (3800) is too much
    assert (size.rows, size.targets) == (1, 5) and size.estimate <= 3_000
    with pytest.warns(MemoryBudgetWarning):
        assert plan_pass(1_200, cost, 50, 7).rows == 1


def test_bad_max_memory_changes_nothing():
    ex = R.explainer("convpool")  # shared with other tests: compare with what it held before
    before = ex.last_pass
    x, x0 = R.inputs("convpool", 2, 1), R.inputs("convpool", 2, 2)
    with pytest.raises(InputError, match="max_memory"):
        ex.attribute(x, x0, target=1, max_memory="a lot")
    assert ex.last_pass is before


# --------------------------------------------------------------------------- same numbers

@pytest.mark.parametrize("method", ["deeplift", "deeplift_revealcancel", "saliency", "guided_backprop"])
def test_one_sample_one_target_per_pass_equals_one_pass(method):
    """target="all" and per-sample targets, cut down to one sample and one target per pass."""
    x, x0 = R.inputs("convpool", N, 1), R.inputs("convpool", N, 2)
    base = x0 if method.startswith("deeplift") else None
    ex = R.explainer("convpool", method=method)
    for target in ("all", TARGETS):
        a, d = ex.attribute(x, base, target=target, max_memory=None, return_convergence_delta=True)
        assert ex.last_pass.passes == 1
        b, e = _tiny(ex, x, base, target=target, return_convergence_delta=True)
        k = 6 if target == "all" else 1  # convpool has 6 classes
        assert ex.last_pass.passes == N and b.shape == a.shape
        R.assert_close(b, a, f"{method} {target} chunked", tol=1e-6)
        if method == "deeplift":  # summation-to-delta, chunked or not
            assert np.abs(e).max() < 1e-5 and np.abs(d).max() < 1e-5
            assert e.shape == ((N, k) if target == "all" else (N,))
        elif method == "deeplift_revealcancel":
            np.testing.assert_allclose(e, d, atol=1e-5)
            assert np.abs(e).max() < 1e-4


def test_bad_target_of_a_later_sample_fails_before_any_pass():
    ex = R.explainer("convpool")  # shared with other tests: compare with what it held before
    before = ex.last_pass
    x, x0 = R.inputs("convpool", N, 1), R.inputs("convpool", N, 2)
    with pytest.raises(InputError, match="out of range"):
        ex.attribute(x, x0, target=[0, 1, 99], max_memory=1)
    with pytest.raises(InputError, match=r"-9 at position \(2, 1\) is negative"):
        ex.attribute(x, x0, target=np.array([[0, 1], [2, 3], [4, -9]]), max_memory=1)
    assert ex.last_pass is before


def test_layer_attribution_chunked():
    x, x0 = R.inputs("convpool", N, 1), R.inputs("convpool", N, 2)
    ex = R.explainer("convpool")
    layer = R.tensor_of(R.proto("convpool"), "Relu", 1)
    a, d = ex.attribute(x, x0, target=TARGETS, layer=layer, max_memory=None, return_convergence_delta=True)
    b, e = _tiny(ex, x, x0, target=TARGETS, layer=layer, return_convergence_delta=True)
    R.assert_close(b, a, "layer chunked", tol=1e-6)
    assert np.abs(d).max() < 1e-5 and np.abs(e).max() < 1e-5


@pytest.mark.parametrize("own", [False, True], ids=["shared-refs", "own-refs"])
def test_deeplift_shap_references_split_across_passes(own):
    """A budget below one sample's 5 references splits them over passes (sample-major
    pairs; the mean is taken once all of a sample's pairs are in)."""
    x = R.inputs("convpool", N, 1)
    refs = R.inputs("convpool", 5 * (N if own else 1), 3)
    refs = refs.reshape((N, 5) + x.shape[1:]) if own else refs
    ex = R.explainer("convpool", method="deeplift_shap")
    a, d = ex.attribute(x, refs, target=TARGETS, max_memory=None, return_convergence_delta=True)
    cost = ex._row_costs[next(iter(ex._row_costs))][0]
    per_pair = 3.3 + 1 / 5  # forward rows a pair costs (see liftir/pass_loops.py, PassLoops._run_pairs)
    for budget, pairs in ((1, 1), (int(2.5 * (per_pair * cost.activations + 4 * cost.largest)), 2),
                          (int(10.5 * (per_pair * cost.activations + 4 * cost.largest)), 10)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MemoryBudgetWarning)
            b, e = ex.attribute(x, refs, target=TARGETS, max_memory=budget, return_convergence_delta=True)
        assert ex.last_pass.unit == "pair" and ex.last_pass.rows == pairs
        R.assert_close(b, a, f"shap own={own} {pairs} pairs per pass", tol=1e-6)
        assert np.abs(e).max() < 1e-5 and np.abs(d).max() < 1e-5
    ab = ex.attribute(x, refs, target="all", max_memory=None)
    bb = _tiny(ex, x, refs, target="all")
    R.assert_close(bb, ab, "shap all targets chunked", tol=1e-6)


def test_integrated_gradients_points_split_across_passes():
    """Points of the path summed in order, however they are grouped: the same to round-off."""
    x, x0 = R.inputs("convpool", N, 1), R.inputs("convpool", N, 2)
    ex = R.explainer("convpool", method="integrated_gradients")
    for target in (TARGETS, "all"):
        a, d = ex.attribute(x, x0, target=target, n_steps=7, max_memory=None, return_convergence_delta=True)
        b, e = _tiny(ex, x, x0, target=target, n_steps=7, return_convergence_delta=True)
        assert ex.last_pass.unit == "point of the path" and ex.last_pass.passes == N * 7
        R.assert_close(b, a, f"ig {target} chunked", tol=1e-6)
        np.testing.assert_allclose(e, d, rtol=0, atol=1e-6 * max(1.0, np.abs(d).max()))
    c = ex.attribute(x, x0, target=TARGETS, n_steps=7, internal_batch_size=5)
    R.assert_close(c, ex.attribute(x, x0, target=TARGETS, n_steps=7), "ig internal_batch_size", tol=1e-6)


# --------------------------------------------------------------------------- memory, measured

def _wide_mlp(width: int = 4096):
    """x (N, 8) -> Gemm -> Relu -> Gemm -> y (N, 3), in float64 (the rules on NumPy, all
    allocations visible to tracemalloc)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, width)), rng.standard_normal((width, 3)) / 64
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return build_model(nodes, {"x": (None, 8)}, {"y": np.float64}, {"w1": w1, "w2": w2},
                       input_dtypes={"x": np.float64})


def test_default_budget_bounds_peak_memory():
    """512 samples through a 4096-wide hidden layer: one pass keeps ~32 MiB of activations
    (and multipliers of the same size); a 4 MiB budget keeps the whole call under 12 MiB."""
    ex = liftir.Explainer(_wide_mlp(), precision="float64")
    x = np.random.default_rng(1).standard_normal((512, 8))
    (a, d), unbounded = _peak(lambda: ex.attribute(x, target=1, max_memory=None, return_convergence_delta=True))
    (b, e), bounded = _peak(lambda: ex.attribute(x, target=1, max_memory="4MiB", return_convergence_delta=True))
    assert 1 < ex.last_pass.rows < 512 and ex.last_pass.estimate <= 4 * 2 ** 20
    assert unbounded > 40 * 2 ** 20 and bounded < 12 * 2 ** 20, (unbounded, bounded)
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    assert np.abs(d).max() < 1e-10 and np.abs(e).max() < 1e-10


def test_target_all_on_many_outputs_is_chunked():
    """target="all" used to build a (K, N, K) float64 seed: 13.4 GiB for 30,000 outputs and
    N = 2, 1.5 GiB for the 10,000 here. Now targets go in chunks under the budget (the work
    still grows with K squared: seeds are dense), and each is exact: a = w_j * (x - x0)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 10_000)).astype(np.float32)
    ex = liftir.Explainer(build_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": (None, 4)}, ["y"], {"w": w}))
    x = rng.standard_normal((2, 4)).astype(np.float32)
    with warnings.catch_warnings():  # some of the 10,000 random outputs are near 0: their
        # contributions cancel and float32 round-off of exact attributions trips the delta warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        (a, delta), peak = _peak(lambda: ex.attribute(x, target="all", max_memory="64MiB",
                                                      return_convergence_delta=True))
    assert peak < 256 * 2 ** 20, peak
    assert 1 < ex.last_pass.targets < 10_000
    assert a.shape == (2, 10_000, 4) and delta.shape == (2, 10_000)
    np.testing.assert_allclose(a, w.T[None] * x[:, None], rtol=1e-6)
    assert np.abs(delta).max() < 1e-4 * np.abs(x @ w).max()


# --------------------------------------------------------------------------- public multipliers

def test_multipliers_match_captum_multiply_by_inputs_false():
    """multiply_by_inputs=False returns the multipliers, as Captum (float64) does, and
    multipliers * (x - x0) are the attributions."""
    key, t = "mlp", [4, 0, 2]
    x, x0 = R.inputs(key, N, 1), R.inputs(key, N, 2)
    refs = R.inputs(key, 6, 5)
    m64 = R.model64(key)
    cases = [
        ("deeplift", x0, {}, DeepLift(m64, multiply_by_inputs=False), {"baselines": R.t64(x0)}),
        ("deeplift_shap", refs, {}, DeepLiftShap(m64, multiply_by_inputs=False), {"baselines": R.t64(refs)}),
        ("integrated_gradients", x0, {"n_steps": 20}, IntegratedGradients(m64, multiply_by_inputs=False),
         {"baselines": R.t64(x0), "n_steps": 20}),
        ("input_x_gradient", None, {}, InputXGradient(m64), {}),
    ]
    for method, base, kw, algo, ckw in cases:
        ex = R.explainer(key, method=method)
        m, delta = ex.attribute(x, base, target=t, multiply_by_inputs=False, return_convergence_delta=True, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = algo.attribute(R.t64(x), target=t, **ckw).detach().numpy()
        if method == "input_x_gradient":
            c = c / x  # Captum has no multiplier-only InputXGradient: its gradient
        R.assert_close(m, c, f"{method} multipliers")
        a = ex.attribute(x, base, target=t, **kw)
        if method in ("deeplift", "integrated_gradients"):
            R.assert_close(m * (x - x0), a, f"{method} m * (x - x0)", tol=1e-6)
        if method in ("deeplift", "deeplift_shap"):
            assert np.abs(delta).max() < 1e-5  # delta still refers to m * (x - x0)


def test_multiplier_options_refused_where_undefined():
    x, x0 = R.inputs("mlp", 2, 1), R.inputs("mlp", 2, 2)
    with pytest.raises(InputError, match="RevealCancel"):
        R.explainer("mlp", method="deeplift_revealcancel").attribute(x, x0, target=1, multiply_by_inputs=False)
    with pytest.raises(InputError, match="attribution_func"):
        R.explainer("mlp", method="saliency").attribute(x, target=1, attribution_func=lambda m, a, b: m)
    with pytest.raises(InputError, match="callable"):
        R.explainer("mlp").attribute(x, x0, target=1, attribution_func=3)
    with pytest.raises(InputError, match="shape"):
        R.explainer("mlp").attribute(x, x0, target=1, attribution_func=lambda m, a, b: m[0])
    with pytest.raises(InputError, match="multiply_by_inputs"):
        R.explainer("mlp").attribute(x, x0, target=1, multiply_by_inputs="no")


def test_hypothetical_contributions_from_the_explainer():
    """hypothetical_contributions(explainer, refs, inputs=x) equals the formula applied to
    per-reference multipliers from the public API, and h * x sums to the DeepLIFT-SHAP
    attributions (which sum to f(x) - mean f(refs)), under any budget."""
    rng = np.random.default_rng(3)
    x = one_hot_encode(["".join(rng.choice(list("ACGT"), 30)) for _ in range(4)])
    refs = dinucleotide_shuffle(x, n_shuffles=5, seed=0)  # (N, B, L, 4)
    plain = liftir.Explainer(_dna_model())
    per_ref = np.stack([plain.attribute(x, refs[:, b], multiply_by_inputs=False) for b in range(5)], axis=1)
    want = hypothetical_contributions(per_ref, refs)
    shap = liftir.Explainer(_dna_model(), "deeplift_shap")
    hyp = hypothetical_contributions(shap, refs, inputs=x)
    assert hyp.shape == x.shape
    np.testing.assert_allclose(hyp, want, rtol=1e-5, atol=1e-6)
    with pytest.warns(MemoryBudgetWarning):
        tiny = hypothetical_contributions(shap, refs, inputs=x, max_memory=1)
    np.testing.assert_allclose(tiny, hyp, rtol=1e-6, atol=1e-7)
    attr, delta = shap.attribute(x, refs, return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-5
    np.testing.assert_allclose((hyp * x).sum(-1), attr.sum(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inputs="):
        hypothetical_contributions(shap, refs)
    with pytest.raises(ValueError, match="Explainer"):
        hypothetical_contributions(per_ref, refs, target=0)


def test_explainer_docstring_names_every_method():
    doc = liftir.Explainer.__doc__
    for name in liftir.methods.METHODS:
        assert f'"{name}"' in doc, name
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "## The rules, and where they differ from other tools" in readme and "## Memory" in readme
    assert "Max rules" not in doc

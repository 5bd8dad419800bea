"""What the interpreter's forward returns: the tensors its backward reads, no more.

A forward session that returns every tensor keeps onnxruntime from fusing (a ResNet's
residual Add into its convolution) and from reusing their buffers. The interpreter's pass
exposes what the same pass's trace reads (liftir/compile/compiler.py: forward_exposure),
which is also what the compiled pass exposes, so that the two engines keep computing the
same forward, bit for bit. A rule whose array code reads more than its trace falls back to
exposing every tensor, said in a log line, with the same results.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

import liftir
from liftir import scheduler


@pytest.fixture(scope="module")
def residual():
    """A BatchNorm ResNet block stack: convolutions whose outputs only an Add reads."""
    zoo = pytest.importorskip("zoo")
    net = zoo.build("residual_bn")
    proto = zoo.export(net, zoo.make_input("residual_bn", 2), None, dynamo=False)
    x = zoo.make_input("residual_bn", 3, seed=1).numpy()
    x0 = (np.random.default_rng(7).standard_normal(x.shape[1:]) * 0.1).astype(np.float32)
    return proto, x, x0


def _forward_tensors(ex) -> set[str]:
    explained = ex.explained_tensor(ex.output)[0]
    return {o for n in ex.plan.order_for((explained,)) if n not in ex.plan.static
            for o in ex.plan.graph.nodes[n].outputs if o}


@pytest.mark.parametrize("method", ["deeplift", "saliency", "deeplift_shap", "integrated_gradients",
                                    "deeplift_revealcancel"])
def test_the_interpreter_exposes_what_its_backward_reads_and_equals_the_compiled_engine(residual, method):
    proto, x, x0 = residual
    x0 = np.stack([x0, -x0]) if method == "deeplift_shap" else x0
    kwargs = {"n_steps": 8} if method == "integrated_gradients" else {}
    interp = liftir.Explainer(proto, method)
    comp = liftir.Explainer(proto, method, engine="compiled")
    a, da = interp.attribute(x, baselines=x0, target=2, return_convergence_delta=True, **kwargs)
    b, db = comp.attribute(x, baselines=x0, target=2, return_convergence_delta=True, **kwargs)
    exposures = list(interp._exposures.values())
    assert exposures and all(e is not None for e in exposures)
    every = _forward_tensors(interp)
    for exposed in exposures:
        assert interp.output in exposed or interp.explained_tensor(interp.output)[0] in exposed
        assert len(exposed & every) < len(every)  # the convolutions' outputs before their Adds stay inside
    compiled_outputs = {o.name for p in comp._compiled.passes.values() for o in p.model.graph.output}
    assert exposures[0] & every == compiled_outputs & every  # the same forward graph in both engines
    if method == "deeplift_revealcancel":  # its split backward's arithmetic differs by round-off
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()
    else:
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(da, db)
    if method.startswith("deeplift"):  # summation-to-delta
        scale = max(1.0, float(np.abs(interp.predict(x)).max()), float(np.abs(interp.predict(x0.reshape((-1,) + x.shape[1:]))).max()))
        assert np.abs(da).max() <= 1e-4 * scale


@pytest.mark.exposure_fallback
def test_a_rule_reading_more_than_its_trace_falls_back_to_every_tensor(residual, monkeypatch, caplog):
    """A built-in rule made to read its output's value in array code only (as a rule's
    NumPy-only branch could): the call runs again with every tensor exposed, says so once,
    and gives what an Explainer exposing everything gives."""
    proto, x, x0 = residual
    full = liftir.Explainer(proto)
    full._expose_all = True
    expected = full.attribute(x, baselines=x0, target=1)
    relu = type(full.plan.rules[next(n for n in full.plan.rules if full.plan.graph.nodes[n].op_type == "Relu")])
    real = relu.backward

    def reads_its_output(self, ctx, g):
        if not liftir.rule.is_traced(g):
            ctx.y(0)
        return real(self, ctx, g)

    monkeypatch.setattr(relu, "backward", reads_its_output)
    ex = liftir.Explainer(proto)
    with caplog.at_level(logging.WARNING, logger="liftir"):
        got, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
        again = ex.attribute(x, baselines=x0, target=1)
    said = [r.getMessage() for r in caplog.records if "forwards return every tensor" in r.getMessage()]
    assert len(said) == 1 and "did not expose tensor" in said[0]
    assert ex._expose_all
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(again, expected)
    scale = max(1.0, float(np.abs(ex.predict(x)).max()), float(np.abs(ex.predict(x0[None])).max()))
    assert np.abs(delta).max() <= 1e-4 * scale  # summation-to-delta


def test_an_unexposed_tensor_lends_its_shape_and_refuses_its_value():
    t = scheduler.Unexposed("h", (4, 3), np.float32)
    assert t.shape == (4, 3) and t.ndim == 2 and t.size == 12 and t.dtype == np.float32
    for read in (lambda: t[:2], lambda: np.asarray(t), lambda: t * 2, lambda: 1 - t, lambda: t.reshape(12),
                 lambda: np.exp(t), lambda: np.where(True, t, 0), lambda: np.ones(3) * t):
        with pytest.raises(scheduler.NotExposed):
            read()
    with pytest.raises(scheduler.NotExposed, match="'h'"):
        t[0]


def test_passes_of_several_shapes_and_targets_each_expose_their_own_reads(residual):
    """Five samples cut into passes of 2, 2 and 1, two targets each: every pass shape traces
    its own exposure, and the two engines still agree bit for bit, summation-to-delta holding."""
    proto, x, x0 = residual
    x5 = np.concatenate([x, x[:2] * 0.5])
    interp = liftir.Explainer(proto)
    comp = liftir.Explainer(proto, engine="compiled")
    a, da = interp.attribute(x5, baselines=x0, target=[[0, 3]] * 5, batch_size=2, return_convergence_delta=True)
    b, db = comp.attribute(x5, baselines=x0, target=[[0, 3]] * 5, batch_size=2, return_convergence_delta=True)
    assert len(interp._exposures) == 2 and all(e is not None for e in interp._exposures.values())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(da, db)
    scale = max(1.0, float(np.abs(interp.predict(x5)).max()), float(np.abs(interp.predict(x0[None])).max()))
    assert np.abs(da).max() <= 1e-4 * scale

"""Methods are configurations and options are typed (liftir/methods.py).

Nothing reads a method's name: a copy under another name gives the same attributions on
both engines. Options given as strings or as enum members are the same option; a bad value
is refused where it enters, with the choices listed; a Method whose fields contradict each
other is refused when it is made.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import pytest
from onnx import numpy_helper

import attr_refs as R
import cli_models as cm
import liftir
from liftir.check import check_model
from liftir.methods import (METHODS, Engine, FinalActivation, MaxRule, Mode, Nonlinear, Passes, Precision,
                            Reference, get_method)

N = 3
TARGET = [4, 0, 2]


def _call(method):
    """Inputs, baselines and options of one attribute call, chosen by the method's fields."""
    x, x0 = R.inputs("mlp", N, 1), R.inputs("mlp", N, 2)
    if method.reference is Reference.DISTRIBUTION:
        return x, R.inputs("mlp", 4, 5), {}
    if method.passes is Passes.PATH:
        return x, x0, {"n_steps": 8}
    return x, x0 if method.uses_reference else None, {}


@pytest.mark.parametrize("engine", ["interpreter", "compiled"])
@pytest.mark.parametrize("name", list(METHODS))
def test_a_renamed_method_behaves_as_the_original(name, engine, caplog):
    """The engine reads the fields of a method, never its name."""
    original = METHODS[name]
    renamed = dataclasses.replace(original, name=f"my_{name}")
    x, x0, kw = _call(original)
    a, da = R.explainer("mlp", method=name, engine=engine).attribute(
        x, x0, target=TARGET, return_convergence_delta=True, **kw)
    with caplog.at_level(logging.WARNING, logger="liftir"):
        ex = liftir.Explainer(R.proto("mlp"), method=renamed, engine=engine)
        b, db = ex.attribute(x, x0, target=TARGET, return_convergence_delta=True, **kw)
    assert ex.method is renamed and get_method(renamed) is renamed
    assert not [r for r in caplog.records if "cannot compile" in r.getMessage()]  # compiles by its fields too
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7 * np.abs(a).max())
    assert (da is None) == (db is None) == (not original.uses_reference)
    if db is not None:
        np.testing.assert_allclose(db, da, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(da).max()))
    if renamed.conserves:  # summation-to-delta, relative to the contributions
        scale = np.abs(b.astype(np.float64)).reshape(N, -1).sum(axis=1)
        assert np.all(np.abs(db) <= 1e-5 * scale + 1e-6), db


OPTIONS = [("max_rule", MaxRule), ("final_activation", FinalActivation), ("precision", Precision),
           ("engine", Engine)]


@pytest.mark.parametrize("option, kind", OPTIONS)
def test_an_option_is_the_same_as_a_string_or_an_enum(option, kind):
    for member in kind:
        assert member == member.value and f"{member}" == member.value == str(member)
        assert kind.parse(member.value, option) is member and kind.parse(member, option) is member
        for given in (member.value, member):
            assert getattr(liftir.Explainer(cm.mlp(), **{option: given}), option) is member


@pytest.mark.parametrize("bad", ["nope", "", None, 3, ["paper"]])
@pytest.mark.parametrize("option, kind", OPTIONS)
def test_a_bad_option_is_refused_with_the_choices(option, kind, bad):
    choices = tuple(m.value for m in kind)
    with pytest.raises(liftir.InputError, match=re.escape(f"{option} must be one of {choices}, got {bad!r}")):
        liftir.Explainer(cm.mlp(), **{option: bad})


def test_check_model_refuses_a_bad_max_rule():
    with pytest.raises(liftir.InputError, match=re.escape("max_rule must be one of ('cross_max', 'paper')")):
        check_model(cm.mlp(), samples=2, max_rule="largest")


@pytest.mark.parametrize("fields, match", [
    ({"mode": "lrp"}, r"Method\.mode must be one of \('deeplift', 'gradient', 'guided_backprop', 'deconvnet'\)"),
    ({"attribution": "times_two"}, r"Method\.attribution must be one of"),
    ({"reference": Reference.NONE}, r"m \* \(x - x0\) needs a reference"),
    ({"mode": Mode.GRADIENT, "nonlinear": Nonlinear.REVEAL_CANCEL}, "RevealCancel is a DeepLIFT rule"),
    ({"passes": Passes.PAIRS}, "a distribution of references runs in pairs"),
    ({"reference": Reference.DISTRIBUTION}, "a distribution of references runs in pairs"),
    ({"passes": Passes.PATH, "reference": Reference.DISTRIBUTION}, "runs in pairs, and only it"),
])
def test_a_contradictory_method_is_refused_when_made(fields, match):
    with pytest.raises(liftir.InputError, match=match):
        dataclasses.replace(METHODS["deeplift"], **fields)


def test_unknown_method_names_the_choices():
    with pytest.raises(liftir.InputError, match="unknown method 'lrp'; available: deeplift, saliency"):
        get_method("lrp")


class _ModeReadingRelu(cm.UserRelu):
    """A user rule that compares ctx.mode with strings, as rules written before the enums do."""

    seen: list = []

    def backward(self, ctx, g):
        type(self).seen.append((ctx.mode, ctx.mode == "gradient", isinstance(ctx.mode, Mode)))
        return super().backward(ctx, g)


def test_user_rules_see_the_mode_as_an_enum_equal_to_its_string():
    """Saliency through a user Relu rule: its string comparison holds, and the gradient is
    the hand-computed one of the two-layer net (W2 column of the target where the ReLU is on)."""
    model = cm.mlp(softmax=False)
    _ModeReadingRelu.seen = []
    ex = liftir.Explainer(model, method="saliency", rules={"Relu": _ModeReadingRelu})
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    grad = ex.attribute(x, target=1)
    assert _ModeReadingRelu.seen and all(s == (Mode.GRADIENT, True, True) for s in _ModeReadingRelu.seen)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = x.astype(np.float64) @ weights["W1"] + weights["b1"]
    expected = ((h > 0) * weights["W2"][:, 1]) @ weights["W1"].T
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)

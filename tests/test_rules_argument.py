"""`Explainer(rules=...)` is validated up front: every entry, with the op and the value named."""
from __future__ import annotations

import numpy as np
import pytest

import liftir
from liftir.errors import InputError
from liftir.rule import Elementwise
from onnx_builders import op_model

MODEL = op_model("Relu", [(2, 4)], opset=13)


class Needy(Elementwise):
    def __init__(self, slope):
        self.slope = slope


class Plain:  # quacks nothing like a Rule
    pass


@pytest.mark.parametrize("rules, match", [
    ({"Relu": 3}, r"rules=\{'Relu': 3\}: the rule for op 'Relu' must be a liftir.rule.Rule .*got int"),
    ({"Sigmoid": "relu"}, r"the rule for op 'Sigmoid' must be .*got str"),  # an op the model lacks
    ({"Relu": Plain}, r"the rule for op 'Relu' must be .*got type"),
    ({"Relu": Plain()}, r"the rule for op 'Relu' must be .*got Plain"),
    ({"Relu": Needy}, r"rules=\{'Relu': Needy\}: the rule class cannot be instantiated"),
    ({3: Needy(1.0)}, r"keys are op types"),
    ({"": Needy(1.0)}, r"keys are op types"),
    ([("Relu", Needy(1.0))], r"rules= must be a mapping"),
])
def test_bad_rules_are_refused_with_the_op_named(rules, match):
    with pytest.raises(InputError, match=match):
        liftir.Explainer(MODEL, rules=rules)


def test_a_valid_override_still_serves():
    class Doubling(Elementwise):
        def f(self, xp, x, ctx):
            return 2 * x

        def df(self, xp, x, ctx):
            return 2 + 0 * x

    x = np.ones((2, 4), np.float32)
    for rules in ({"Relu": Doubling}, {"Relu": Doubling()}):
        np.testing.assert_array_equal(liftir.Explainer(MODEL, rules=rules).predict(x), 2 * x)

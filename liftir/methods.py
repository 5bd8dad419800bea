"""Attribution methods as configurations of the one interpreter.

A method chooses which rule of each family to apply (the rule `mode`), whether a
reference pass is needed, and how multipliers become attributions. No method has an
engine of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Method:
    name: str
    #: the rule mode every node is run in (see liftir.rule.MODES)
    mode: str
    #: True when the method compares against a reference input (DeepLIFT family)
    uses_reference: bool
    #: how multipliers m become attributions: "delta" m*(x-x0), "input" m*x, "none" m
    attribution: str
    description: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("deeplift", "deeplift", True, "delta",
           "DeepLIFT with the Rescale rule (Shrikumar et al. 2016)"),
    Method("saliency", "gradient", False, "none",
           "gradient of the target w.r.t. the input (Simonyan et al. 2013)"),
    Method("input_x_gradient", "gradient", False, "input",
           "gradient x input"),
    Method("guided_backprop", "guided_backprop", False, "none",
           "guided backpropagation (Springenberg et al. 2014, sec. 3.4)"),
    Method("deconvnet", "deconvnet", False, "none",
           "deconvnet backward pass (Zeiler & Fergus 2014, as in Springenberg et al. Fig. 1)"),
    Method("deeplift_revealcancel", "deeplift", True, "delta",
           "DeepLIFT with the RevealCancel rule (Shrikumar et al. 2017)"),
    Method("deeplift_shap", "deeplift", True, "delta",
           "DeepLIFT averaged over a distribution of references (Lundberg & Lee 2017)"),
    Method("integrated_gradients", "gradient", True, "delta",
           "integrated gradients along the straight path (Sundararajan et al. 2017)"),
)}

INTEGRATION_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def integration_points(n_steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1] for integrated gradients, as Captum defines them."""
    if not isinstance(n_steps, (int, np.integer)) or isinstance(n_steps, bool) or n_steps < 1:
        raise InputError(f"n_steps must be an int >= 1, got {n_steps!r}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(int(n_steps))
        return 0.5 * (nodes + 1), 0.5 * weights
    if rule == "riemann_trapezoid":
        if n_steps < 2:
            raise InputError("riemann_trapezoid needs n_steps >= 2")
        weights = np.full(n_steps, 1.0 / (n_steps - 1))
        weights[[0, -1]] *= 0.5
        return np.linspace(0, 1, n_steps), weights
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if rule not in offsets:
        raise InputError(f"unknown integration rule {rule!r}; choose one of {', '.join(INTEGRATION_RULES)}")
    return (np.arange(n_steps) + offsets[rule]) / n_steps, np.full(n_steps, 1.0 / n_steps)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None

"""Attribution methods as configurations of the one interpreter.

A method chooses which rule of each family to apply (the rule `mode`), whether a
reference pass is needed, and how multipliers become attributions. No method has an
engine of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

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
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None

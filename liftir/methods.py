"""Attribution methods as configurations of the one engine, and the typed options.

A method is data, read here and nowhere else by name: which rule of each family runs
(the rule `mode`, and DeepLIFT's rule for elementwise nonlinearities), which reference
it compares against, how its passes arrange the rows, and how multipliers become
attributions. The Explainer, the compiled engine, the exporter, the CLI and the
diagnostics read these fields; no code elsewhere tests a method's name.

Options users pass as strings (`method="deeplift"`, `max_rule="paper"`, ...) are parsed
once, where they enter (`Explainer`, `check_model`, the genome pipeline), into the enums
below; an enum member compares equal to its string, so rules written against the strings
keep working.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from .errors import InputError


class Choice(str, Enum):
    """A string option with a fixed set of values. A member equals its string value, so
    `Mode.DEEPLIFT == "deeplift"` and user code comparing with strings keeps working."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def parse(cls, value, what: str):
        """`value` (a member or its string) as a member; InputError listing the choices."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except (ValueError, TypeError):
            choices = tuple(m.value for m in cls)
            raise InputError(f"{what} must be one of {choices}, got {value!r}") from None


class Mode(Choice):
    """The rule every node runs in (a rule's `modes` lists those it serves)."""

    DEEPLIFT = "deeplift"
    GRADIENT = "gradient"
    GUIDED_BACKPROP = "guided_backprop"
    DECONVNET = "deconvnet"


class Nonlinear(Choice):
    """DeepLIFT's rule for elementwise nonlinearities (mode DEEPLIFT only)."""

    RESCALE = "rescale"
    REVEAL_CANCEL = "revealcancel"


class Reference(Choice):
    """What the method compares the input against."""

    NONE = "none"  # gradient methods: no reference pass
    ONE = "one"  # one reference per sample, or one shared by the batch
    DISTRIBUTION = "distribution"  # several references per sample, results averaged (DeepLIFT-SHAP)


class Passes(Choice):
    """How the rows of one forward/backward pass are arranged."""

    SAMPLES = "samples"  # whole samples, each forwarded once with its reference
    PAIRS = "pairs"  # every (sample, reference) pair of a distribution
    PATH = "path"  # points on the straight path from reference to input (integrated gradients)


class Attribution(Choice):
    """How the multipliers m of an input become its attribution."""

    DELTA = "delta"  # m * (x - x0)
    INPUT = "input"  # m * x
    MULTIPLIER = "none"  # m itself


class MaxRule(Choice):
    """DeepLIFT's rule for MaxPool/GlobalMaxPool/ReduceMax (rules/pooling.py)."""

    CROSS_MAX = "cross_max"
    PAPER = "paper"


class FinalActivation(Choice):
    """Whether a final Softmax/LogSoftmax/Sigmoid is explained at its input ("strip")."""

    STRIP = "strip"
    KEEP = "keep"


class Precision(Choice):
    MODEL = "model"
    FLOAT64 = "float64"


class Engine(Choice):
    """What runs the passes: the rules op by op, or one compiled onnxruntime session."""

    INTERPRETER = "interpreter"
    COMPILED = "compiled"


@dataclass(frozen=True)
class Method:
    """One attribution method: a configuration of the engine, nothing more."""

    name: str
    mode: Mode
    reference: Reference
    passes: Passes
    attribution: Attribution
    description: str
    nonlinear: Nonlinear = Nonlinear.RESCALE
    #: `attribute(abs=True)` applies (Captum's Saliency option)
    takes_abs: bool = False

    def __post_init__(self):
        for field, kind in (("mode", Mode), ("reference", Reference), ("passes", Passes),
                            ("attribution", Attribution), ("nonlinear", Nonlinear)):
            object.__setattr__(self, field, kind.parse(getattr(self, field), f"Method.{field}"))
        if self.nonlinear is Nonlinear.REVEAL_CANCEL and self.mode is not Mode.DEEPLIFT:
            raise InputError(f"method {self.name!r}: RevealCancel is a DeepLIFT rule (mode 'deeplift')")
        if (self.reference is Reference.DISTRIBUTION) != (self.passes is Passes.PAIRS):
            raise InputError(f"method {self.name!r}: a distribution of references runs in pairs, and only it")
        if self.passes is Passes.PATH and self.reference is not Reference.ONE:
            raise InputError(f"method {self.name!r}: a path runs from one reference to the input")
        if self.attribution is Attribution.DELTA and self.reference is Reference.NONE:
            raise InputError(f"method {self.name!r}: m * (x - x0) needs a reference")

    @property
    def uses_reference(self) -> bool:
        """True when the method compares against a reference input (a reference pass)."""
        return self.reference is not Reference.NONE

    @property
    def conserves(self) -> bool:
        """Attributions sum to f(x) - f(x0) (DeepLIFT's summation-to-delta)."""
        return self.mode is Mode.DEEPLIFT

    @property
    def rescale_multipliers(self) -> bool:
        """Its multipliers are DeepLIFT's Rescale ones, one per input feature (what
        `attribution_func` and `pair_multipliers` take; RevealCancel keeps two)."""
        return self.mode is Mode.DEEPLIFT and self.nonlinear is Nonlinear.RESCALE

    @property
    def split(self) -> bool:
        """The RevealCancel split of differences into positive and negative parts runs."""
        return self.nonlinear is Nonlinear.REVEAL_CANCEL


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("deeplift", Mode.DEEPLIFT, Reference.ONE, Passes.SAMPLES, Attribution.DELTA,
           "DeepLIFT with the Rescale rule (Shrikumar et al. 2016)"),
    Method("saliency", Mode.GRADIENT, Reference.NONE, Passes.SAMPLES, Attribution.MULTIPLIER,
           "gradient of the target w.r.t. the input (Simonyan et al. 2013)", takes_abs=True),
    Method("input_x_gradient", Mode.GRADIENT, Reference.NONE, Passes.SAMPLES, Attribution.INPUT,
           "gradient x input"),
    Method("guided_backprop", Mode.GUIDED_BACKPROP, Reference.NONE, Passes.SAMPLES, Attribution.MULTIPLIER,
           "guided backpropagation (Springenberg et al. 2014, sec. 3.4)"),
    Method("deconvnet", Mode.DECONVNET, Reference.NONE, Passes.SAMPLES, Attribution.MULTIPLIER,
           "deconvnet backward pass (Zeiler & Fergus 2014, as in Springenberg et al. Fig. 1)"),
    Method("deeplift_revealcancel", Mode.DEEPLIFT, Reference.ONE, Passes.SAMPLES, Attribution.DELTA,
           "DeepLIFT with the RevealCancel rule (Shrikumar et al. 2017)", nonlinear=Nonlinear.REVEAL_CANCEL),
    Method("deeplift_shap", Mode.DEEPLIFT, Reference.DISTRIBUTION, Passes.PAIRS, Attribution.DELTA,
           "DeepLIFT averaged over a distribution of references (Lundberg & Lee 2017)"),
    Method("integrated_gradients", Mode.GRADIENT, Reference.ONE, Passes.PATH, Attribution.DELTA,
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


def get_method(method: str | Method) -> Method:
    """The Method a user names (or passes), the one lookup of a method by name."""
    if isinstance(method, Method):
        return method
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}") from None


def methods_where(test) -> tuple[str, ...]:
    """Names of the registered methods with `test(method)` true (for error messages)."""
    return tuple(name for name, m in METHODS.items() if test(m))

"""Exception types a user can catch and act on.

Every failure liftir can foresee is raised as a subclass of `LiftirError`, with a
message that names the offending node, input or argument and says what to do.
"""
from __future__ import annotations


class LiftirError(Exception):
    """Base of all liftir errors."""


class ModelLoadError(LiftirError):
    """The file or bytes are not a valid ONNX model liftir can read."""


class FoldingLimitError(ModelLoadError):
    """Evaluating a constant part of the model at load would exceed liftir.budget.LIMITS
    (a giant constant, an unbounded loop): refused before the work is done."""


class UnsupportedOpError(LiftirError):
    """The model uses ops with no rule for the chosen method.

    `missing` lists every offending node up front as (node name, domain, op type).
    """

    def __init__(self, missing: list[tuple[str, str, str]], method: str = "deeplift"):
        self.missing = list(missing)
        self.method = method
        lines = [f"  - node {name!r}: op {(domain + '::') if domain else ''}{op}" for name, domain, op in self.missing]
        op_types = sorted({op for _, _, op in self.missing})
        super().__init__(
            f"{len(self.missing)} node(s) use op types with no liftir rule for method {method!r} "
            f"({', '.join(op_types)}):\n" + "\n".join(lines) + "\n"
            "Register a rule for each, e.g.:\n"
            "    @liftir.register_rule(\"" + op_types[0] + "\")\n"
            "    class MyRule(liftir.rule.Rule): ...\n"
            "(see README, 'Adding a rule'), or `liftir ops MODEL` for the coverage of a model."
        )


class InputError(LiftirError, ValueError):
    """Inputs, baselines, targets or options do not fit the model."""


class BackendError(LiftirError):
    """The requested array backend (e.g. CuPy) is not usable here."""


class RuleError(LiftirError):
    """A rule returned something the scheduler cannot use (wrong shape, wrong count)."""


class BatchAxisError(RuleError):
    """An op mixes samples: it reduces, contracts or reshapes across the axis that holds
    the batch, so one sample's value depends on another's. Raised by node name."""

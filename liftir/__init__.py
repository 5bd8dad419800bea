"""liftir: DeepLIFT and gradient-family attributions for any ONNX model.

    import liftir
    ex = liftir.Explainer("model.onnx", method="deeplift")
    attr, delta = ex.attribute(x, baselines=x0, target=3, return_convergence_delta=True)
"""
from __future__ import annotations

from . import rule
from .errors import (BackendError, FoldingLimitError, InputError, LiftirError, ModelLoadError,
                     RuleError, UnsupportedOpError)
from .explainer import Explainer
from .methods import METHODS
from .registry import register_rule, registered_ops, unregister_rule

__version__ = "0.1.0"

__all__ = [
    "Explainer", "METHODS", "register_rule", "unregister_rule", "registered_ops", "rule",
    "LiftirError", "ModelLoadError", "FoldingLimitError", "UnsupportedOpError", "InputError",
    "BackendError", "RuleError",
]

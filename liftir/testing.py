"""One-line assertions for a project's own CI.

    from liftir.testing import assert_summation_to_delta, assert_matches_onnxruntime
    assert_summation_to_delta("model.onnx")              # every rule, random multipliers
    assert_summation_to_delta("model.onnx", x, target=3)  # what Explainer returns for x
    assert_matches_onnxruntime("model.onnx", x)

They raise AssertionError (so pytest shows them as test failures, not errors) with the
worst samples and the nodes whose rules lose conservation, by name and op type.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .check import CheckReport, check_model, compare_with_onnxruntime, generate_inputs
from .diagnostics import ConvergenceWarning
from .explainer import Explainer

__all__ = ["assert_summation_to_delta", "assert_matches_onnxruntime"]

_CHECK_KWARGS = ("max_rule", "final_activation", "rules", "backend", "output")


def _diagnose(report: CheckReport) -> str:
    nodes = report.failed_nodes
    if not nodes:
        return "no single node loses conservation (per-node check with random multipliers passes)"
    return "failing nodes:\n" + "\n".join(f"  - {line}" for line in report.failures
                                         if line.startswith("node "))


def assert_summation_to_delta(model: Any, inputs=None, baselines=None, target=None,
                              rtol: float = 1e-4, **explainer_kwargs) -> None:
    """Assert DeepLIFT's summation-to-delta: attributions sum to f(x) - f(x0) per sample.

    With `target=None` every output neuron is exercised by random multipliers (the
    `liftir check` test, through `check_model`); with a target, the Explainer's own
    convergence delta for that target is checked, relative to sum |attributions| +
    |f(x) - f(x0)|. Inputs default to standard normal of the declared shapes.
    """
    method = explainer_kwargs.pop("method", "deeplift")
    if method != "deeplift":
        raise ValueError(f"summation-to-delta holds for method 'deeplift' only, got {method!r}")
    check_kwargs = {k: explainer_kwargs[k] for k in _CHECK_KWARGS if k in explainer_kwargs}
    unknown = set(explainer_kwargs) - set(_CHECK_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; "
                        f"accepted: {', '.join(_CHECK_KWARGS)}")
    if target is None:
        report = check_model(model, inputs, baselines, rtol=rtol, **check_kwargs)
        if report.failed_nodes or not report.summation.passed:
            s = report.summation
            worst = ", ".join(f"sample {i}: residual {s.residual[i]:.3e} (relative {s.relative[i]:.3e})"
                              for i in s.worst(3))
            raise AssertionError(
                f"summation-to-delta fails for {report.model} (rtol {rtol:g}); worst samples: "
                f"{worst}\n{_diagnose(report)}")
        return
    ex = Explainer(model, method="deeplift", **explainer_kwargs)
    if inputs is None:
        inputs = generate_inputs(ex)
    with warnings.catch_warnings():  # this assertion diagnoses a broken delta itself, below
        warnings.simplefilter("ignore", ConvergenceWarning)
        attrs, delta = ex.attribute(inputs, baselines, target, return_convergence_delta=True)
    parts = attrs.values() if isinstance(attrs, dict) else attrs if isinstance(attrs, tuple) else [attrs]
    n = delta.shape[0]
    total = sum(np.asarray(a, np.float64).reshape(n, -1).sum(axis=1) for a in parts)
    magnitude = sum(np.abs(np.asarray(a, np.float64)).reshape(n, -1).sum(axis=1) for a in parts)
    scale = magnitude + np.abs(total - delta)  # sum|attr| + |f(x) - f(x0)|
    relative = np.abs(delta) / (scale + 1e-30)
    if np.all(relative <= rtol):
        return
    worst = np.argsort(-relative, kind="stable")[:3]
    listed = ", ".join(f"sample {i}: delta {delta[i]:.3e} (relative {relative[i]:.3e})"
                       for i in worst if relative[i] > rtol)
    report = check_model(model, inputs, baselines, rtol=rtol, **check_kwargs)
    raise AssertionError(
        f"summation-to-delta fails for target {target!r} (rtol {rtol:g}) in "
        f"{int((relative > rtol).sum())} of {n} samples; worst: {listed}\n{_diagnose(report)}")


def assert_matches_onnxruntime(model: Any, inputs, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert liftir's forward equals onnxruntime's on `inputs` (every model output)."""
    result = compare_with_onnxruntime(model, inputs, rtol=rtol, atol=atol)
    if result.status == "skipped":
        raise AssertionError(f"cannot compare with onnxruntime: {result.note}")
    if not result.passed:
        raise AssertionError(f"liftir's forward differs from onnxruntime's: {result}")

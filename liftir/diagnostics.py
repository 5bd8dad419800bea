"""Run-time diagnosis of a broken summation-to-delta.

For the conserving methods (DeepLIFT's Rescale and RevealCancel rules, DeepLIFT-SHAP)
the attributions of a sample must sum to f(x) - f(x0). `warn_if_not_conserving` checks
the deltas an attribution already computed (no extra pass while they are fine) and,
when one is off, warns once with what would help: the nodes whose rule loses
conservation (found by `liftir check`'s per-node test on the worst sample only),
`precision="float64"` where float32 round-off explains the miss, and the cross-max rule
where the paper's max rule is the culprit.
"""
from __future__ import annotations

import warnings

import numpy as np

from .methods import MaxRule, Reference

MAX_OPS = ("MaxPool", "GlobalMaxPool", "ReduceMax")
#: a miss within this many ulps of sum |attributions| is round-off of exact rules: the
#: warning says so without running the per-node check
ROUNDOFF_ULPS = 64


class ConvergenceWarning(RuntimeWarning):
    """Attributions do not sum to f(x) - f(x0) within the tolerance of their precision."""


def relative_tolerance(dtype) -> float:
    """|delta| allowed per unit of |f(x) - f(x0)|: float32 round-off of a deep net's
    multipliers stays well below 1e-3; float64 leaves room for 1e-7."""
    return 1e-7 if np.dtype(dtype).itemsize >= 8 else 1e-3


def warn_if_not_conserving(explainer, xs, refs, attributions, delta, *, output: str,
                           layer: str | None = None) -> None:
    """Warn (ConvergenceWarning) if any sample's |delta| exceeds the tolerance.

    `attributions`: per input, (N, ...) or (N, K, ...); `delta`: (N,) or (N, K). The
    tolerance is relative_tolerance(dtype) * |f(x) - f(x0)|, floored at eps * sum |attributions|
    times the same factor for a row whose output does not move (f(x) = f(x0)).
    """
    if delta is None or not explainer.method.conserves:  # summation-to-delta is not promised
        return
    delta = np.asarray(delta, dtype=np.float64)
    n = delta.shape[0]
    rows = delta.reshape(n, -1)
    k = rows.shape[1]
    dtype = np.result_type(*[a.dtype for a in attributions])
    # sums accumulated in float64 without float64 copies of the attributions (two such copies
    # and their abs were 7% of an all-class DeepLIFT call on a small conv net)
    flat = [a.reshape(n, k, -1) for a in attributions]
    total = sum(f.sum(axis=2, dtype=np.float64) for f in flat)
    magnitude = sum(np.abs(f).sum(axis=2, dtype=np.float64) for f in flat)
    difference = total - rows  # f(x) - f(x0) of each sample and target
    eps = float(np.finfo(dtype).eps)
    limit = relative_tolerance(dtype) * np.maximum(np.abs(difference), eps * magnitude)
    bad = np.abs(rows) > limit
    if not bad.any():
        return
    ratio = np.abs(rows) / (np.abs(difference) + 1e-300)
    sample, target = np.unravel_index(int(np.argmax(np.where(bad, ratio, -1.0))), rows.shape)
    worst = ratio[sample, target]
    lines = [f"summation-to-delta fails for {int(bad.any(axis=1).sum())} of {n} sample(s): the worst, "
             f"sample {int(sample)}, has |delta| = {abs(rows[sample, target]):.3g}, {worst:.3g} times "
             f"|f(x) - f(x0)| = {abs(difference[sample, target]):.3g} ({explainer.method.name}, "
             f"{dtype.name})."]
    float32_roundoff = dtype.itemsize < 8 and abs(rows[sample, target]) <= 1e4 * eps * magnitude[sample, target]
    if float32_roundoff:
        lines.append(f"Its contributions cancel (sum |attributions| is "
                     f"{magnitude[sample, target] / (abs(difference[sample, target]) + 1e-300):.3g} times "
                     f"|f(x) - f(x0)|), so {dtype.name} round-off explains the miss: "
                     f"Explainer(..., precision='float64') is the cure.")
    if float32_roundoff and abs(rows[sample, target]) <= ROUNDOFF_ULPS * eps * magnitude[sample, target]:
        # a miss of a few ulps of the contributions themselves: exact rules rounded, nothing for
        # the per-node check (a model reload and a forward per node) to find; skip its cost
        lines.append("The miss is within a few float32 ulps of the contributions, so no rule is at fault.")
    else:
        lines += _faulty_nodes(explainer, xs, refs, int(sample), output, layer)
    warnings.warn(" ".join(lines), ConvergenceWarning, stacklevel=3)


def _faulty_nodes(explainer, xs, refs, sample: int, output: str, layer: str | None) -> list[str]:
    """`liftir check`'s per-node conservation on the worst sample: which rules lose it."""
    if layer is not None:
        return []
    from .check import check_model  # check imports the explainer: import it only when needed

    one = {name: x[sample:sample + 1] for name, x in zip(explainer.input_names, xs)}
    base = None
    if refs is not None:
        shap = explainer.method.reference is Reference.DISTRIBUTION
        base = {}
        for name, r, x in zip(explainer.input_names, refs, xs):
            if shap and r.ndim == x.ndim + 1:
                r = r[sample]
            row = r[:1] if shap or r.shape[0] == 1 else r[sample:sample + 1]
            base[name] = row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = check_model(explainer.model, inputs=one, baselines=base, samples=1,
                                 max_rule=explainer.max_rule, output=output,
                                 final_activation=explainer.final_activation,
                                 rules=explainer.rule_overrides, rtol=1e-4)
    except Exception as exc:  # the diagnosis must never break the attribution itself
        return [f"(The per-node check could not run: {type(exc).__name__}: {exc}.)"]
    failing = sorted(report.failed_nodes, key=lambda c: -c.relative)[:3]
    if not failing:
        return ["The per-node check (`liftir check`, Rescale rules) finds no node that loses conservation."]
    named = ", ".join(f"{c.name!r} ({c.qualified_op}, relative residual {c.relative:.2g})" for c in failing)
    lines = [f"Nodes whose rule loses conservation (`liftir check`): {named}."]
    if explainer.max_rule is MaxRule.PAPER and any(c.op_type in MAX_OPS for c in failing):
        lines.append("The paper's max rule cannot conserve where the actual argmax has dx = 0 "
                     "(common right after a ReLU): max_rule='cross_max' conserves.")
    return lines

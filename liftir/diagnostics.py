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

from .backend import to_host
from .methods import MaxRule, Reference

MAX_OPS = ("MaxPool", "GlobalMaxPool", "ReduceMax")
#: a miss within this many ulps of sum |attributions| is round-off of exact rules: the
#: warning says so without running the per-node check
ROUNDOFF_ULPS = 64
#: float64 seed elements `_beyond_output_rounding` builds at once (32 MiB)
_SEED_ELEMENTS = 1 << 22


class ConvergenceWarning(RuntimeWarning):
    """Attributions do not sum to f(x) - f(x0) within the tolerance of their precision."""


def relative_tolerance(dtype) -> float:
    """|delta| allowed per unit of |f(x) - f(x0)|: float32 round-off of a deep net's
    multipliers stays well below 1e-3; float64 leaves room for 1e-7."""
    return 1e-7 if np.dtype(dtype).itemsize >= 8 else 1e-3


def warn_if_not_conserving(explainer, xs, refs, attributions, delta, *, output: str,
                           layer: str | None = None, call=None) -> None:
    """Warn (ConvergenceWarning) if any sample's |delta| exceeds the tolerance.

    `attributions`: per input, (N, ...) or (N, K, ...); `delta`: (N,) or (N, K). The
    tolerance is relative_tolerance(dtype) * |f(x) - f(x0)|, floored at eps * sum |attributions|
    times the same factor for a row whose output does not move (f(x) = f(x0)), and at
    ROUNDOFF_ULPS ulps of the outputs themselves (`_beyond_output_rounding`, from `call`, the
    attribute call's targets): f(x) - f(x0) is known only to its outputs' rounding.
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
    if bad.any() and call is not None:
        bad = _beyond_output_rounding(explainer, call, xs, refs, rows, bad)
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


def _beyond_output_rounding(explainer, call, xs, refs, rows, bad):
    """`bad` (samples, targets) where |delta| also exceeds ROUNDOFF_ULPS ulps of the outputs,
    sum over the explained neurons of |seed| (|f(x)| + |f(x0)|): the difference of two rounded
    outputs is known to their rounding only, which no rule can beat. A reference one base away
    from each sample (a variant's effect) moves a genomics model's output by an ulp or two:
    the deltas of exact rules are that ulp, 100% of f(x) - f(x0), and without this floor
    they drew a warning (and its per-node check, a model reload and a forward per node:
    3x the attribution's own time) on every call. The outputs come from forwards of the
    flagged samples, run only here, as many rows at a time as the call's passes took.
    DeepLIFT-SHAP's references (a distribution) keep `bad`."""
    if explainer.method.reference is Reference.DISTRIBUTION:
        return bad
    n = rows.shape[0]
    span = max(1, explainer.last_pass.rows if explainer.last_pass is not None else n)
    bad = bad.copy()
    try:
        for s0 in range(0, n, span):
            flagged = s0 + np.flatnonzero(bad[s0:s0 + span].any(axis=1))
            if flagged.size:
                floor = ROUNDOFF_ULPS * _output_scale(explainer, call, xs, refs, flagged, n)
                bad[flagged] &= np.abs(rows[flagged]) > floor
    except Exception:  # noqa: BLE001 - the diagnosis must never break the attribution itself
        return bad
    return bad


def _output_scale(explainer, call, xs, refs, flagged, n):
    """One ulp of sum over the explained neurons of |seed| (|f(x)| + |f(x0)|) for the samples
    `flagged` (ascending, within one pass's span of rows), (samples, targets): one forward of
    those samples; seeds are dense (targets, rows, outputs), so built a few targets at a time
    (`target="all"` over 10,000 outputs would be 1.6 GB at once)."""
    sub_refs = None if refs is None else [r if r.shape[0] == 1 else r[flagged] for r in refs]
    run = explainer._forward([x[flagged] for x in xs], sub_refs, (call.explained,))
    actual, reference = to_host(run.actual(call.explained)), to_host(run.reference(call.explained))
    size = (np.abs(actual.astype(np.float64)) + np.abs(reference.astype(np.float64))).reshape(len(flagged), -1)
    s0, s1 = int(flagged[0]), int(flagged[-1]) + 1
    step = max(1, _SEED_ELEMENTS // ((s1 - s0) * size.shape[1]))
    parts = []
    for t in range(0, call.k, step):
        seed = np.abs(call.seed(s0, s1, n, slice(t, t + step), np.float64)).reshape(-1, s1 - s0, size.shape[1])
        parts.append(np.einsum("krx,rx->rk", seed[:, flagged - s0], size))
    return np.concatenate(parts, axis=1) * float(np.finfo(actual.dtype).eps)


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

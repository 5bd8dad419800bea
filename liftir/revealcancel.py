"""DeepLIFT's RevealCancel rule (Shrikumar, Greenside & Kundaje, ICML 2017).

Differences are split into positive and negative parts, d = d+ + d-, kept apart through
affine maps (d_y+ = L+ d_x+ + L- d_x-, d_y- = L+ d_x- + L- d_x+) and combined at each
elementwise nonlinearity f as

    d_y+ = 1/2 (f(x0 + d+) - f(x0)) + 1/2 (f(x0 + d- + d+) - f(x0 + d-))
    d_y- = 1/2 (f(x0 + d-) - f(x0)) + 1/2 (f(x0 + d+ + d-) - f(x0 + d+))

with multipliers m+ = d_y+/d_x+ and m- = d_y-/d_x-, so positive and negative evidence
that cancel are both revealed. Other nonlinearities (max, maxout, products, softmax) use
their Rescale-family DeepLIFT rule on the combined multiplier and restart the split at
their output (d+ = max(d, 0)). Summation-to-delta holds throughout.

A layer of weights (dense, conv: `splits_by_term`) splits its output by the paper's linear
rule, by the sign of each term: d_y+ = sum_i [w_i dx_i > 0] w_i dx_i, so D_y = |L| |dx|,
and both parts of an input get the same multiplier. Carrying the inputs' split through
such layers instead (D_y = |L| D_x) makes d+ and d- grow by about |W|'s gain per layer:
on a ResNet-18 they reached 1e20 times the differences they sum to, and even float64
lost summation-to-delta. Maps that mix no signs across inputs (views, sums, pools,
per-channel scales, residual adds) carry the split, which does not grow there.

Implementation: per tensor, liftir keeps D = d+ - d- (so d+- = (d +- D)/2); affine maps
carry D with |L| (`Linear.abs_forward`). Multipliers of d+ and d- travel stacked on the
target axis, [m+; m-]; with s = m+ + m- and t = m+ - m-, an affine map carrying the split
gives m_x+- = (L^T s +- |L|^T t) / 2, a layer splitting by term m_x+ = m_x- =
(L^T s + sign(dx) |L|^T t) / 2.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .rule import Elementwise, Linear, NodeContext, difference
from .scheduler import Run


def _affine(rule, ctx) -> bool:
    return isinstance(rule, Linear) or (hasattr(rule, "abs_forward") and rule.is_affine(ctx))


def split_forward(run: Run, order: list[str], inputs: tuple[str, ...]) -> dict[str, Any]:
    """D = d+ - d- for every tensor computed in `order` (actual rows)."""
    plan = run.plan
    xp = run.xp
    spread: dict[str, Any] = {name: abs(difference(xp, run.actual(name), run.reference(name))) for name in inputs}
    for name in order:
        if name in plan.static:
            continue
        node = plan.graph.nodes[name]
        rule = plan.rules[name]
        ctx = NodeContext(node, run, plan)
        if _affine(rule, ctx):
            d_in = [spread.get(i) if i and not run.is_host(i) else None for i in node.inputs]
            if all(d is None for d in d_in):
                continue
            if _splits_by_term(rule):
                d_in = [None if d is None else abs(difference(xp, run.actual(i), run.reference(i)))
                        for i, d in zip(node.inputs, d_in)]
            out = rule.abs_forward(ctx, *d_in)
            outs = out if isinstance(out, tuple) else (out,)
        elif isinstance(rule, Elementwise):
            pos_y, neg_y = _elementwise_parts(rule, ctx, spread[node.inputs[0]])
            outs = (pos_y - neg_y,)
        else:
            outs = tuple(abs(difference(xp, run.actual(o), run.reference(o))) if o and o in run.values
                         and run.values[o].dtype.kind == "f" else None for o in node.outputs)
        for o, d in zip(node.outputs, outs):
            if o and d is not None:
                spread[o] = xp.asarray(d)
    return spread


def _splits_by_term(rule) -> bool:
    return getattr(rule, "splits_by_term", False)


def _parts(ctx: NodeContext, spread):
    dx = difference(ctx.xp, ctx.x(0), ctx.x0(0))  # a mask's -inf in both passes: 0, not NaN
    return (dx + spread) * 0.5, (dx - spread) * 0.5


def _elementwise_parts(rule: Elementwise, ctx: NodeContext, spread):
    """(d_y+, d_y-) of the RevealCancel rule, plus nothing else."""
    xp = ctx.xp
    pos, neg = _parts(ctx, spread)
    x0 = ctx.x0(0)
    f = lambda z: rule.f(xp, z, ctx)  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):  # outside f's domain: handled below
        f0, f_pos, f_neg, f_all = f(xp.broadcast_to(x0, pos.shape)), f(x0 + pos), f(x0 + neg), f(ctx.x(0))
    pos_y = 0.5 * (f_pos - f0) + 0.5 * (f_all - f_neg)
    neg_y = 0.5 * (f_neg - f0) + 0.5 * (f_all - f_pos)
    # x0 + d+ and x0 + d- may leave f's domain though x0 and x do not (an RMSNorm's Sqrt of a
    # mean square whose negative part outweighs x0): there the parts share f's Rescale
    # multiplier, which still adds up to f(x) - f(x0). `abs(v) < inf` is False for NaN and inf.
    outside = ~(abs(f_pos) < np.inf) | ~(abs(f_neg) < np.inf)
    if bool(outside.any()):
        m = rule.divided_difference(xp, ctx.x(0), x0, ctx)
        pos_y = xp.where(outside, m * pos, pos_y)
        neg_y = xp.where(outside, m * neg, neg_y)
    return pos_y, neg_y


def node_backward(spread: dict[str, Any]):
    """A scheduler `node_backward` applying RevealCancel with the forward's split `spread`."""

    def backward(rule, ctx: NodeContext, grads):
        xp = ctx.xp
        live = [g for g in grads if g is not None]
        k = live[0].shape[0] // 2
        if _affine(rule, ctx):
            if not getattr(rule, "signed", False):
                return rule.backward(ctx, *grads)
            sums = [None if g is None else g[:k] + g[k:] for g in grads]
            diffs = [None if g is None else g[:k] - g[k:] for g in grads]
            plain = rule.backward(ctx, *sums)
            absolute = rule.abs_backward(ctx, *diffs)
            if _splits_by_term(rule):  # one multiplier for both parts of each input
                signs = [None if i >= len(ctx.node.inputs) or ctx.is_const(i) else xp.sign(difference(xp, ctx.x(i), ctx.x0(i)))
                         for i in range(len(plain))]
                return tuple(None if p is None else xp.concatenate([(p + a * sg) * 0.5] * 2)
                             for p, a, sg in zip(plain, absolute, signs))
            return tuple(None if p is None else xp.concatenate([(p + a) * 0.5, (p - a) * 0.5])
                         for p, a in zip(plain, absolute))
        if isinstance(rule, Elementwise):
            g = grads[0]
            pos, neg = _parts(ctx, spread[ctx.node.inputs[0]])
            pos_y, neg_y = _elementwise_parts(rule, ctx, spread[ctx.node.inputs[0]])
            slope = rule.df(xp, ctx.x0(0) + 0 * pos, ctx)
            m_pos = xp.where(pos != 0, pos_y / xp.where(pos != 0, pos, 1), slope)
            m_neg = xp.where(neg != 0, neg_y / xp.where(neg != 0, neg, 1), slope)
            return (xp.concatenate([g[:k] * m_pos, g[k:] * m_neg]),)
        # other nonlinearities: one multiplier per output neuron, by the sign of its difference
        combined = []
        for o, g in zip(ctx.node.outputs, grads):
            if g is None:
                combined.append(None)
                continue
            dy = difference(xp, ctx._run.actual(o).astype(g.dtype), ctx._run.reference(o).astype(g.dtype))  # bools: 0/1
            combined.append(xp.where(dy > 0, g[:k], g[k:]))
        result = rule.backward(ctx, *combined)
        return tuple(None if m is None else xp.concatenate([m, m]) for m in result)

    return backward

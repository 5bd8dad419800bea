"""Elementwise Max/Min of several tensors: the maxout rule (paper 2.3.3).

Along the straight path a_i(t) = x0_i + t * dx_i, t in [0, 1], the output is the upper
envelope of n lines. Input i's multiplier is the fraction of the path on which it is the
maximum (its weight is 1 there, 0 elsewhere), so sum_i m_i dx_i = y(1) - y(0) exactly.
The fraction is an interval: the intersection over j of {t : a_i(t) >= a_j(t)}, each a
half-line, so it is computed in closed form for all elements at once, no sampling.
"""
from __future__ import annotations

import numpy as np

from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import MODES, Rule, unbroadcast


def envelope_fractions(xp, starts, slopes):
    """Fraction of t in [0, 1] where line i = starts[i] + t*slopes[i] is the (first) maximum."""
    n = len(starts)
    fractions = []
    for i in range(n):  # n is the op's input count (2-3), not a data size
        lo = xp.zeros_like(starts[0])
        hi = xp.ones_like(starts[0])
        for j in range(n):
            if j == i:
                continue
            c = starts[i] - starts[j]  # a_i - a_j = c + d t >= 0
            d = slopes[i] - slopes[j]
            flat = d == 0
            safe = xp.where(flat, 1, d)
            root = -c / safe
            lo = xp.where(~flat & (d > 0), xp.maximum(lo, root), lo)
            hi = xp.where(~flat & (d < 0), xp.minimum(hi, root), hi)
            keeps = (c > 0) | ((c == 0) & (i < j))  # parallel lines: ties go to the first input
            hi = xp.where(flat & ~keeps, lo, hi)
        fractions.append(xp.clip(hi - lo, 0, 1))
    return fractions


@builtin_rule("Max", "Min")
class Maxout(Rule):
    modes = MODES
    paper_rule = "maxout segments (2.3.3)"

    def forward(self, ctx, *xs):
        fn = ctx.xp.maximum if ctx.node.op_type == "Max" else ctx.xp.minimum
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    def backward(self, ctx, g):
        xp = ctx.xp
        sign = 1 if ctx.node.op_type == "Max" else -1
        n = len(ctx.node.inputs)
        actual = [ctx.x(i) * sign for i in range(n)]
        if ctx.mode == Mode.DEEPLIFT:
            refs = [ctx.x0(i) * sign for i in range(n)]
            shape = np.broadcast_shapes(*[a.shape for a in actual], *[r.shape for r in refs])
            starts = [xp.broadcast_to(r, shape) for r in refs]
            slopes = [xp.broadcast_to(a, shape) - s for a, s in zip(actual, starts)]
            weights = envelope_fractions(xp, starts, slopes)
        else:  # gradient: the first input attaining the max at the actual point
            shape = np.broadcast_shapes(*[a.shape for a in actual])
            top = actual[0]
            for a in actual[1:]:
                top = xp.maximum(top, a)
            taken = xp.zeros(shape, dtype=bool)
            weights = []
            for a in actual:
                win = (a == top) & ~taken
                taken = taken | win
                weights.append(win.astype(g.dtype))
        return tuple(None if ctx.is_const(i) else unbroadcast(xp, g * w.astype(g.dtype), ctx.input_shape(i))
                     for i, w in enumerate(weights))

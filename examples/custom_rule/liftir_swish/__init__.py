"""A liftir rule for the custom op com.example::Swish, y = x * sigmoid(beta * x).

Swish is elementwise, so DeepLIFT's Rescale rule (paper 2.3.4) applies: give f and its
derivative and `liftir.rule.Elementwise` supplies the multiplier dy/dx (with f' where
dx ~ 0) for DeepLIFT and f'(x) for the gradient methods. The class is registered by the
`liftir.rules` entry point in pyproject.toml, so installing this package is all a user
does; `liftir ops` then lists Swish with origin "plugin".
"""
from __future__ import annotations

from liftir.rule import Elementwise

__all__ = ["Swish", "DOMAIN"]

DOMAIN = "com.example"


def _sigmoid(xp, z):
    e = xp.exp(-abs(z))  # never overflows
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


class Swish(Elementwise):
    """com.example::Swish(x; beta=1.0) = x * sigmoid(beta * x)."""

    op_types = ("Swish",)
    domain = DOMAIN
    paper_rule = "rescale (2.3.4): m = dy/dx  [liftir-swish plugin]"

    def f(self, xp, x, ctx):
        beta = ctx.attr("beta", 1.0)
        return (x * _sigmoid(xp, beta * x)).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        beta = ctx.attr("beta", 1.0)
        s = _sigmoid(xp, beta * x)
        return (s + beta * x * s * (1 - s)).astype(x.dtype, copy=False)

"""Softmax and LogSoftmax inside the graph (attention) or kept as the final layer.

A final Softmax is normally stripped by the Explainer and explained at its logits with
the mean-normalized weights of paper 2.5. When a softmax must be propagated through
(`final_activation="keep"`, or a softmax inside attention), liftir writes it as
y_i = exp(z_i), z_i = x_i - LSE(x), and uses:
- Rescale (2.3.4) for the exp: r_i = dy_i / dz_i;
- for LSE, a function of all inputs, multipliers m_j = p_j (1 + c dx_j / sum_k p_k dx_k^2)
  with p the mean of the actual and reference softmax (the trapezoid estimate of the path
  integral of its gradient) and c = dLSE - sum_k p_k dx_k, so that sum_j m_j dx_j = dLSE
  exactly: the correction of least chi-square norm, which leaves a position the softmax is
  flat in (p ~ 0) out of it.
This is liftir's rule, not the paper's (the paper gives none for an inner softmax); it
conserves the difference exactly and reduces to the gradient when dx -> 0.

Attention masks add -inf (TorchScript exports) or finfo.min (dynamo) to the scores. A
position whose probability is exactly 0 in both passes is masked (or so far below the
row's maximum that exp underflows): the softmax is flat in it, so its multiplier is 0 and
it takes no part in the LSE split (there x - x0 is -inf - -inf = NaN, or the rounding of
finfo.min + score). A position masked in one pass only (a mask that differs between input
and reference) is refused by node name: with -inf its difference is infinite, which no
multiplier carries as a finite contribution; with finfo.min the split's terms p dx reach
~1e37 and would have to cancel to an O(1) change.
"""
from __future__ import annotations

import numpy as np

from liftir.backend import to_host
from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import (MODES, Rule, RuleError, branch, difference, expm1_bounded, is_traced,
                         reduce_rows_where, scale_rows, tanh_half_ratio)


def _axis(ctx, ndim):
    default = -1 if ctx.node.opset >= 13 else 1
    axis = ctx.attr("axis", default) % ndim
    if ctx.node.opset < 13 and axis != ndim - 1:
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: opset < 13 softmax over flattened "
                        f"axes {axis}.. is not supported; re-export with opset >= 13")
    return axis


def _log_softmax(xp, x, axis):
    """z = x - LSE(x) from one max, exp and sum (the forward without onnxruntime)."""
    top = x.max(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):  # an all-masked (-inf) row is NaN, as in onnxruntime
        shifted = x - top
    total = xp.exp(shifted).sum(axis=axis, keepdims=True)
    shifted -= xp.log(total)
    return shifted


def _forward_softmax(xp, x, y, axis, log):
    """p and LSE(x) (keepdims) from the forward's own output y (p, or z = log p for
    LogSoftmax) instead of recomputed (a max, two exps and a sum: five full-size passes):
    LSE = max x - log max p, since the largest p is at the largest x (max x - max z for z).
    Its rounding is that of log max p, with max p >= 1/L: a few eps, as the recomputed LSE's.
    Neither quotient of p's in this rule divides by a small change of p (the exp's Rescale
    is (p + p0) tanh(|dz| / 2) / |dz|), so p's own rounding enters as eps relative. A row masked
    everywhere has no largest p: its LSE is NaN, which sends the rule down its masked path."""
    top = x.max(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        if log:
            return xp.exp(y), top - y.max(axis=axis, keepdims=True)
        return y, top - xp.log(y.max(axis=axis, keepdims=True))


def _lse_difference(xp, p0, dx, lse, lse0, axis, scratch):
    """LSE(x) - LSE(x0) without cancellation: log1p(sum_j p0_j expm1(dx_j)) (an identity)
    where every |dx_j| < 1, the difference of the two LSEs beyond. `scratch`: a temporary
    of dx's shape and dtype it may overwrite."""
    # max |dx| from the rows' max and min: two reads, no full-size |dx| written
    near = xp.maximum(dx.max(axis=axis, keepdims=True), -dx.min(axis=axis, keepdims=True)) < 1
    # no near row (common: a blank or shuffled reference moves attention scores by more than
    # 1): the full-size expm1 would only be discarded (in a compiled pass 11 of a softmax's
    # ~55 full-size passes: onnxruntime has no Expm1)
    return branch(xp, ~near.any(), lambda far, *_: far,
                  lambda far, near, dx, p0, scratch: _near_rows_lse_difference(xp, far, near, dx, p0, scratch, axis),
                  lse - lse0, near, dx, p0, scratch)


def _near_rows_lse_difference(xp, far, near, dx, p0, scratch, axis):
    """`_lse_difference` where some row is near: log1p(sum_j p0_j expm1(dx_j)) there, computed
    on those rows only (an Enformer-style net's attention has a quarter of them near, or
    none but a few: the expm1 of every row cost a compiled softmax a quarter of its time)."""
    if axis != dx.ndim - 1:
        with np.errstate(over="ignore", invalid="ignore"):  # a far row's expm1 may overflow: not used
            terms = xp.expm1(dx, out=scratch)
            terms *= p0
            small = xp.log1p(terms.sum(axis=axis, keepdims=True))
        return xp.where(near, small, far)

    def shifted(dx, p0):  # near rows only: every |dx| < 1
        terms = expm1_bounded(xp, dx)
        terms *= p0
        return xp.log1p(terms.sum(axis=-1, keepdims=True))

    return reduce_rows_where(xp, near, shifted, far, dx, p0)


def _exp_rescale(xp, dz, weights):
    """Rescale of p = exp(z), (p - p0) / dz, with dz = dx - dLSE, the change of z that the LSE
    split conserves: as (p + p0) tanh(|dz| / 2) / |dz| (an identity for p = p0 e^dz, even in
    dz), which has no cancellation and cannot overflow; `weights` is p + p0. The quotient of
    the rounded p's and z's cancels (z - z0 carries eps |z| of z's rounding: for a step of
    1e-4 on |z| ~ 5, 1e-2 of itself); an identity (then max(p, p0) exprel(-|dz|)) halved
    ViT's and GPT-2's float32 error against float64, and this one keeps that within 13%
    (ViT 1.41e-6 of the largest attribution against 1.31e-6, GPT-2 5.1e-7 against 4.5e-7).
    dz == 0: the limit, (p + p0) / 2. In a compiled pass 8 full-size passes, against 11 for
    max(p, p0) exprel(-|dz|). Overwrites dz."""
    r = tanh_half_ratio(xp, xp.abs(dz, out=dz))
    r *= weights
    return r


#: the LSE split's terms p dx may cancel to the output's change with this relative loss at most
_CANCELLATION = 1e-3


def _refuse_switched_masks(ctx, xp, dx, p_dx, d_lse, axis, approx=None, p_dx_scale=1.0, finite=False):
    """Refuse a position masked in one pass only (an attention mask that differs between the
    input and its reference): -inf there leaves no finite multiplier; finfo.min makes the
    split's terms p dx ~1e37, whose sum must cancel to dLSE = O(1), which no precision
    survives. Unmasked scores never come near: sum |p dx| <= max |dx|, and a large uniform
    shift has dLSE as large. `p_dx` is p_mid * dx / p_dx_scale.

    `approx`, the rows' sums of p_mid * dx, is given when nothing is masked (every p, p0 > 0):
    then every score lies within exp's underflow range U of its row's maximum in both
    passes, so max |dx| <= |dLSE| + 2U, and the spread test cannot fail where 2 U eps is
    below _CANCELLATION (float32: 2.5e-5, float64); only a non-finite dx (an overflow) is
    left, and it shows in the row's sum.

    While the compiled engine records the pass (values unknown) nothing is refused: the
    rows that would be are returned, and the caller zeroes their multipliers (the delta
    then misses, and the ConvergenceWarning's per-node check quotes this refusal).
    """
    eps = float(np.finfo(dx.dtype).eps)
    span = -2 * float(np.log(np.finfo(dx.dtype).smallest_subnormal))
    if approx is not None and span * eps < _CANCELLATION:
        bad = ~(abs(approx) < np.inf)
    else:
        spread = abs(p_dx).sum(axis=axis, keepdims=True) * p_dx_scale
        bad = eps * spread > _CANCELLATION * (1 + abs(d_lse))
        if not finite:
            bad = bad | ~(abs(dx) < np.inf).all(axis=axis, keepdims=True)
    if is_traced(bad):
        return bad
    if not bool(bad.any()):
        return None
    step = float(to_host(xp.where(abs(dx) < np.inf, abs(dx), np.inf).max()))  # NaN counts as inf
    raise RuleError(
        f"{ctx.node.op_type} node {ctx.node.name!r}: an input position changes by {step:.3g} between the "
        f"actual and the reference pass while it carries probability in one of them: a position masked "
        f"(-inf or finfo.min added) in one pass and not the other, e.g. an attention mask that differs "
        f"between the input and its reference. DeepLIFT's multipliers cannot carry that difference "
        f"({'infinite' if step == np.inf else f'beyond {dx.dtype} precision'}): give the reference the "
        f"input's own attention mask (leave that held input out of `baselines`), or use a gradient method")


@builtin_rule("Softmax", "LogSoftmax")
class Softmax(Rule):
    modes = MODES
    paper_rule = "exp-rescale with normalized LSE split (liftir; final softmax: 2.5)"

    def forward(self, ctx, x):
        z = _log_softmax(ctx.xp, x, _axis(ctx, x.ndim))
        return z if ctx.node.op_type == "LogSoftmax" else ctx.xp.exp(z)

    def backward(self, ctx, g):
        with np.errstate(invalid="ignore", divide="ignore"):  # all-masked rows: NaN, as the forward
            return self._backward(ctx, g)

    def _backward(self, ctx, g):
        # Written for few new full-size arrays (each costs page faults as well as a pass, and
        # attention's are large): temporaries are overwritten in place once they have served.
        xp = ctx.xp
        x = ctx.x(0)
        axis = _axis(ctx, x.ndim)
        log = ctx.node.op_type == "LogSoftmax"
        p, lse = _forward_softmax(xp, x, ctx.y(0), axis, log)
        if ctx.mode != Mode.DEEPLIFT:
            return (_combine(ctx, xp, g, xp.ones_like(p) if log else p, p, axis, log, None),)
        x0 = ctx.x0(0)  # one shared reference row stays one row, as its forward values
        p0, lse0 = _forward_softmax(xp, x0, ctx.y0(0), axis, log)
        # masked in both passes (p == p0 == 0, or NaN in an all-masked row): flat, m = 0.
        # Without masks (every p, p0 > 0) `live` is everywhere and x, x0 are finite: the
        # shortcut (in a compiled pass too, as an ONNX If). A NaN in p makes its row's LSE
        # NaN, and the rows' sum shows it (onnxruntime's ReduceMin skips NaN, NumPy's min not)
        lse_sum = lse.sum() + lse0.sum()
        unmasked = (p.min() > 0) & (p0.min() > 0) & (lse_sum == lse_sum)
        # p + p0 (the weights, doubled) outside the branch: attention's P V product rule
        # forms the same sum, and onnxruntime merges the two only when both are outside an If
        weights = p + p0
        return (branch(xp, unmasked, lambda *a: _deeplift(ctx, xp, axis, log, False, *a),
                       lambda *a: _deeplift(ctx, xp, axis, log, True, *a), g, x, x0, p, p0, lse, lse0, weights),)


def _deeplift(ctx, xp, axis, log, masked, g, x, x0, p, p0, lse, lse0, weights):
    """The DeepLIFT multipliers of x times g, with or without masked positions.

    A Softmax's masked positions (p = p0 = 0) whose scores are finite in both passes (Swin's
    -100, a score far below its row's maximum, finfo.min where the sum does not overflow)
    need no masking at all: every term they enter, their own output's included, is weighted
    by p + p0 = 0, so they get exactly 0. Only NaN differences (-inf in both passes) need
    the Where's; a finite sum of dx says there are none (one read; an overflowing sum takes
    the masked path, which gives the same values). LogSoftmax takes the masked path: its
    output there, z = x - LSE, moves by dx - dLSE unless the forward's rounding absorbs
    that (finfo.min), which `_log_softmax_factor` tells apart."""
    dx = x - x0
    if not masked:
        return _multipliers(ctx, xp, axis, log, g, dx, p, p0, lse, lse0, weights, None, approximate_check=True)
    weights = _without_subnormals(xp, weights)
    if log:
        return _masked_multipliers(ctx, xp, axis, log, g, dx, p, p0, lse, lse0, weights)
    with np.errstate(over="ignore"):
        total = dx.sum()
    return branch(xp, abs(total) < np.inf,
                  lambda *a: _multipliers(ctx, xp, axis, log, *a, None, approximate_check=False, finite=True),
                  lambda *a: _masked_multipliers(ctx, xp, axis, log, *a), g, dx, p, p0, lse, lse0, weights)


def _without_subnormals(xp, weights):
    """p + p0 with its subnormal values (a score 87-103 below its row's maximum in both
    passes, as Swin's -100 masks put them) flushed to 0, the others within 1.2e-38 of
    themselves: max(w - tiny, 0), two passes, in place. Such a position carries less than 1e-38 of a
    float32 output and gets no weight in the LSE split, which is recomputed from these
    weights (so it conserves as before); but every product of a subnormal is ~13x slower
    on x86 (onnxruntime's Mul and Div, NumPy's alike: a Swin softmax's masked path took
    twice its unmasked one's time). Masked path only: there the subnormals are (an
    unmasked row whose scores spread over 87 has them too, and keeps them)."""
    weights -= float(np.finfo(weights.dtype).tiny)  # in place: the caller's temporary
    return xp.maximum(weights, 0, out=weights)


def _masked_multipliers(ctx, xp, axis, log, g, dx, p, p0, lse, lse0, weights):
    """`_multipliers` where some difference is NaN (-inf - -inf at a position masked in
    both passes), set to 0 there; the masked positions' multipliers are 0."""
    live = (p > 0) | (p0 > 0)
    if log:  # a finite score far below its row's maximum keeps its difference (see below)
        dx = xp.where(dx == dx, dx, 0)  # -inf - -inf: did not move
    else:
        # dx is difference(x, x0) wherever live (p > 0 only where x is finite), and its NaN
        # (-inf - -inf) lies where the mask puts 0
        dx = xp.where(live, dx, 0)
    return _multipliers(ctx, xp, axis, log, g, dx, p, p0, lse, lse0, weights, live, approximate_check=False)


def _log_softmax_factor(ctx, xp, live, dx, d_lse, dtype):
    """LogSoftmax's factor r_i of z_i = x_i - LSE (1 where p or p0 > 0). Where p = p0 = 0 it is
    (z - z0) / (dx - dLSE) from the forward's own z: 1 up to rounding where z moves (a score
    120 below its row's maximum, whose p float32 rounds to 0: z still changes with x there),
    0 where the forward's rounding absorbs the move (finfo.min masks: finfo.min - LSE is
    finfo.min in both passes) or nothing moved (-inf in both). So that output's contributions
    add up to the change the forward computed; a factor 0 there (before 2026-12-05) dropped
    the change of a score far below its row's maximum."""
    with np.errstate(invalid="ignore", divide="ignore"):
        dz = difference(xp, ctx.y(0), ctx.y0(0))  # 0 where -inf in both passes
        step = dx - d_lse
        ok = (step != 0) & (abs(step) < np.inf)
        moved = xp.where(ok, dz / xp.where(ok, step, 1), 0)
    return xp.where(live, xp.ones_like(moved), moved).astype(dtype, copy=False)


def _multipliers(ctx, xp, axis, log, g, dx, p, p0, lse, lse0, weights, live, approximate_check, finite=False):
    """The rule's multipliers times g from dx (finite, or +-inf at a position masked in one
    pass only, which is refused). `approximate_check`: nothing is masked, so refusing rests
    on the rows' sums (`_refuse_switched_masks`); `finite`: every dx is known finite."""
    # `weights` = p + p0 = 2 p_mid (the caller's, overwritten here): the halves fall on the
    # rows' sums, which scaling by 2 leaves bit for bit (one full-size pass fewer)
    work = xp.empty_like(dx)
    d_lse = _lse_difference(xp, p0, dx, lse, lse0, axis, work)
    p_dx = xp.multiply(weights, dx, out=work)  # 2 p_mid dx
    approx = p_dx.sum(axis=axis, keepdims=True) * 0.5
    refused = _refuse_switched_masks(ctx, xp, dx, p_dx, d_lse, axis, approx if approximate_check else None,
                                     p_dx_scale=0.5, finite=finite)
    # weights with sum_j w_j dx_j = dLSE exactly: the trapezoid estimate p_mid plus the
    # correction of least chi-square norm sum_j (w_j - p_mid_j)^2 / p_mid_j, lambda p_mid_j
    # dx_j: a position takes part in the correction as it carries probability, so one the
    # softmax is flat in (p ~ 0: a mask's -100, a score far below its row's) takes none, and
    # continuously so as p -> 0. The Euclidean least-norm correction along dx gave such
    # positions a share of the row's correction by dx alone: on Swin's shifted windows
    # (-100 masks), where some p underflow to 0 in float32 and not in float64, float32 and
    # float64 attributions differed by 3e-3 of their max. (Rescaling p_mid by dLSE /
    # sum_j p_mid dx_j instead is ill-conditioned: that sum can cancel to ~0 while dLSE
    # does not; here the numerator is the trapezoid's error, of the order of the p-weighted
    # cubes of dx, over their squares.)
    spread = (p_dx * dx).sum(axis=axis, keepdims=True) * 0.5
    if not log:  # the exp's Rescale reads p + p0 before the weights are corrected below
        dx -= d_lse  # dz
        r = _exp_rescale(xp, dx, weights)
    weights += xp.multiply(p_dx, (d_lse - approx) / xp.where(spread > 0, spread, 1), out=work)  # 2 w
    # Masked positions need no Where of their own (each is a full-size pass, ~3 Muls
    # in onnxruntime): the return's Where zeroes them, and until then they touch only
    # their own element, except through the rows' sums of g r, where r is 0 already
    # (p + p0 = 0 times a finite tanh(|dz| / 2) / |dz|); a
    # row where it is not (dLSE NaN) is NaN at its live positions as well.
    if log and live is None:
        r = xp.ones_like(p)
    elif log:  # every position's own term is r's (0 where nothing moved): no Where at the end
        r, live = _log_softmax_factor(ctx, xp, live, dx, d_lse, p.dtype), None
    if refused is not None:  # compiled: rows the interpreter refuses carry nothing (not NaN)
        live = ~refused if live is None else live & ~refused
    return _combine(ctx, xp, g, r, weights, axis, not log, live, weights_scale=0.5)


def _combine(ctx, xp, g, r, weights, axis, reuse, live, weights_scale=1.0):
    """g r - weights_scale weights sum(g r) over the softmax axis (the LSE split), 0 where not
    `live`. `reuse`: r is a temporary of the rule's (DeepLIFT's), which may hold the product."""
    deeplift = ctx.mode == Mode.DEEPLIFT
    gr = scale_rows(xp, g, r, reuse=deeplift and reuse)
    total = gr.sum(axis=axis + 1, keepdims=True)
    if weights_scale != 1.0:
        total *= weights_scale
    if deeplift and total.shape[0] == 1 and gr.shape[1:] == weights.shape:
        weights *= total[0]  # weights is a temporary here
        gr -= weights
    else:
        gr -= weights * total
    if live is None:
        return gr
    return branch(xp, live.all(), lambda gr, live: gr, lambda gr, live: xp.where(live, gr, 0), gr, live)

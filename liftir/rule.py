"""The rule contract: how one op type runs forward and maps multipliers backward.

A rule is a small stateless object registered for one or more op types:

    @liftir.register_rule("Softsign")
    class Softsign(liftir.rule.Elementwise):
        def f(self, xp, x, ctx):  return x / (1 + abs(x))
        def df(self, xp, x, ctx): return 1 / (1 + abs(x)) ** 2

`forward(ctx, *inputs)` computes the op on the stacked batch [actual rows; reference
rows]. `backward(ctx, *grads)` maps the multipliers of the outputs (shape (K, P, ...):
K targets, P actual rows) to multipliers of the inputs, one per input (None for
constants). `ctx.mode` (a `liftir.methods.Mode`, equal to its string) says which method's
rule to apply ("deeplift", "gradient", "guided_backprop", "deconvnet"); linear rules ignore
it, since for an affine map the DeepLIFT multiplier is the weight, which is also the
gradient (paper 2.3.1).
The scheduler owns all activations; a rule reads them through `ctx`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .backend import to_host
from .compile.tracer import is_tracer
from .errors import RuleError
from .kernels.parallel import over_rows
from .methods import Mode

MODES = tuple(Mode)


class NodeContext:
    """What a rule may see of one node during a run."""

    def __init__(self, node, run, plan):
        self.node = node
        self.attrs: dict[str, Any] = node.attrs
        self._run = run
        self._plan = plan
        self.xp = run.xp
        self.mode: Mode = run.mode
        self.options: dict[str, Any] = run.options
        self.cache: dict = plan.node_cache.setdefault(node.name, {})

    # ---- attributes and constant inputs -------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def const(self, index: int) -> np.ndarray | None:
        """Host (NumPy) value of input `index` if it is a constant or shape-derived, else None."""
        if index >= len(self.node.inputs) or not self.node.inputs[index]:
            return None
        return self._run.host_value(self.node.inputs[index])

    def is_const(self, index: int) -> bool:
        name = self.node.inputs[index] if index < len(self.node.inputs) else ""
        return not name or self._run.is_host(name)

    def attr_or_input(self, name: str, index: int, default: Any = None) -> Any:
        """Attributes that later opsets turned into inputs (Squeeze axes, Clip min, Pad pads...)."""
        if name in self.attrs:
            return self.attrs[name]
        value = self.const(index)
        if value is None:
            if index < len(self.node.inputs) and self.node.inputs[index]:
                raise RuleError(f"node {self.node.name!r} ({self.node.op_type}): input {index} "
                                f"({name}) must be a constant, but it depends on the model input")
            return default
        return value.tolist() if value.ndim else value.item()

    # ---- activations of the batched forward (backward only) ----------------------------
    @property
    def n_actual(self) -> int:
        return self._run.n_actual

    @property
    def n_reference(self) -> int:
        """Reference rows of the forward after the actual ones (0 in gradient modes, 1 for a
        reference shared by the batch)."""
        return self._run.n_ref

    def x(self, index: int = 0):
        """Actual-pass value of input `index` (P rows)."""
        return self._run.actual(self.node.inputs[index])

    def x0(self, index: int = 0):
        """Reference-pass value of input `index` (1 or P rows), None in gradient modes."""
        return self._run.reference(self.node.inputs[index])

    def y(self, index: int = 0):
        return self._run.actual(self.node.outputs[index])

    def y0(self, index: int = 0):
        return self._run.reference(self.node.outputs[index])

    def batch_axis(self, index: int = 0):
        """Where the samples are in input `index` (liftir.batch_axis.BatchAxis), None for a
        constant: rules that care (few do) read it instead of assuming axis 0."""
        name = self.node.inputs[index] if index < len(self.node.inputs) else ""
        return self._run.loc(name) if name and name in self._run.values else None

    def input_value(self, index: int):
        """Stacked value of input `index` on the device (constants included)."""
        return self._run.device(self.node.inputs[index])

    def input_shape(self, index: int) -> tuple[int, ...]:
        """Shape of input `index` for the P actual rows (what its multiplier must look like)."""
        return self._run.actual_shape(self.node.inputs[index])

    def input_dtype(self, index: int = 0) -> np.dtype:
        """dtype of input `index`, without reading its value (the pass may not hold it)."""
        return np.dtype(self._run.device(self.node.inputs[index]).dtype)

    def output_dtype(self, index: int = 0) -> np.dtype:
        return np.dtype(self._run.device(self.node.outputs[index]).dtype)

    def output_shape(self, index: int = 0) -> tuple[int, ...]:
        """Shape of output `index` for the P actual rows (the batch wherever it is)."""
        return self._run.actual_shape(self.node.outputs[index])

    # ---- helpers for batch-first kernels --------------------------------------------------
    @staticmethod
    def merge_targets(g):
        """(K, P, ...) -> (K*P, ...): lets batch-first kernels run all targets at once."""
        return g.reshape((g.shape[0] * g.shape[1],) + g.shape[2:])

    @staticmethod
    def split_targets(g, k: int):
        return g.reshape((k, g.shape[0] // k) + g.shape[1:])


class Rule:
    """Base class: forward on the stacked batch, backward from output to input multipliers."""

    op_types: ClassVar[tuple[str, ...]] = ()
    domain: ClassVar[str] = ""
    #: methods this rule can serve; None means every mode (true of all linear maps)
    modes: ClassVar[tuple[Mode | str, ...] | None] = None
    #: the paper section whose rule this implements, shown by `liftir ops`
    paper_rule: ClassVar[str] = ""
    #: inputs read for their type only, never their values (CastLike's `target_type`)
    type_only_inputs: ClassVar[tuple[int, ...]] = ()

    def forward(self, ctx: NodeContext, *inputs):
        raise NotImplementedError

    def backward(self, ctx: NodeContext, *grads):
        raise NotImplementedError

    def supports(self, mode: Mode) -> bool:
        return self.modes is None or mode in self.modes

    def describe(self, mode: Mode) -> str:
        return self.paper_rule or type(self).__name__

    def needs_own_references(self, node, constants) -> bool:
        """True when the node's constants give each sample of a fixed batch a value of its own
        (a constant per-sample sequence_lens): each sample then needs its own reference row, and
        the Explainer never forwards one reference shared by the batch. `constants`: the
        graph's constants by name."""
        return False

    def check_shapes(self, node, shapes) -> None:
        """Refuse at Explainer build what the model's declared shapes already rule out.

        `shapes`: per input, the activation's shape (ints where known, str/None where
        symbolic), or None for constants, shape-derived values and unknown shapes.
        Raise a liftir error naming the node; the default accepts everything.
        """


#: terms summed in the array's own float32/float16 before liftir accumulates in float64 instead
EXACT_SUM_TERMS = 4096


def accurate_sum(x, axis: tuple[int, ...], keepdims: bool = False, mean: bool = False):
    """x.sum (or x.mean) over `axis`, accumulated in float64 when many low-precision terms add up.

    NumPy adds along a non-innermost axis (and across its buffers) one term at a time: 2^20
    float32 terms are then ~1% off, and 2^24 equal terms stop growing at all (a huge Expand
    reduced by ReduceSum came out 90% low). Few terms keep the array's own precision.
    """
    count = int(np.prod([x.shape[a] for a in axis]))
    fn = x.mean if mean else x.sum
    if x.dtype.kind != "f" or x.dtype.itemsize >= 8 or count <= EXACT_SUM_TERMS:
        return fn(axis=axis, keepdims=keepdims)
    return fn(axis=axis, keepdims=keepdims, dtype=np.float64).astype(x.dtype)


def branch(xp, fast, fn_fast, fn_general, *args):
    """fn_fast(*args) where the boolean `fast` holds, fn_general(*args) otherwise: a shortcut
    that fn_general would compute too. NumPy (CuPy): a Python branch. In a trace, one ONNX If
    on the traced `fast` (liftir/compile/tracer.py `cond`), so that the compiled pass takes
    the shortcut too when the data allow it (a `bool(t.any())` branch always takes the
    general path there). The functions read only their arguments (and `xp`)."""
    if is_tracer(xp):
        return xp.cond(fast, fn_fast, fn_general, *args)
    return fn_fast(*args) if bool(fast) else fn_general(*args)


def difference(xp, x, x0):
    """x - x0, and 0 where x == x0: a value equal in both passes did not change, even when it
    is infinite (an attention mask's -inf, where x - x0 would be NaN). Always a new array."""
    # only inf - inf (or a NaN input) gives NaN; where the inputs' sums are finite every
    # element is, and d is plain x - x0: one pass over x (x0 is often one row), no temporary.
    # (A sum that overflows, or one inf, takes the general path, which gives the same d.) The
    # test reads the inputs, not d, so that in a compiled pass the subtraction runs inside
    # the If's branches (liftir/compile/sinking.py) instead of being copied out of the fast one.
    return branch(xp, _finite_inputs(x, x0), lambda x, x0: _subtract(x, x0),
                  lambda x, x0: _zero_equal_nans(xp, _subtract(x, x0), x, x0), x, x0)


def differences_of_finite_map(xp, x, x0, y, y0):
    """(difference(x, x0), difference(y, y0)) for y = f(x) with f finite wherever x is: where
    the inputs' sums are finite so are all the outputs, and both are plain subtractions under
    one test (in a compiled pass one If instead of two, with their two reductions: a ViT
    GELU's 0.15 ms of 3.7)."""
    return branch(xp, _finite_inputs(x, x0), lambda x, x0, y, y0: (_subtract(x, x0), _subtract(y, y0)),
                  lambda x, x0, y, y0: (difference(xp, x, x0), difference(xp, y, y0)), x, x0, y, y0)


def _finite_inputs(x, x0):
    """True where x and x0 hold no infinity or NaN, read from their sums (an overflowing sum
    says False, and the general path then gives the same values)."""
    with np.errstate(invalid="ignore", over="ignore"):
        total = (x.sum() if x.size else 0) + (x0.sum() if getattr(x0, "size", 1) else 0)
    return abs(total) < np.inf


def _subtract(x, x0):
    with np.errstate(invalid="ignore", over="ignore"):
        return x - x0


def _zero_equal_nans(xp, d, x, x0):
    nan = d != d
    return xp.where(nan & (x == x0), xp.zeros((), dtype=d.dtype), d)


def is_traced(a) -> bool:
    """True for the compiled engine's symbolic arrays (liftir/compile/tracer.py): their values
    are unknown while a pass is recorded, so a refusal that depends on values cannot run
    (the compiled pass then carries such a change as 0 and the delta shows the miss)."""
    return getattr(a, "liftir_traced", False) is True


def infinite_steps(xp, x, x0):
    """Where x - x0 is infinite (a position at -inf in one pass only), or None where it is
    nowhere: their sums in the common, finite case (no infinity in x or x0)."""
    if bool(to_host(_finite_inputs(x, x0))):
        return None
    return abs(difference(xp, x, x0)) == np.inf  # equal infinities are no change (0), NaN is no jump


def refuse_infinite_steps(ctx, xp, x, x0, y=None, y0=None) -> None:
    """DeepLIFT carries an input's difference as m * dx. Where dx is infinite (-inf added to
    a position in one pass only: an attention mask that masks it for the input and not for
    its reference) while the output changes by a finite nonzero amount (exp(-inf) = 0 against
    exp(s0)), no multiplier carries it: m = dy/dx = 0, and 0 * inf would make the attributions
    NaN. Refuse by node name instead. An output that does not change there (Relu(-inf) and
    Relu(-2)) gets m = 0 and passes; equal infinities (masked in both passes) are no change.
    The outputs (default: the node's output 0) are read only where some dx is infinite."""
    if is_traced(x):
        return
    jump = infinite_steps(xp, x, x0)
    if jump is None or not bool(jump.any()):
        return
    if y is None:
        y, y0 = ctx.y(0), ctx.y0(0)
    with np.errstate(invalid="ignore"):
        dy = difference(xp, y, y0)
        bad = jump & (dy != 0) & (dy == dy)  # a NaN output (an all-masked row) is NaN in the forward too
    if not bool(bad.any()):
        return
    change = float(to_host(dy[bad][0]))
    raise RuleError(
        f"{ctx.node.op_type} node {ctx.node.name!r}: an input position is infinite in one pass and finite in the "
        f"other (its difference between the actual and the reference pass is infinite), while the output there "
        f"changes by {change:.3g}: a position masked (-inf added) in one pass and not the other, e.g. an attention "
        f"mask that differs between the input and its reference. No finite multiplier m gives m * inf = "
        f"{change:.3g}, so DeepLIFT's contributions could not add up to f(x) - f(x0) (a finite mask such as "
        f"finfo.min would). Give the reference the input's own mask (leave that held input out of "
        f"`baselines`), or use a gradient method")


def unbroadcast(xp, g, shape: tuple[int, ...]):
    """Sum a (K, P, ...) multiplier over the axes a broadcasting op expanded `shape` along."""
    target = (g.shape[0],) + tuple(shape)
    extra = g.ndim - len(target)
    if extra > 0:
        g = accurate_sum(g, tuple(range(1, 1 + extra)))
    axes = tuple(i for i in range(1, g.ndim) if target[i] == 1 and g.shape[i] != 1)
    if axes:
        g = accurate_sum(g, axes, keepdims=True)
    if g.shape != target:
        g = xp.broadcast_to(g, target)
    return g


class Linear(Rule):
    """Affine maps (paper 2.3.1): the multiplier is the weight, in every method.

    RevealCancel (Shrikumar et al. 2017) splits differences into positive and negative
    parts and needs |L|, the map with absolute weights and no bias: `abs_forward` applies
    it, `abs_backward` its transpose. Ops whose weights are all >= 0 (views, sums,
    average pools) are their own |L| and need neither override; `signed = True` marks
    those that do.
    """

    paper_rule = "affine (2.3.1): m = w"
    signed: ClassVar[bool] = False
    #: a layer of weights (dense, conv): RevealCancel splits its output by the sign of each
    #: term w_i dx_i (the 2017 paper's linear rule) instead of carrying the inputs' split,
    #: whose positive and negative parts would grow by |W| per layer and cancel
    splits_by_term: ClassVar[bool] = False

    def abs_forward(self, ctx: NodeContext, *deltas):
        """|L| on the activation inputs `deltas` (None for constants, kept as parameters)."""
        args = [d if d is not None else (ctx.input_value(i) if ctx.node.inputs[i] else None)
                for i, d in enumerate(deltas)]
        return self.forward(ctx, *args)

    def abs_backward(self, ctx: NodeContext, g):
        return self.backward(ctx, g)

    def is_affine(self, ctx: NodeContext) -> bool:
        return True


class Elementwise(Rule):
    """y = f(x) elementwise: DeepLIFT's Rescale rule (2.3.4), gradient f'(x) otherwise.

    Subclasses give `f` and its derivative `df`. Set `piecewise_linear = True` when f is
    piecewise linear: then the slope at x is the exact multiplier wherever x and x0 lie on
    one piece, and dy/dx serves across kinks. For smooth f the derivative at the midpoint replaces the
    difference quotient where |dx| is tiny (L'Hopital, eq. 16), which is also the more
    accurate of the two in floating point there.
    """

    paper_rule = "rescale (2.3.4): m = dy/dx"
    modes = MODES
    piecewise_linear: ClassVar[bool] = False
    #: piecewise linear with every piece x, -x or a constant: then the float quotient dy/dx is
    #: exact on a piece, and the slope test below can be skipped (Relu, Abs, Clip, steps)
    exact_pieces: ClassVar[bool] = False

    def f(self, xp, x, ctx: NodeContext):
        raise NotImplementedError

    def df(self, xp, x, ctx: NodeContext):
        raise NotImplementedError

    def forward(self, ctx, x, *params):
        return self.f(ctx.xp, x, ctx)

    def describe(self, mode: Mode) -> str:
        return self.paper_rule if mode == Mode.DEEPLIFT else "gradient: m = f'(x)"

    def divided_difference(self, xp, x, x0, ctx: NodeContext):
        """(f(x) - f(x0)) / (x - x0). Override with a closed form that avoids cancellation.

        y and y0 are recomputed with this rule's f rather than read from the forward pass:
        onnxruntime's fast activations can be thousands of ulps off in the tails, which the
        quotient would turn into percent-level multiplier errors.
        """
        return rescale_multiplier(xp, x, x0, self.f(xp, x, ctx), self.f(xp, x0, ctx),
                                  lambda z: self.df(xp, z, ctx), self.piecewise_linear, self.exact_pieces)

    #: divided_difference and df always return a new array, which backward may overwrite
    #: with the multipliers (one large temporary fewer); true of the built-in rules
    fresh_multipliers: ClassVar[bool] = False

    def backward(self, ctx, g):
        xp = ctx.xp
        x = ctx.x(0)
        if ctx.mode == Mode.DEEPLIFT:
            x0 = ctx.x0(0)
            refuse_infinite_steps(ctx, xp, x, x0)
            m = self.divided_difference(xp, x, x0, ctx)
        else:
            m = self.df(xp, x, ctx)
        return (scale_rows(xp, g, m, reuse=self.fresh_multipliers),)


def scale_rows(xp, g, m, reuse: bool = False):
    """g (K, P, ...) * m (P, ...), split over CPU threads on large arrays. `reuse`: m is a
    temporary of the caller's, so one target's product may be written into it (every new
    large array costs page faults as well as a pass)."""
    if m.shape != g.shape[1:]:
        return g * m
    dtype = np.result_type(g.dtype, m.dtype)
    if reuse and xp is np and g.shape[0] == 1 and m.dtype == dtype and m.flags.writeable and m.flags.c_contiguous:
        out = m.reshape(g.shape)
    else:
        out = xp.empty(g.shape, dtype=dtype)
    over_rows(xp, lambda s: xp.multiply(g[:, s], m[s], out=out[:, s]), m.shape[0], g.size)
    return out


def sinhc(xp, u):
    """sinh(u)/u, accurate near 0 (the building block of stable divided differences)."""
    small = abs(u) < 1e-3
    safe = xp.where(small, xp.ones_like(u), u)
    return xp.where(small, 1 + u * u / 6, xp.sinh(safe) / safe)


def fill_where(xp, out, mask, fn, *args):
    """out[mask] = fn(*args) at the masked elements, computing fn on those elements only.

    For the few elements a rule treats specially (dx ~ 0, where the derivative replaces the
    quotient), evaluating fn on the whole array would cost as much as the rule itself. `fn`
    must be elementwise; `args` broadcast against `mask`. A trace selects them too (Compress,
    Gather, ScatterND: tracer.fill_masked), or where most elements are masked computes fn on
    the arguments whole and picks with one Where, so fn must not depend on its arguments'
    shapes.
    """
    if is_tracer(xp):  # Compress, Gather, fn, ScatterND: fn on the masked elements only
        return xp.fill_masked(out, mask, fn, *args)
    if tuple(mask.shape) != tuple(out.shape):
        mask = xp.broadcast_to(mask, out.shape)
    picked = [xp.broadcast_to(a, mask.shape)[mask] if getattr(a, "ndim", 0) else a for a in args]
    out[mask] = fn(*picked)
    return out


def reduce_rows_where(xp, rows, fn, fallback, *arrays):
    """where(rows, fn(*arrays), fallback) for a reduction `fn` over the last axis, evaluated
    on the selected rows only. `rows`: booleans of the arrays' broadcast shape with a last
    axis of 1 (keepdims); `fallback`: values of that shape (or broadcasting to it);
    `arrays` broadcast against each other (a shared reference row is read, not repeated).
    fn maps (k, L) arrays to (k, 1); it must not depend on k. For a rule's special case on a
    few rows (a softmax's rows that barely move), which would cost a whole pass of the
    tensor per op if evaluated everywhere. A trace selects the rows with Compress and Gather
    and writes the results with ScatterND (tracer.reduce_rows_where)."""
    if is_tracer(xp):
        return xp.reduce_rows_where(rows, fn, fallback, *arrays)
    if rows.ndim < 2:  # one row: a leading axis of 1, dropped again
        return reduce_rows_where(xp, rows[None], fn, xp.asarray(fallback)[None], *[a[None] for a in arrays])[0]
    lead = tuple(rows.shape[:-1])
    out = xp.array(xp.broadcast_to(fallback, rows.shape))
    at = xp.nonzero(rows.reshape(lead))
    if at[0].size == 0:
        return out
    picked = []
    for a in arrays:
        a = a.reshape((1,) * (len(lead) + 1 - a.ndim) + tuple(a.shape))
        picked.append(a[tuple(i if n != 1 else xp.zeros_like(i) for i, n in zip(at, a.shape[:-1]))])
    out[at + (0,)] = fn(*picked)[:, 0]
    return out


def expm1_bounded(xp, x):
    """e^x - 1 for |x| < 1 (promised: a softmax's near rows). A trace writes it without a
    Log (tracer.expm1_bounded); NumPy's expm1 elsewhere."""
    if is_tracer(xp):
        return xp.expm1_bounded(x)
    return xp.expm1(x)


def exprel(xp, x, out=None, nonpositive=False):
    """(e^x - 1) / x, and 1 at x = 0 (its limit), without cancellation; into `out` if given.
    A trace writes it as one expression with no fill at 0 (tracer.exprel); `nonpositive`
    promises x <= 0, for which the trace has a cheaper identity."""
    if is_tracer(xp):
        return xp.exprel(x, out=out, nonpositive=nonpositive)
    return _over_with_limit(xp.expm1(x, out=out), x, 1)


def _over_with_limit(r, x, limit):
    """r / x in place, and `limit` where x == 0 (there r is 0 too: 0/0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r /= x
    zero = x == 0
    if bool(zero.any()):
        r[zero] = limit
    return r


def tanh_half_ratio(xp, a):
    """tanh(a / 2) / a for a >= 0, and its limit 1/2 at 0, without cancellation: with p the
    mean of two values whose logs differ by a, (p_hi - p_lo) / a = 2 p tanh(a / 2) / a (the
    Rescale of exp from both ends, which needs no max and no exprel). A trace writes it as
    t / b, b = a + 1e-20, t = tanh(b / 2) (tracer.tanh_half_ratio), no fill at 0."""
    if is_tracer(xp):
        return xp.tanh_half_ratio(a)
    r = a * 0.5
    return _over_with_limit(xp.tanh(r, out=r), a, 0.5)


def exprel_of_negative(xp, a, scale=1.0, out=None):
    """exprel(-scale a) for a >= 0: the Rescale of the logistic functions (sigmoid, tanh), whose
    argument is -|step|. Overwrites `a` (`out` must not be `a`). A trace folds the negation
    into its tanh identity's halving: one full-size pass fewer, the same values."""
    if is_tracer(xp):
        return xp.exprel_of_negative(a, scale, out=out)
    a *= -scale
    return exprel(xp, a, out=out)


def blend(xp, mask, a, b):
    """where(mask, a, b) for finite a and b. In a trace, arithmetic on the 0/1 mask:
    onnxruntime's CPU Where costs 3-20x a Mul (more the less predictable the mask), and
    a * 1 + b * 0 = a, a * 0 + b * 1 = b exactly while both are finite (an inf or NaN in
    the branch not taken would leak: use `where` there)."""
    if not is_tracer(xp):
        return xp.where(mask, a, b)
    on = mask.astype(a.dtype if hasattr(a, "dtype") else b.dtype)
    return a * on + b * (1 - on)


def select(xp, mask, fn_true, fn_false, *args):
    """where(mask, fn_true(*args), fn_false(*args)), each function evaluated on its own
    elements only (a piecewise formula, e.g. a rational fit per range, costs one piece per
    element rather than all of them). The functions must be elementwise; `args` broadcast
    against `mask`. A trace records both on every element and one Where."""
    if is_tracer(xp):
        return xp.where(mask, fn_true(*args), fn_false(*args))
    if not bool(mask.any()):
        return fn_false(*args)
    if bool(mask.all()):
        return fn_true(*args)
    args = [xp.broadcast_to(a, mask.shape) if getattr(a, "ndim", 0) else a for a in args]
    part = fn_true(*[a[mask] if getattr(a, "ndim", 0) else a for a in args])
    other = ~mask
    rest = fn_false(*[a[other] if getattr(a, "ndim", 0) else a for a in args])
    out = xp.empty(mask.shape, dtype=np.result_type(part.dtype, rest.dtype))
    out[mask] = part
    out[other] = rest
    return out


def rescale_multiplier(xp, x, x0, y, y0, df, piecewise_linear: bool, exact_pieces: bool = False,
                       finite_map: bool = False):
    """m = (y - y0)/(x - x0), with the derivative where x - x0 is (near) zero (eq. 15-16).
    Equal infinities (a mask's -inf in both passes) count as dx = dy = 0, not NaN.
    `finite_map`: the function maps finite inputs to finite outputs (GELU, erf), so one test
    of the inputs serves both differences (`differences_of_finite_map`)."""
    if finite_map:
        dx, dy = differences_of_finite_map(xp, x, x0, y, y0)
    else:
        dx = difference(xp, x, x0)
        dy = difference(xp, y, y0)
    eps = np.finfo(dx.dtype).eps
    if exact_pieces:
        same = dx == 0
        quotient = dy / xp.where(same, xp.ones_like(dx), dx)
        return xp.where(same, df(x), quotient) if bool(same.any()) else quotient
    if piecewise_linear:
        # On one linear piece the slope is the divided difference exactly, whereas the quotient
        # of rounded y's is off by up to eps |y| / |dx| (100% for a step of a few ulps). Take the
        # slope wherever it accounts for dy up to the rounding of y; elsewhere (a kink or a jump
        # between x0 and x) the quotient, which conserves dy exactly.
        slope = df(x)
        fits = abs(slope * dx - dy) <= 4 * eps * (abs(y) + abs(y0) + abs(slope) * (abs(x) + abs(x0)))
        return xp.where(fits, slope, dy / xp.where(fits, xp.ones_like(dx), dx))
    # few new arrays (each costs page faults as well as a pass): the quotient in dy's, |dx|
    # in dx's, and small = |dx| <= sqrt(eps) (1 + 2|x0|). That bound is within a factor
    # 1 + sqrt(eps) of the symmetric sqrt(eps) (1 + |x| + |x0|) wherever either holds
    # (|x| = |x0| +- |dx|), and it reads one operand only: the shared reference's row, so
    # the test costs two full-size passes (|dx|, the compare) where the symmetric one took five.
    shape = tuple(dx.shape)
    root = np.sqrt(eps)
    near = x if getattr(x, "size", 1) < getattr(x0, "size", 1) else x0
    bound = abs(near) * (2 * root) + root
    with np.errstate(divide="ignore", invalid="ignore"):  # dx == 0 only where `small` replaces it
        if tuple(dy.shape) == shape and dy.dtype == np.result_type(dy.dtype, dx.dtype):
            m = dy
            m /= dx
        else:
            m = dy / dx
    small = xp.abs(dx, out=dx) <= bound
    if bool(small.any()):  # halves first: finfo.min twice overflows
        fill_where(xp, m, small, lambda a, b: df(a * 0.5 + b * 0.5), x, x0)
    return m

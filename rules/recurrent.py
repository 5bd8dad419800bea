"""Recurrent ops (LSTM, GRU, RNN), unrolled over time onto the paper's rules.

Each time step is affine maps (2.3.1: x W^T + h R^T + b, peepholes), gate activations
(Rescale, 2.3.4, with `clip` folded into the activation: the divided difference of
f(clip(z)) is that of f times that of clip; as in onnxruntime, clip bounds the gates'
inputs, not the cell state LSTM's h reads) and gating products (2.3.5: each factor gets
the mean of actual and reference of the other). Every piece conserves exactly, so the
unrolled step does, and so does the whole sequence. In gradient modes the same walk uses
derivatives and actual values: back-propagation through time.

The rule runs layout 1 (batch first: X [N, T, F], Y [N, T, D, H], Y_h/Y_c [N, D, H]);
`liftir.layout` rewrites the time-major (layout 0) nodes PyTorch exports into it. Weights,
biases and peepholes must be constants; initial states may be activations (they get
multipliers) or constants/absent.

`sequence_lens` gives each row its own length L (the spec): steps t >= L leave the row's
state as it was and are zeros in Y, so Y_h/Y_c are the state at the last valid step, and
the reverse direction starts at t = L - 1 (the sequence reversed within its own length).
Every step runs on all rows and a mask keeps the state of the rows already finished: that
selection is fixed by the lengths, so the backward passes those rows' multipliers through
unchanged and gives their inputs none. A model input (held as given, like token ids: the
reference rows take the reference's lengths, or the input's when the baselines leave them
out) or a constant (one length for all, or one per sample of a fixed-batch export).
DeepLIFT needs each sample's reference to have the sample's own lengths: the steps one pass
takes and the other skips change the output by an amount no float input's difference
accounts for, so that case is refused by node name.
The time loop is inherent; batch rows and hidden units are vectorised. The backward reads
every step's h_{t-1} from the node's Y, so all that depends on forward values only (gate
inputs, activations, Rescale multipliers, product-rule factors) is computed for all steps
at once over [rows, T, ...] and only the multipliers' recurrence walks the steps
(`_walk_batched`); peepholes, per-row lengths, GRU without linear_before_reset and a node
without Y unroll the forward again and walk step by step (`_walk_unrolled`).
"""
from __future__ import annotations

import contextlib

import numpy as np

from liftir.backend import to_host
from liftir.errors import InputError
from liftir.methods import Mode
from liftir.registry import builtin_rule, lookup
from liftir.rule import MODES, Rule, RuleError, is_tracer, rescale_multiplier


class _Attrs:
    """The `ctx.attr` an elementwise rule reads its alpha/beta from."""

    def __init__(self, **attrs):
        self.attrs = attrs

    def attr(self, name, default=None):
        return self.attrs.get(name, default)


_ALPHA = {"LeakyRelu": 0.01, "ThresholdedRelu": 1.0, "Elu": 1.0, "HardSigmoid": 0.2,
          "Affine": 1.0, "ScaledTanh": 1.0}
_BETA = {"HardSigmoid": 0.5, "Affine": 0.0, "ScaledTanh": 1.0}
_NAMES = {n.lower(): n for n in ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu",
                                 "ScaledTanh", "HardSigmoid", "Elu", "Softsign", "Softplus")}


class Activation:
    """One activation of the spec's list: f, f' and the Rescale divided difference, after clip."""

    def __init__(self, name, alpha, beta, clip):
        self.name, self.alpha, self.beta, self.clip = name, alpha, beta, clip
        if name in ("Affine", "ScaledTanh"):
            self.rule, self.attrs = lookup("Tanh"), _Attrs()
        else:
            self.rule, self.attrs = lookup(name), _Attrs(alpha=alpha, beta=beta)

    def _clip(self, xp, z):
        return z if self.clip is None else xp.clip(z, -self.clip, self.clip)

    def _clip_dd(self, xp, z, z0):
        if self.clip is None:
            return 1
        c = self.clip
        return rescale_multiplier(xp, z, z0, self._clip(xp, z), self._clip(xp, z0),
                                  lambda u: (abs(u) < c).astype(u.dtype), True, True)

    def __call__(self, xp, z):
        z = self._clip(xp, z)
        if self.name == "Affine":
            return self.alpha * z + self.beta
        if self.name == "ScaledTanh":
            return self.alpha * xp.tanh(self.beta * z)
        if self.name in ("Tanh", "Sigmoid") and is_tracer(xp) and z.dtype == np.float32:
            # the recomputed gate values only enter products as factors (never a quotient of
            # two values, whose cancellation needs the tracer's float64 tanh; the Rescale
            # multipliers come from the divided differences of `slope`), and the op's own Y
            # came from onnxruntime's float32 kernels too: those kernels, one pass each. Tanh:
            # compiled GRU 0.94x, bi-LSTM 0.91x, attributions moved by 1.5e-7 of the largest;
            # Sigmoid (the gates, where the exp(-|z|) form took 8 passes): GRU 0.89x, bi-LSTM
            # 0.93x, moved by 2.2e-7 and 1.4e-7, error against float64 4.3e-7 of the largest
            # for the bi-LSTM (5.0e-7 before), 3.4e-7 for the GRU (unchanged)
            return xp.emit_node(self.name, [z], {}, z.shape)
        return self.rule.f(xp, z, self.attrs)

    def slope(self, xp, z, z0, deeplift):
        """Rescale multiplier (f(z) - f(z0))/(z - z0), or f'(z) in gradient modes."""
        if deeplift:
            u, u0 = self._clip(xp, z), self._clip(xp, z0)
            if self.name == "Affine":
                inner = self.alpha + 0 * u
            elif self.name == "ScaledTanh":
                inner = self.alpha * self.beta * self.rule.divided_difference(xp, self.beta * u, self.beta * u0,
                                                                             self.attrs)
            else:
                inner = self.rule.divided_difference(xp, u, u0, self.attrs)
            return inner * self._clip_dd(xp, z, z0)
        u = self._clip(xp, z)
        inside = 1 if self.clip is None else (abs(z) < self.clip).astype(z.dtype)
        if self.name == "Affine":
            return self.alpha * inside + 0 * u
        if self.name == "ScaledTanh":
            return self.alpha * self.beta * self.rule.df(xp, self.beta * u, self.attrs) * inside
        return self.rule.df(xp, u, self.attrs) * inside


def _activations(ctx, defaults, directions, unclipped=()):
    names = ctx.attr("activations") or defaults * directions
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    if len(names) != len(defaults) * directions:
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: {len(names)} activations given, "
                        f"{len(defaults) * directions} expected")
    alphas = list(ctx.attr("activation_alpha") or [])
    betas = list(ctx.attr("activation_beta") or [])
    clip = ctx.attr("clip")
    acts = []
    for position, n in enumerate(names):
        name = _NAMES.get(n.lower())
        if name is None:
            raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: unknown activation {n!r}")
        alpha = alphas.pop(0) if name in _ALPHA and alphas else _ALPHA.get(name)
        beta = betas.pop(0) if name in _BETA and betas else _BETA.get(name)
        acts.append(Activation(name, alpha, beta, None if position % len(defaults) in unclipped else clip))
    per = len(defaults)
    return [acts[d * per:(d + 1) * per] for d in range(directions)]


def _one_blas_thread(xp):
    """The time loop's matrix products are small ((rows, H) x (H, gates*H)): a multi-threaded
    BLAS spends more time waking and joining its threads than computing them (measured: 2.3 ms
    against 0.085 ms per product with OpenBLAS on 2 busy cores). Limit NumPy's BLAS to one
    thread for the loop when threadpoolctl is installed; without it, nothing changes."""
    if xp is not np:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _stack_time(xp, xs):
    """xs (each [..., n]) stacked as [..., T, n]: one Concat on the last axis and a reshape,
    where `stack` would add one node per step in a trace."""
    return xp.concatenate(xs, axis=-1).reshape(tuple(xs[0].shape[:-1]) + (len(xs), xs[0].shape[-1]))


class _Steps:
    """How a walk over time reads one step of a [rows, T, ...] tensor and stacks the steps
    back. NumPy indexes the step (a view; its states stay 2-D, whose matmul BLAS runs as one
    product). A trace splits each tensor into its steps once, keeping the time axis (one
    Split node: per-step Gathers and their Squeezes were a node each, ~15 us apiece, 1,300
    nodes on a bidirectional LSTM over 100 steps)."""

    def __init__(self, xp):
        self.xp, self.keep = xp, is_tracer(xp)
        self._parts: dict[int, tuple] = {}

    def at(self, a, t, axis=1):
        if not self.keep:
            return a[(slice(None),) * axis + (t,)]
        if id(a) not in self._parts:  # the tensor is held with its parts: its id stays its own
            self._parts[id(a)] = (a, self.xp.split_each(a, axis))
        return self._parts[id(a)][1][t]

    def enter(self, a, axis=1):
        """A state (no time axis) in the form the steps' slices have."""
        return self.xp.expand_dims(a, axis) if self.keep else a

    def leave(self, a, axis=1):
        return a[(slice(None),) * axis + (0,)] if self.keep else a

    def stack(self, xs, axis=1):
        """The steps' values (each of `at`'s form) as [..., T, n], time at `axis`, the
        second to last (NumPy's steps have no time axis: `_stack_time` adds it there)."""
        return self.xp.concatenate(xs, axis=axis) if self.keep else _stack_time(self.xp, xs)


def _step_matmul(xp, a, w):
    """a @ w for a step's multipliers: in a trace they keep the time axis (k, p, 1, n)
    (`_Steps`), and onnxruntime's MatMul of that 4-D operand took 1.4x the one of its rows."""
    if a.ndim <= 3:
        return xp.matmul(a, w)
    return xp.matmul(a.reshape(-1, a.shape[-1]), w).reshape(tuple(a.shape[:-1]) + (w.shape[-1],))


def _shift(xp, seq, first, reverse):
    """Each step's previous state, [rows, T, H]: `first` (the initial state) and then `seq`
    one step behind, in the direction's own order of time."""
    first = xp.expand_dims(first, 1)
    if reverse:
        return xp.concatenate([seq[:, 1:], first], axis=1)
    return xp.concatenate([first, seq[:, :-1]], axis=1)


def _mean(a, a0, deeplift):
    return (a + a0) * 0.5 if deeplift else a


def _values(rec, rec0, deeplift, sums=False):
    """key -> the product rule's factor of a recorded value: its mean over the two passes (in
    gradient modes its actual value), or with `sums` twice that, a + a0 (`walk_r_scales`)."""
    if not deeplift:
        return lambda key: rec[key]
    if sums:
        return lambda key: rec[key] + rec0[key]
    return lambda key: _mean(rec[key], rec0[key], True)


class _Recurrent(Rule):
    """Shared by LSTM/GRU/RNN: inputs, directions, the time loop and the backward walk."""

    modes = MODES
    gates: int = 1
    default_acts: tuple[str, ...] = ()
    state_inputs: tuple[int, ...] = (5,)  # initial_h (and initial_c)
    slope_keys: tuple[tuple[int, str], ...] = ()  # (activation index, recorded gate input)
    #: activations whose input `clip` does not bound (LSTM's h of the cell state, as onnxruntime)
    unclipped: tuple[int, ...] = ()
    #: a factor of `_factors` the batched walk leaves out of its steps: the gates' multipliers
    #: are then the carried state's times it, formed once after the walk (`_gates_of_states`)
    gates_after_walk: str | None = None
    #: DeepLIFT's batched walk may carry a gate's product-rule factors as sums (a + a0) where the
    #: rule has means (a + a0) / 2, a full-size pass fewer each: the factors of the gate's
    #: multipliers are then these powers of two of their values, in the walk's products with R
    #: (`walk_r_scales`) and after it with W (`walk_w_scales`), and that gate's rows of R and W
    #: are scaled by the inverse once (`_walk_scaled`). Scaling by a power of two is exact, so
    #: the multipliers are the same bits.
    walk_r_scales: tuple[float, ...] | None = None
    walk_w_scales: tuple[float, ...] | None = None
    paper_rule = ("unrolled: affine (2.3.1) + rescale (2.3.4) gates + product (2.3.5) gating; "
                  "gradient: backprop through time")

    def describe(self, mode):
        return self.paper_rule if mode == Mode.DEEPLIFT else "backprop through time"

    # ---- parameters ---------------------------------------------------------------------
    def _const(self, ctx, index, what, required=True):
        if index >= len(ctx.node.inputs) or not ctx.node.inputs[index]:
            if required:
                raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: {what} is missing")
            return None
        if not ctx.is_const(index):
            raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: {what} must be a constant "
                            f"(liftir treats it as the weight of an affine map)")
        return ctx.const(index)

    def _setup(self, ctx, x):
        op = ctx.node.op_type
        if ctx.attr("layout", 0) != 1:
            raise RuleError(f"{op} node {ctx.node.name!r} is time-major (layout 0), so its batch is not on "
                            f"axis 0; liftir rewrites the Transpose -> {op} -> Transpose chains exporters "
                            f"write, but this node's neighbours did not match (export with batch-first "
                            f"tensors, or layout=1)")
        if ctx.attr("input_forget", 0):
            raise RuleError(f"{op} node {ctx.node.name!r}: input_forget=1 is not supported")
        direction = ctx.attr("direction", "forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        xp, dtype = ctx.xp, x.dtype
        w = self._const(ctx, 1, "W").astype(dtype)
        r = self._const(ctx, 2, "R").astype(dtype)
        hidden = r.shape[-1]
        b = self._const(ctx, 3, "B", required=False)
        b = np.zeros((len(dirs), 2 * self.gates * hidden), dtype) if b is None else b.astype(dtype)
        params = []
        for d in range(len(dirs)):
            # contiguous transposes, made once: a matmul with a transposed view takes NumPy's
            # slow non-BLAS loop for stacked operands (20x slower on (N, T, F) inputs)
            entry = {"W": xp.asarray(w[d]), "R": xp.asarray(r[d]),
                     "Wt": xp.ascontiguousarray(xp.asarray(w[d]).T),
                     "Rt": xp.ascontiguousarray(xp.asarray(r[d]).T),
                     "Wb": xp.asarray(b[d, :self.gates * hidden]),
                     "Rb": xp.asarray(b[d, self.gates * hidden:]),
                     "P": self._peepholes(ctx, d, hidden, dtype),
                     "gate": [self._gate_params(xp, w[d], r[d], b[d], j, hidden) for j in range(self.gates)]}
            entry["R_walk"] = self._walk_scaled(xp, entry["R"], r[d], self.walk_r_scales, hidden, ctx.mode)
            entry["W_walk"] = self._walk_scaled(xp, entry["W"], w[d], self.walk_w_scales, hidden, ctx.mode)
            params.append(entry)
        acts = _activations(ctx, list(self.default_acts), len(dirs), self.unclipped)
        return dirs, params, hidden, acts

    @staticmethod
    def _walk_scaled(xp, on_device, weights, scales, hidden, mode):
        """R or W ([gates*H, n], host) with each gate's rows divided by its power of two in
        `scales` (`walk_r_scales`), for DeepLIFT's batched walk; otherwise its array already
        on the device (`on_device`), not a second copy (or a second constant of a trace)."""
        if scales is None or mode != Mode.DEEPLIFT:
            return on_device
        return xp.asarray(weights * np.repeat(1 / np.asarray(scales, dtype=weights.dtype), hidden)[:, None])

    def _gate_params(self, xp, w, r, b, j, hidden):
        """Gate j's own weights (W_j^T, R_j^T, contiguous), its two biases and their sum, for
        `_gate_input`: the batched backward forms each gate's input apart (see there)."""
        rows = slice(j * hidden, (j + 1) * hidden)
        wb, rb = b[rows], b[self.gates * hidden:][rows]
        return {"Wt": xp.asarray(np.ascontiguousarray(w[rows].T)), "Rt": xp.asarray(np.ascontiguousarray(r[rows].T)),
                "Wb": xp.asarray(wb), "Rb": xp.asarray(rb), "b": xp.asarray(wb + rb)}

    def _peepholes(self, ctx, d, hidden, dtype):
        return None

    def _state(self, ctx, index, value, rows, d, hidden, dtype):
        """Initial state of direction d for `rows` rows (zeros when absent)."""
        xp = ctx.xp
        if value is None:
            return xp.zeros((rows, hidden), dtype=dtype)
        value = xp.asarray(value).astype(dtype)
        if value.shape[0] == rows:
            return value[:, d]
        if value.shape[0] == 1 or bool((value == value[:1]).all()):  # a constant of a fixed-batch export
            return xp.broadcast_to(value[:1, d], (rows, hidden))
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: input {index} (initial state) has "
                        f"{value.shape[0]} rows where the batch has {rows}")

    # ---- sequence lengths -------------------------------------------------------------------
    def needs_own_references(self, node, constants):
        """A constant sequence_lens with lengths that differ gives each sample of a fixed batch
        its own: a reference shared by the batch could not take them all."""
        lens = constants.get(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
        if lens is None:
            return False
        lens = np.asarray(lens).reshape(-1)
        return lens.size > 1 and not bool((lens == lens[0]).all())

    def _lens_input(self, ctx, reference=False):
        """The node's sequence_lens: a host constant, this pass's actual or reference rows, or None."""
        if len(ctx.node.inputs) <= 4 or not ctx.node.inputs[4]:
            return None
        if ctx.is_const(4):
            return ctx.const(4)
        return ctx.x0(4) if reference else ctx.x(4)

    def _lengths(self, ctx, value, rows, steps, stacked=False):
        """Each row's length, (rows,) host ints, or None without sequence_lens. `stacked`: the
        forward's rows (the actual ones, then the references); else rows of one kind.

        A model input (or any computed tensor) has one length per row. A constant is one
        length for every row, or one per sample of a fixed-batch export, which ties it to
        that batch: the pass must hold those samples, each with its own reference row.
        Bad values are InputError for a tensor the user feeds, RuleError for a constant."""
        if value is None:
            return None
        op, name = ctx.node.op_type, ctx.node.name
        const = ctx.is_const(4)
        lens = np.asarray(to_host(value))
        bad = RuleError if const else InputError
        if lens.dtype.kind not in "iu":
            raise RuleError(f"{op} node {name!r}: sequence_lens must be integers, got {lens.dtype}")
        if lens.ndim != 1 or lens.size == 0:
            raise bad(f"{op} node {name!r}: sequence_lens has shape {lens.shape}; the spec's is [batch_size], "
                      f"one length per sample")
        out_of_range = (lens < 1) | (lens > steps)
        if bool(out_of_range.any()):
            i = int(np.argmax(out_of_range))
            who = f"sample {i}"
            if stacked and not const and i >= ctx.n_actual:  # the forward's rows: samples, then references
                who = f"the reference of sample {i - ctx.n_actual}" if ctx.n_reference > 1 else "the reference"
            raise bad(f"{op} node {name!r}: sequence_lens gives {who} the length {int(lens[i])}; every "
                      f"length must lie between 1 and the input's {steps} steps")
        if not const:
            if lens.shape[0] != rows:
                raise bad(f"{op} node {name!r}: sequence_lens has {lens.shape[0]} lengths for the {rows} rows of "
                          f"its input X")
            return lens.astype(np.int64)
        if bool((lens == lens[0]).all()):
            return np.full(rows, int(lens[0]), dtype=np.int64)
        n = lens.size
        ok = (ctx.n_actual == n and ctx.n_reference in (0, n)) if stacked else rows == n
        if not ok:
            got = (f"{ctx.n_actual} samples and {ctx.n_reference} reference rows" if stacked else f"{rows} rows")
            raise InputError(f"{op} node {name!r}: its constant sequence_lens gives each of {n} samples its own "
                             f"length, which ties it to a batch of exactly {n} samples (each with its own "
                             f"reference row); this pass has {got}. Explain {n} samples at once, or export the "
                             f"lengths as a model input")
        return np.tile(lens, rows // n).astype(np.int64)

    @staticmethod
    def _valid(xp, lens, steps):
        """(steps to run, (rows, steps) bool mask of the steps each row takes, or None when every
        row takes them all)."""
        if lens is None:
            return steps, None
        length = int(lens.max())
        if bool((lens == length).all()):
            return length, None  # steps past a shared length are zeros and influence nothing
        return length, xp.asarray(np.arange(length)[None, :] < lens[:, None])

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, ctx, x, *rest):
        with _one_blas_thread(ctx.xp):
            return self._forward(ctx, x, *rest)

    def _forward(self, ctx, x, *rest):
        dirs, params, hidden, acts = self._setup(ctx, x)
        xp = ctx.xp
        rows = x.shape[0]
        lens = self._lengths(ctx, rest[3] if len(rest) > 3 else None, rows, x.shape[1], stacked=True)
        length, valid = self._valid(xp, lens, x.shape[1])
        states0 = [rest[i - 1] if i - 1 < len(rest) else None for i in self.state_inputs]
        ys, finals = [], []
        for d, reverse in enumerate(dirs):
            init = [self._state(ctx, i, s, rows, d, hidden, x.dtype) for i, s in zip(self.state_inputs, states0)]
            record = self._unroll(xp, x[:, :length], init, params[d], acts[d], reverse, valid)
            ys.append(_stack_time(xp, [rec["y"] for rec in record]))  # time order of the input
            finals.append(self._finals(record, reverse))
        y = xp.stack(ys, axis=2)
        if length < x.shape[1]:  # steps past every row's length are zeros
            y = xp.concatenate([y, xp.zeros((rows, x.shape[1] - length) + tuple(y.shape[2:]), dtype=y.dtype)],
                               axis=1)
        outs = [y] + [xp.stack([f[j] for f in finals], axis=1) for j in range(len(finals[0]))]
        return tuple(outs[:max(1, len(ctx.node.outputs))]) if len(ctx.node.outputs) > 1 else outs[0]

    def _gate_slopes(self, xp, rec, rec0, acts, deeplift):
        """Every gate's Rescale multiplier (or derivative) for all steps in one call per gate,
        stored in each step's record as "s_<key>": they depend only on the forward values,
        so the backward walk need not compute them step by step (100 small calls -> 1)."""
        for j, key in self.slope_keys:
            z = xp.stack([r[key] for r in rec], axis=1)
            z0 = xp.stack([r[key] for r in rec0], axis=1) if deeplift else None
            slope = acts[j].slope(xp, z, z0, deeplift)
            per_step = getattr(slope, "ndim", 0) == z.ndim
            for t, r in enumerate(rec):
                r["s_" + key] = slope[:, t] if per_step else slope

    def _finals(self, record, reverse):
        return list((record[0] if reverse else record[-1])["state"])

    def _walk_unrolled(self, xp, x, x0, init, init0, carry, g_y, d, p_, acts, reverse, deeplift, valid, k, p,
                       dtype):
        """The backward step by step on the forward unrolled again (per-row lengths, or no Y)."""
        zero = xp.zeros((), dtype=dtype)
        rec = self._unroll(xp, x, init, p_, acts, reverse, valid)
        rec0 = self._unroll(xp, x0, init0, p_, acts, reverse, valid) if deeplift else None
        self._gate_slopes(xp, rec, rec0, acts, deeplift)
        steps = x.shape[1]
        order = range(steps) if reverse else range(steps - 1, -1, -1)  # backwards in time
        g_gates = None
        for t in order:
            m = None if valid is None else valid[:, t:t + 1]
            if g_y is not None:  # Y is 0 where a row's sequence is over: no multiplier there
                carry[0] = carry[0] + (g_y[:, :, t, d] if m is None else xp.where(m, g_y[:, :, t, d], zero))
            prev = t + 1 if reverse else t - 1
            has_prev = 0 <= prev < steps
            prev_state = rec[prev]["state"] if has_prev else init
            prev_state0 = (rec0[prev]["state"] if has_prev else init0) if deeplift else None
            # a row past its length kept its state: the step sees none of its multipliers,
            # which pass to the previous state unchanged
            held = carry
            if m is not None:
                carry = [xp.where(m, c, zero) for c in carry]
            g_in, carry = self._step_back(xp, carry, rec[t], rec0[t] if deeplift else None,
                                          prev_state, prev_state0, p_, acts, deeplift)
            if m is not None:
                carry = [xp.where(m, c, h) for c, h in zip(carry, held)]
                g_in = xp.where(m, g_in, zero)
            if g_gates is None:
                g_gates = xp.zeros((k, p, steps, g_in.shape[-1]), dtype=dtype)
            g_gates[:, :, t] = g_in
        return g_gates, carry

    # ---- the batched backward: every forward value at once, one short walk ------------------
    def _batched(self, p) -> bool:
        """Whether the node's steps have the batched backward (`_history`, `_factors`,
        `_step_back_batched`); the others unroll the forward again and walk step by step."""
        return False

    @staticmethod
    def _forward_y(ctx, reference, rows, length, d):
        """The forward's Y of direction d (each step's h), [rows, T, H], or None when the node
        does not output it."""
        if not ctx.node.outputs or not ctx.node.outputs[0]:
            return None
        y = ctx.y0(0) if reference else ctx.y(0)
        return None if y is None else y[:rows, :length, d]

    @staticmethod
    def _projection(xp, x, p):
        """The input projection of all steps at once: (rows, T, gates*H)."""
        rows, steps, features = x.shape
        return (xp.matmul(x.reshape(rows * steps, features), p["Wt"]) + p["Wb"]).reshape(rows, steps, -1)

    @staticmethod
    def _gate_input(xp, x, h_prev, gate, recurrent_bias=True):
        """One gate's input over all steps, [rows, T, H]: x W_j^T + (Wb_j + Rb_j) + h_{t-1} R_j^T
        (without `recurrent_bias`, x W_j^T + Wb_j and h_{t-1} R_j^T + Rb_j apart, for GRU's
        candidate, whose reset gate multiplies the second). Each gate's input is born apart, so
        no Split of the gates' common [rows, T, gates*H] input (and of their activations) copies
        the largest tensors a recurrent backward holds: measured on one thread, a compiled
        bi-LSTM pass 95 -> 82 ms, a GRU's 77 -> 72 (bench_architectures' models)."""
        rows, steps, features = x.shape
        # 2-D products (NumPy's matmul of a stacked operand makes one BLAS call per row), and
        # the recurrent product added to the input's, which onnxruntime then runs as one Gemm
        xw = xp.matmul(x.reshape(rows * steps, features), gate["Wt"])
        hr = xp.matmul(h_prev.reshape(rows * steps, -1), gate["Rt"])
        if not recurrent_bias:
            return (xw + gate["Wb"]).reshape(rows, steps, -1), (hr + gate["Rb"]).reshape(rows, steps, -1)
        return (hr + (xw + gate["b"])).reshape(rows, steps, -1)

    def _walk_batched(self, xp, x, x0, ys, ys0, init, init0, carry, g_y, d, p, acts, reverse, deeplift):
        """The backward from the forward's Y: with every h_{t-1} known, each step's record (gate
        inputs, activations), Rescale multiplier and product-rule factor is computed for all
        steps at once over [rows, T, ...]; only the multipliers' own recurrence walks the steps,
        a few products each. Same rules as `_step_back`, so the same values (up to rounding)."""
        rec = self._history(xp, x, ys, init, p, acts, reverse)
        rec0 = self._history(xp, x0, ys0, init0, p, acts, reverse) if deeplift else None
        for j, key in self.slope_keys:
            rec["s_" + key] = acts[j].slope(xp, rec[key], rec0[key] if deeplift else None, deeplift)
        factors = self._factors(xp, rec, rec0, deeplift)
        p = dict(p, R=p["R_walk"])  # the steps' products take R with its rows scaled (`walk_r_scales`)
        steps = x.shape[1]
        order = range(steps) if reverse else range(steps - 1, -1, -1)  # backwards in time
        g_in = [None] * steps
        steps_of = _Steps(xp)
        carry = [steps_of.enter(c, 2) for c in carry]
        g_yd = g_y[..., d, :] if g_y is not None else None
        per_step = {key: f for key, f in factors.items() if key != self.gates_after_walk}
        for t in order:
            if g_yd is not None:
                carry = [carry[0] + steps_of.at(g_yd, t, 2)] + carry[1:]
            g_in[t], carry = self._step_back_batched(xp, carry, {key: steps_of.at(f, t) for key, f in per_step.items()},
                                                     p)
        g_in = steps_of.stack(g_in, 2)
        if self.gates_after_walk is not None:
            g_in = self._gates_of_states(xp, g_in, factors[self.gates_after_walk])
        return g_in, [steps_of.leave(c, 2) for c in carry]

    @staticmethod
    def _gates_of_states(xp, g_h, q):
        """Each gate's multipliers as the state's g_h [k, rows, T, H] times its factor in q
        [rows, T, gates*H]: one broadcast product, no copies of g_h per gate."""
        hidden = g_h.shape[-1]
        q = q.reshape(tuple(q.shape[:-1]) + (-1, hidden))
        return (xp.expand_dims(g_h, -2) * q).reshape(tuple(g_h.shape[:-1]) + (-1,))

    def _unroll(self, xp, x, init, p, acts, reverse, valid=None):
        """Every step's values, stored at its time index (the reverse direction runs t = T-1..0).

        rec["state"] is the state the step hands on and rec["y"] its row of Y: where `valid`
        says a row's sequence has ended (or, in reverse, not yet begun) the row keeps its
        state and its Y is 0, as the spec's sequence_lens asks."""
        steps = x.shape[1]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        proj = self._projection(xp, x, p)
        record = [None] * steps
        state = init
        for t in order:
            rec = self._step(xp, proj[:, t], state, p, acts)
            new = [rec[k] for k in self.state_keys]
            if valid is None:
                rec["y"] = rec["h"]
            else:
                m = valid[:, t:t + 1]
                new = [xp.where(m, v, s) for v, s in zip(new, state)]
                rec["y"] = xp.where(m, rec["h"], xp.zeros((), dtype=rec["h"].dtype))
            rec["state"] = new
            record[t] = rec
            state = new
        return record

    # ---- backward ---------------------------------------------------------------------------
    def backward(self, ctx, *grads):
        with _one_blas_thread(ctx.xp):
            return self._backward(ctx, *grads)

    def _reference_lengths(self, ctx, lens, p, steps):
        """The reference rows' lengths, which DeepLIFT needs equal to each sample's own."""
        if ctx.is_const(4):
            return lens  # a constant gives the reference rows the lengths it gives their samples
        value = self._lens_input(ctx, reference=True)
        lens0 = self._lengths(ctx, value, int(value.shape[0]) if value.ndim else 1, steps)
        lens0 = np.broadcast_to(lens0, (p,))
        differ = lens0 != lens
        if bool(differ.any()):
            i = int(np.argmax(differ))
            raise RuleError(
                f"{ctx.node.op_type} node {ctx.node.name!r}: sample {i} has sequence length {int(lens[i])} but its "
                f"reference {int(lens0[i])}. The steps one pass takes and the other skips change the output by an "
                f"amount that no float input's difference accounts for, so DeepLIFT's contributions could not add "
                f"up to f(x) - f(x0). Give the reference the input's own lengths (leave the lengths input out "
                f"of `baselines`: it is then held at the input's values), or use a gradient method")
        return lens0

    def _backward(self, ctx, *grads):
        xp = ctx.xp
        deeplift = ctx.mode == Mode.DEEPLIFT
        x_full = ctx.x(0)
        dirs, params, hidden, acts = self._setup(ctx, x_full)
        p = x_full.shape[0]
        lens = self._lengths(ctx, self._lens_input(ctx), p, x_full.shape[1])
        if deeplift and lens is not None:
            self._reference_lengths(ctx, lens, p, x_full.shape[1])
        length, valid = self._valid(xp, lens, x_full.shape[1])
        x = x_full[:, :length]  # steps past every row's length do not influence anything
        k = next(g for g in grads if g is not None).shape[0]
        dtype = next(g for g in grads if g is not None).dtype
        x0 = ctx.x0(0)[:, :length] if deeplift else None
        states = {i: (ctx.x(i) if i < len(ctx.node.inputs) and ctx.node.inputs[i] and not ctx.is_const(i)
                      else ctx.const(i)) for i in self.state_inputs}
        states0 = {i: (ctx.x0(i) if i < len(ctx.node.inputs) and ctx.node.inputs[i] and not ctx.is_const(i)
                       else ctx.const(i)) for i in self.state_inputs}
        rows0 = p
        if deeplift:  # a reference shared by the batch (one row) is unrolled once, not p times
            rows0 = max([x0.shape[0]] + [s.shape[0] for i, s in states0.items() if s is not None
                                         and i < len(ctx.node.inputs) and not ctx.is_const(i)])
            rows0 = rows0 if rows0 in (1, p) and valid is None else p  # per-row lengths: a row each
            x0 = xp.broadcast_to(x0, (rows0,) + tuple(x.shape[1:]))
        g_y = grads[0] if grads else None
        gx = xp.zeros((k,) + tuple(x_full.shape), dtype=dtype)
        g_states = {i: xp.zeros((k, p, len(dirs), hidden), dtype=dtype) for i in self.state_inputs}
        for d, reverse in enumerate(dirs):
            init = [self._state(ctx, i, states[i], p, d, hidden, x.dtype) for i in self.state_inputs]
            init0 = None
            if deeplift:
                init0 = [self._state(ctx, i, states0[i], rows0, d, hidden, x.dtype) for i in self.state_inputs]
            # multipliers of the final states (Y_h, Y_c), then of each step's state
            carry = []
            for j, key in enumerate(self.final_keys):
                g = grads[1 + j] if len(grads) > 1 + j and grads[1 + j] is not None else None
                carry.append(xp.zeros((k, p, hidden), dtype=dtype) if g is None else g[:, :, d])
            ys = self._forward_y(ctx, False, p, length, d) if valid is None and self._batched(params[d]) else None
            ys0 = self._forward_y(ctx, True, rows0, length, d) if deeplift and ys is not None else None
            w = params[d]["W"]
            if ys is not None and (ys0 is not None or not deeplift):
                g_gates, carry = self._walk_batched(xp, x, x0, ys, ys0, init, init0, carry, g_y, d, params[d],
                                                    acts[d], reverse, deeplift)
                w = params[d]["W_walk"]
            else:
                g_gates, carry = self._walk_unrolled(xp, x, x0, init, init0, carry, g_y, d, params[d], acts[d],
                                                     reverse, deeplift, valid, k, p, dtype)
            steps = x.shape[1]
            # the input projection's multipliers, every step in one matmul
            gx[:, :, :length] += xp.matmul(g_gates.reshape(k * p * steps, -1), w).reshape(
                k, p, steps, -1)
            for i, g in zip(self.state_inputs, carry):
                g_states[i][:, :, d] = g
        out = [gx] + [None] * (len(ctx.node.inputs) - 1)
        for i in self.state_inputs:
            if i < len(ctx.node.inputs) and ctx.node.inputs[i] and not ctx.is_const(i):
                out[i] = g_states[i].reshape((k,) + ctx.input_shape(i))
        return tuple(out)


@builtin_rule("RNN")
class RNN(_Recurrent):
    """H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)."""

    gates = 1
    default_acts = ("Tanh",)
    state_inputs = (5,)
    state_keys = ("h",)
    final_keys = ("h",)
    slope_keys = ((0, "z"),)

    def _step(self, xp, xw, state, p, acts):
        (h_prev,) = state
        z = xw + xp.matmul(h_prev, p["Rt"]) + p["Rb"]
        return {"z": z, "h": acts[0](xp, z)}

    def _step_back(self, xp, carry, rec, rec0, prev, prev0, p, acts, deeplift):
        (g_h,) = carry
        g_z = g_h * rec["s_z"]
        return g_z, [xp.matmul(g_z, p["R"])]

    def _batched(self, p):
        return True

    def _history(self, xp, x, ys, init, p, acts, reverse):
        return self._step(xp, self._projection(xp, x, p), [_shift(xp, ys, init[0], reverse)], p, acts)

    def _factors(self, xp, rec, rec0, deeplift):
        return {"s": rec["s_z"]}

    def _step_back_batched(self, xp, carry, f, p):
        g_z = carry[0] * f["s"]
        return g_z, [_step_matmul(xp, g_z, p["R"])]


@builtin_rule("GRU")
class GRU(_Recurrent):
    """z, r = f(.), h~ = g(.) (linear_before_reset as in the spec), H = (1 - z) h~ + z H_{t-1}."""

    gates = 3
    default_acts = ("Sigmoid", "Tanh")
    state_inputs = (5,)
    state_keys = ("h",)
    final_keys = ("h",)
    slope_keys = ((1, "zh"), (0, "zz"), (0, "zr"))
    gates_after_walk = "q"
    walk_r_scales = (2, 4, 4)  # q' (`_factors`)
    walk_w_scales = (2, 4, 2)  # q

    def _step(self, xp, xw, state, p, acts, with_h=True):
        (h_prev,) = state
        hidden = h_prev.shape[-1]
        rb = p["Rb"]
        hr = xp.matmul(h_prev, p["Rzr_t"]) + rb[:2 * hidden]
        zzr = xw[..., :2 * hidden] + hr  # both gates in one elementwise call (same activation)
        zz, zr = zzr[..., :hidden], zzr[..., hidden:]
        gates = acts[0](xp, zzr)
        z, r = gates[..., :hidden], gates[..., hidden:]
        rht, rbh = p["Rht"], rb[2 * hidden:]
        if p["lbr"]:
            v = xp.matmul(h_prev, rht) + rbh
            zh = xw[..., 2 * hidden:] + r * v
        else:
            v = r * h_prev
            zh = xw[..., 2 * hidden:] + xp.matmul(v, rht) + rbh
        ht = acts[1](xp, zh)
        rec = {"zz": zz, "zr": zr, "zzr": zzr, "z": z, "r": r, "v": v, "zh": zh, "ht": ht}
        if with_h:  # the batched backward reads H from the forward's Y
            rec["h"] = (1 - z) * ht + z * h_prev
        return rec

    def _setup(self, ctx, x):
        dirs, params, hidden, acts = super()._setup(ctx, x)
        for p in params:
            p["lbr"] = bool(ctx.attr("linear_before_reset", 0))
            p["Rzr_t"] = ctx.xp.ascontiguousarray(p["Rt"][:, :2 * hidden])
            p["Rht"] = ctx.xp.ascontiguousarray(p["Rt"][:, 2 * hidden:])
        return dirs, params, hidden, acts

    def _step_back(self, xp, carry, rec, rec0, prev, prev0, p, acts, deeplift):
        (g_h,) = carry
        (h_prev,) = prev
        h_prev0 = prev0[0] if deeplift else None
        hidden = h_prev.shape[-1]
        m = (lambda key: _mean(rec[key], rec0[key], True)) if deeplift else (lambda key: rec[key])
        hp = _mean(h_prev, h_prev0, True) if deeplift else h_prev
        # H = h~ + z (H_prev - h~): product rule on z and (H_prev - h~)
        g_z = g_h * (hp - m("ht"))
        g_hprev = g_h * m("z")
        g_ht = g_h - g_hprev
        g_zh = g_ht * rec["s_zh"]
        rh = p["R"][2 * hidden:]
        if p["lbr"]:
            g_r = g_zh * m("v")
            g_hprev = g_hprev + xp.matmul(g_zh * m("r"), rh)
        else:
            g_v = xp.matmul(g_zh, rh)
            g_r = g_v * hp
            g_hprev = g_hprev + g_v * m("r")
        g_zz = g_z * rec["s_zz"]
        g_zr = g_r * rec["s_zr"]
        g_hprev = g_hprev + xp.matmul(xp.concatenate([g_zz, g_zr], axis=-1), p["R"][:2 * hidden])
        return xp.concatenate([g_zz, g_zr, g_zh], axis=-1), [g_hprev]

    def _batched(self, p):
        return p["lbr"]  # without it the reset gate multiplies h_{t-1} before R: one more product a step

    def _history(self, xp, x, ys, init, p, acts, reverse):
        """`_step`'s values for all steps (linear_before_reset), each gate's input formed apart
        (`_gate_input`)."""
        h_prev = _shift(xp, ys, init[0], reverse)
        update, reset, candidate = p["gate"]
        zz, zr = self._gate_input(xp, x, h_prev, update), self._gate_input(xp, x, h_prev, reset)
        z, r = acts[0](xp, zz), acts[0](xp, zr)
        xh, v = self._gate_input(xp, x, h_prev, candidate, recurrent_bias=False)
        zh = xh + r * v
        return {"zz": zz, "zr": zr, "z": z, "r": r, "v": v, "zh": zh, "ht": acts[1](xp, zh), "h_prev": h_prev}

    def _factors(self, xp, rec, rec0, deeplift):
        """`_step_back`'s products folded (linear_before_reset): with g the multiplier of H,
        [g_zz, g_zr, g_zh] = g * q and g_{H_prev} = g * z + (g * q') R, where q' is q with
        the reset gate's mean on g_zh (the product rule's factor of R h + Rb_h)."""
        two = _values(rec, rec0, deeplift, sums=True)  # 2x the means (`walk_r_scales`)
        both = two("z")
        k_h = ((2 if deeplift else 1) - both) * rec["s_zh"]  # x2
        k_zr = [(two("h_prev") - two("ht")) * rec["s_zz"], k_h * two("v") * rec["s_zr"]]  # [k_z x2, k_r x4]
        q_prev = xp.concatenate(k_zr + [k_h * two("r")], axis=-1)  # [x2, x4, x4]
        # q' as [rows, T, 3, H]: a step multiplies it by g_H broadcast, no reshape of its own
        return {"q": xp.concatenate(k_zr + [k_h], axis=-1),  # [x2, x4, x2]
                "q_prev": q_prev.reshape(tuple(q_prev.shape[:-1]) + (3, -1)),
                "z": both * 0.5 if deeplift else both}

    def _step_back_batched(self, xp, carry, f, p):
        """The walk's step: g_{H_prev} from g_H; the gates' own multipliers, g_H * q, wait for
        the walk's end (`gates_after_walk`), so a step returns g_H."""
        (g_h,) = carry
        g3 = xp.expand_dims(g_h, -2) * f["q_prev"]  # [k, rows, (1,) 3, H]
        back = xp.matmul(g3.reshape(-1, 3 * g_h.shape[-1]), p["R"]).reshape(g_h.shape)
        return g_h, [g_h * f["z"] + back]


@builtin_rule("LSTM")
class LSTM(_Recurrent):
    """Gates i, o, f (f), cell c~ (g), C = f C_{t-1} + i c~, H = o h(C); peepholes P (iof)."""

    gates = 4
    default_acts = ("Sigmoid", "Tanh", "Tanh")
    state_inputs = (5, 6)
    unclipped = (2,)
    state_keys = ("h", "c")
    final_keys = ("h", "c")
    slope_keys = ((2, "c"), (0, "zo"), (0, "zf"), (0, "zi"), (1, "zc"))
    walk_r_scales = walk_w_scales = (2, 2, 2, 2)  # q (`_factors`)

    def _peepholes(self, ctx, d, hidden, dtype):
        p = self._const(ctx, 7, "P", required=False)
        if p is None:
            return None
        return ctx.xp.asarray(p[d].astype(dtype))

    def _step(self, xp, xw, state, p, acts):
        h_prev, c_prev = state
        hidden = h_prev.shape[-1]
        zall = xw + xp.matmul(h_prev, p["Rt"]) + p["Rb"]
        zi, zo, zf, zc = (zall[:, j * hidden:(j + 1) * hidden] for j in range(4))
        peep = p["P"]
        if peep is None:  # i, o, f in one elementwise call (same activation)
            gates = acts[0](xp, zall[:, :3 * hidden])
            i, o, f = gates[:, :hidden], gates[:, hidden:2 * hidden], gates[:, 2 * hidden:]
            cc = acts[1](xp, zc)
            c = f * c_prev + i * cc
        else:
            zi = zi + peep[:hidden] * c_prev
            zf = zf + peep[2 * hidden:] * c_prev
            i, f, cc = acts[0](xp, zi), acts[0](xp, zf), acts[1](xp, zc)
            c = f * c_prev + i * cc
            zo = zo + peep[hidden:2 * hidden] * c
            o = acts[0](xp, zo)
        hc = acts[2](xp, c)
        return {"zi": zi, "zo": zo, "zf": zf, "zc": zc, "i": i, "o": o, "f": f, "cc": cc,
                "c": c, "hc": hc, "h": o * hc}

    def _step_back(self, xp, carry, rec, rec0, prev, prev0, p, acts, deeplift):
        g_h, g_c = carry
        h_prev, c_prev = prev
        hidden = h_prev.shape[-1]
        m = (lambda key: _mean(rec[key], rec0[key], True)) if deeplift else (lambda key: rec[key])
        cp = _mean(c_prev, prev0[1], True) if deeplift else c_prev

        def slope(act, key):
            return rec["s_" + key]

        g_o = g_h * m("hc")
        g_c = g_c + g_h * m("o") * slope(acts[2], "c")
        g_zo = g_o * slope(acts[0], "zo")
        peep = p["P"]
        if peep is not None:
            g_c = g_c + g_zo * peep[hidden:2 * hidden]
        g_zf = g_c * cp * slope(acts[0], "zf")
        g_cprev = g_c * m("f")
        g_zi = g_c * m("cc") * slope(acts[0], "zi")
        g_zc = g_c * m("i") * slope(acts[1], "zc")
        if peep is not None:
            g_cprev = g_cprev + g_zi * peep[:hidden] + g_zf * peep[2 * hidden:]
        g_z = xp.concatenate([g_zi, g_zo, g_zf, g_zc], axis=-1)
        return g_z, [xp.matmul(g_z, p["R"]), g_cprev]

    def _batched(self, p):
        return p["P"] is None  # peepholes put the cell state inside the gates' inputs

    def _history(self, xp, x, ys, init, p, acts, reverse):
        """Gates of all steps from the forward's h; the cell state C = f C_prev + i c~ is the
        one recurrence left, two products a step."""
        h_init, c_init = init
        h_prev = _shift(xp, ys, h_init, reverse)
        zi, zo, zf, zc = (self._gate_input(xp, x, h_prev, gate) for gate in p["gate"])
        i, o, f = (acts[0](xp, z) for z in (zi, zo, zf))
        cc = acts[1](xp, zc)
        ic = i * cc
        steps = x.shape[1]
        steps_of = _Steps(xp)
        cs, c = [None] * steps, steps_of.enter(c_init)
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            c = steps_of.at(f, t) * c + steps_of.at(ic, t)
            cs[t] = c
        c = steps_of.stack(cs)
        return {"zi": zi, "zo": zo, "zf": zf, "zc": zc, "i": i, "o": o, "f": f, "cc": cc, "c": c,
                "c_prev": _shift(xp, c, c_init, reverse), "hc": acts[2](xp, c)}

    def _factors(self, xp, rec, rec0, deeplift):
        """`_step_back`'s products folded: g_C += g_H * a, then [g_zi, g_zo, g_zf, g_zc] =
        [g_C, g_H, g_C, g_C] * q and g_{C_prev} = g_C * f."""
        m, two = _values(rec, rec0, deeplift), _values(rec, rec0, deeplift, sums=True)
        q = xp.concatenate([two("cc") * rec["s_zi"], two("hc") * rec["s_zo"], two("c_prev") * rec["s_zf"],
                            two("i") * rec["s_zc"]], axis=-1)  # 2q (`walk_r_scales`)
        return {"a": m("o") * rec["s_c"], "q": q, "f": m("f")}

    def _step_back_batched(self, xp, carry, f, p):
        g_h, g_c = carry
        g_c = g_c + g_h * f["a"]
        g_z = xp.concatenate([g_c, g_h, g_c, g_c], axis=-1) * f["q"]
        return g_z, [_step_matmul(xp, g_z, p["R"]), g_c * f["f"]]

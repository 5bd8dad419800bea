"""A recording array module: the rules' own array code, run once, written down as ONNX.

Rules and kernels receive the array module `xp` (NumPy or CuPy) and write their forward
and backward as array code. Passed as `xp` instead, a `Tracer` hands them `Traced` arrays:
symbolic values of known shape and dtype, every operation on which appends ONNX nodes to
one graph. So each rule states its backward once, and that one text both executes (NumPy,
CuPy) and compiles (here); nothing is written twice.

Constants stay NumPy arrays (operations among them are computed at trace time and become
initializers). Shapes are concrete: a trace is for one batch shape.

The contract for traced code (what a rule must respect to compile; anything else raises
`TraceError` at compile time, so the Explainer falls back to the interpreter, never to a
wrong answer):
- data-dependent Python branches only as shortcuts on `.any()` / `.all()` of a traced
  boolean: in a trace `bool(t.any())` is True and `bool(t.all())` False, i.e. the branch
  that also handles the exceptional elements runs, so that branch must be correct for
  all data (it is, in every built-in rule: the other branch is a fast path);
- writes (`out=`, `a[key] = v`, in-place operators) into a view propagate to its base
  (a reshaped array counts as a view, as NumPy's reshape of a contiguous array is one); a
  view read after its base was written elsewhere is refused (NumPy would see the write),
  a reshaped one re-reads its array;
- boolean-mask indexing only as `a[mask] = <expression of b[mask] and scalars>`;
- small integer dtypes (int8, int16) are carried as int32 (onnxruntime has few int16 kernels).
"""
from __future__ import annotations

import builtins
import itertools
import math
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import LiftirError


class TraceError(LiftirError):
    """Array code did something the compiled engine cannot record (named in the message)."""


_WIDEN = {np.dtype(np.int8): np.dtype(np.int32), np.dtype(np.int16): np.dtype(np.int32),
          np.dtype(np.uint8): np.dtype(np.int32), np.dtype(np.uint16): np.dtype(np.int32)}
#: the shapes a one-element operand takes against rows' statistics, by rank (`_scalar_as_ones`)
_ONES_SHAPES = {rank: np.ones(rank, np.int64) for rank in range(2, 9)}


def _dt(dtype) -> np.dtype:
    d = np.dtype(dtype)
    return _WIDEN.get(d, d)


def _onnx_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(_dt(dtype))


class Recorder:
    """The graph being written: nodes, initializers, fresh names."""

    def __init__(self, opset: int, prefix: str = "liftir/"):
        if opset < 13:
            raise TraceError(f"the model's opset {opset} is below 13, the oldest the compiled engine emits")
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.prefix = prefix
        #: prefixed to the names of the nodes being recorded: the model node whose rule emits
        #: them (`compiler`), so that onnxruntime's profile of a compiled pass reads per rule
        self.scope = ""
        self._count = itertools.count()
        self._consts: dict[tuple, str] = {}
        self._keep: list = []  # arrays whose id() keys _consts stay alive
        self._const_values: dict[str, np.ndarray] = {}  # initializer name -> its array
        self._reshaped: dict[tuple, str] = {}  # (one-element constant, rank) -> its copy (`as_ones_shaped`)
        self.ops: list[str] = []
        #: every value's shape as the Traced that names it has it (None where two disagree):
        #: what `tiling` cuts the emitted graph by
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def note_shape(self, name: str, shape: tuple[int, ...]) -> None:
        known = self.shapes.setdefault(name, shape)
        if known is not None and known != shape:
            self.shapes[name] = None

    def fresh(self, hint: str = "t") -> str:
        return f"{self.prefix}{hint}{next(self._count)}"

    def const(self, value) -> str:
        """Initializer name for a NumPy value (deduplicated; broadcast views stored once)."""
        arr = np.asarray(value)
        arr = arr.astype(_dt(arr.dtype), copy=False)
        key = (id(value), arr.dtype.str, arr.shape)
        if key in self._consts:
            return self._consts[key]
        if arr.ndim and arr.size > 1 and all(s == 0 for s in arr.strides):  # a broadcast scalar
            scalar = self.const(np.ascontiguousarray(arr.reshape(-1)[:1]).reshape(()))
            name = self.node("Expand", [scalar, self.const(np.asarray(arr.shape, np.int64))])
        else:
            name = self.fresh("c")
            # (np.ascontiguousarray makes a 0-d array 1-d: keep the shape, a Gather index must be a scalar)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr).reshape(arr.shape), name))
            self._const_values[name] = arr
        self._consts[key] = name
        self._keep.append(value)
        return name

    def as_ones_shaped(self, name: str, rank: int) -> str:
        """A one-element value as shape [1] * rank: a constant's own initializer (once), a
        computed value through a Reshape in the scope being recorded (`_scalar_as_ones`)."""
        key = (name, rank)
        if key in self._reshaped:
            return self._reshaped[key]
        value = self._const_values.get(name)
        if value is None:
            return self.node("Reshape", [name, self.const(_ONES_SHAPES[rank])])
        self._reshaped[key] = reshaped = self.const(value.reshape((1,) * rank))
        return reshaped

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        outs = [self.fresh() for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(self.scope + "n"), domain=domain,
                                           **attrs))
        self.ops.append(op)
        return outs[0] if n_out == 1 else outs


class Traced:
    """A symbolic array: an ONNX value name with its shape and dtype."""

    __array_ufunc__ = None  # NumPy operators defer to ours: ndarray * Traced -> Traced.__rmul__
    __array_priority__ = 1000
    #: read by `liftir.rule.is_traced`: refusals that depend on values are skipped in a trace
    liftir_traced = True

    def __init__(self, rec: Recorder, name: str, shape, dtype, *, branch: bool | None = None):
        self.rec = rec
        self.shape = tuple(int(s) for s in shape)
        self.name = name
        self.dtype = _dt(dtype)
        self._branch = branch
        self._base: Traced | None = None
        self._key = None
        self._version = 0  # bumped by every write
        self._base_version = 0
        self._pending: list = []  # (slices, value) added into strided parts, not yet emitted
        self._lazy_view = False  # a view whose value is its base's part, emitted when read
        self._fill = None  # the fill of a created array never written since
        #: writes into a filled array along one axis, disjoint (start, stop, value), not yet
        #: emitted: one Concat when read (a buffer filled step by step, e.g. a recurrent
        #: backward's per-step gates), instead of a full-size Where per write
        self._writes: list = []
        self._writes_axis = 0
        self._reshaped: Traced | None = None  # the array this one is a reshaped view of
        self._reshaped_version = 0

    # ---- basics ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The ONNX value this array is now (a write or a view's emission moves it)."""
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        self.rec.note_shape(value, self.shape)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape)) if self.shape else 1

    def __len__(self):
        return self.shape[0]

    @property
    def T(self):  # noqa: N802
        return self.transpose()

    def __repr__(self):
        return f"Traced({self.name}, {self.shape}, {self.dtype})"

    def __bool__(self):
        if self._branch is None:
            raise TraceError("a Python branch on the value of a traced array (only `.any()` / `.all()` "
                             "shortcuts can be compiled)")
        return self._branch

    def __array__(self, *args, **kwargs):
        raise TraceError("a traced array was converted to NumPy (its value is not known at compile time)")

    def __float__(self):
        raise TraceError("float() of a traced array")

    __int__ = __index__ = __float__

    def item(self):
        raise TraceError(".item() of a traced array")

    def tolist(self):
        raise TraceError(".tolist() of a traced array")

    def _check_fresh(self):
        b = self._base
        if b is not None:
            b._check_fresh()
            if b._version != self._base_version:
                raise TraceError("a view was read after its base array was written through another view")

    @property
    def ref(self) -> str:
        src = self._reshaped
        if src is not None and src._version != self._reshaped_version:  # NumPy's view sees the write
            self.name = self.rec.node("Reshape", [src.ref, self.rec.const(np.array(self.shape, np.int64))])
            self._reshaped_version = src._version
        if self._lazy_view:  # a part of its base as the base is now (NumPy views see writes)
            self._lazy_view = False
            self.name = _emit_slice(self._base, self._key)
            self._base_version = self._base._version
        self._check_fresh()
        if self._writes:
            self._flush_writes()
        if self._pending:
            pending, self._pending = self._pending, []
            total = self if self._fill == 0 else None
            for group in _by_steps(pending):
                placed = _scatter_strided(self.rec, group, self.shape, self.dtype)
                total = placed if total is None or total is self else add(total, placed)
            if total is not self:
                self.name = (total if self._fill == 0 else add(Traced(self.rec, self.name, self.shape,
                                                                        self.dtype), total)).ref
            self._fill = None
        return self.name

    def _add_at(self, key, value) -> None:
        """self[key] += value for strided slices: kept pending, emitted as one interleave
        of all such adds when the array is next read (a pool's window scatter)."""
        spec = _basic_key(key, self.shape)
        value = _as_dtype(_lift(self.rec, value, self.dtype), self.dtype)
        sub_shape = tuple(len(range(*sl.indices(n))) for sl, n in zip(spec, self.shape))
        value = _value_for_key(value, key, self.shape, sub_shape)
        self._check_fresh()
        value.ref  # noqa: B018 - emit the value now, while what it reads is current
        if self._writes:
            self._flush_writes()
        self._pending.append((spec, value))
        self._version += 1

    # ---- writes ------------------------------------------------------------------------
    def _rebind(self, new: "Traced") -> None:
        """This array now holds `new` (same shape); a view writes through to its base."""
        new = _as_dtype(new, self.dtype)
        if new.shape != self.shape:
            new = broadcast_to(new, self.shape)
        self._check_fresh()
        self.name = new.ref
        self._pending, self._lazy_view, self._fill, self._writes = [], False, None, []
        self._version += 1
        if self._base is not None:
            self._base._assign(self._key, self)
            self._base_version = self._base._version
        src = self._reshaped
        if src is not None:  # a write into a reshaped view is a write into its array
            src._rebind(Traced(self.rec, self.rec.node("Reshape", [self.name, self.rec.const(
                np.array(src.shape, np.int64))]), src.shape, src.dtype))
            self._reshaped_version = src._version

    def _assign(self, key, value) -> None:
        """self[key] = value for a basic-index key (ints, slices, Ellipsis)."""
        spec = _basic_key(key, self.shape)
        rec = self.rec
        value = _lift(rec, value, self.dtype)
        sub_shape = tuple(len(range(*s.indices(n))) for s, n in zip(spec, self.shape))
        if all(s == slice(0, n, 1) for s, n in zip(spec, self.shape)) or all(
                len(range(*s.indices(n))) == n and s.indices(n)[2] == 1 for s, n in zip(spec, self.shape)):
            self._rebind(value._reshape_value(self.shape) if value.size == self.size else broadcast_to(value, self.shape))
            return
        value = _value_for_key(value, key, self.shape, sub_shape)
        if self._defer_write(spec, value):
            return
        if self._writes:
            self._flush_writes()
        if self._fill is not None and not self._pending and all(sl.step == 1 for sl in spec):
            # into a freshly filled array (a padded copy): one Pad with the fill
            pads = [sl.start for sl in spec] + [n - sl.stop for sl, n in zip(spec, self.shape)]
            self._rebind(Traced(rec, rec.node("Pad", [value.ref, rec.const(np.array(pads, np.int64)),
                                                      rec.const(np.asarray(self._fill, self.dtype))]),
                                self.shape, self.dtype))
            return
        placed, mask = _place(rec, value, spec, self.shape)
        out = Traced(rec, rec.node("Where", [rec.const(mask), placed.ref, self.ref]), self.shape, self.dtype)
        self._rebind(out)

    def _defer_write(self, spec, value) -> bool:
        """Keep `self[spec] = value` pending if it writes a step-1 range of one axis (every
        other axis whole) of a filled array, disjoint from the writes pending on that axis."""
        value = _as_dtype(value, self.dtype)
        value.ref  # noqa: B018 - emit the value now, while what it reads is current (it may read self)
        if self._fill is None or self._pending or self._base is not None or self._reshaped is not None:
            return False
        partial = [a for a, (sl, n) in enumerate(zip(spec, self.shape)) if sl.indices(n) != (0, n, 1)]
        if len(partial) != 1 or spec[partial[0]].step != 1:
            return False
        axis = partial[0]
        start, stop = spec[axis].start, spec[axis].stop
        if self._writes and (axis != self._writes_axis or any(start < b and a < stop for a, b, _ in self._writes)):
            return False
        self._check_fresh()
        self._writes.append((start, stop, value))
        self._writes_axis = axis
        self._version += 1
        return True

    def _flush_writes(self) -> None:
        """The pending writes and the fill between them, as one Concat along their axis."""
        writes, self._writes = sorted(self._writes, key=lambda w: w[0]), []
        axis, n, rec = self._writes_axis, self.shape[self._writes_axis], self.rec
        fill = np.asarray(self._fill, self.dtype)

        def gap(length):
            shape = self.shape[:axis] + (length,) + self.shape[axis + 1:]
            return rec.const(np.broadcast_to(fill, shape))

        parts, pos = [], 0
        for a, b, v in writes:
            if a > pos:
                parts.append(gap(a - pos))
            parts.append(v.ref)
            pos = b
        if pos < n:
            parts.append(gap(n - pos))
        self.name = rec.node("Concat", parts, axis=axis) if len(parts) > 1 else rec.node("Identity", parts)
        self._fill = None

    def __setitem__(self, key, value):
        if (isinstance(value, Traced) and value._base is self and value._key == key
                and value._base_version == self._version):
            return  # `a[key] += v`: the view's in-place add already wrote through
        if isinstance(key, Traced):  # a[mask] = expression of b[mask]
            if key.dtype != np.bool_ or key.shape != self.shape:
                raise TraceError("setting a traced array through an index array other than a full boolean mask")
            full = value.expand(key) if isinstance(value, Masked) else _lift(self.rec, value, self.dtype)
            self._rebind(where(key, full, self))
            return
        self._assign(key, value)

    def _inplace(self, other, fn):
        base = self._base
        if (fn is add and base is not None and base._base is None and base._reshaped is None
                and self._base_version == base._version and not _covers(self._key, base.shape)):
            base._add_at(self._key, other)  # `a[window] += v`: pending on the base
            self._base_version = base._version
            self._lazy_view = True
            self._version += 1
            return self
        self._rebind(fn(self, other))
        return self

    def __iadd__(self, o):
        return self._inplace(o, add)

    def __isub__(self, o):
        return self._inplace(o, subtract)

    def __imul__(self, o):
        return self._inplace(o, multiply)

    def __itruediv__(self, o):
        return self._inplace(o, divide)

    # ---- indexing ----------------------------------------------------------------------
    def __getitem__(self, key):
        if isinstance(key, Traced):
            if key.dtype == np.bool_ and key.shape == self.shape:
                return Masked(self, key)
            raise TraceError("indexing a traced array with an index array")
        if isinstance(key, np.ndarray) or (isinstance(key, tuple) and any(isinstance(k, (np.ndarray, list, Traced))
                                                                         for k in key)):
            raise TraceError("fancy indexing of a traced array")
        keys = key if isinstance(key, tuple) else (key,)
        # None adds axes, ints remove them: slice first, then reshape
        plain = tuple(k for k in keys if k is not None)
        spec = _basic_key(plain, self.shape)
        sub_shape = tuple(len(range(*s.indices(n))) for s, n in zip(spec, self.shape))
        final = _index_result_shape(keys, self.shape)
        if final != sub_shape:  # a reshaped selection is a copy as far as writes go (ints and None)
            ints = [a for a, k in enumerate(_full_key(plain, self.ndim)) if not isinstance(k, slice)]
            whole = all(sl.indices(n) == (0, n, 1) for a, (sl, n) in enumerate(zip(spec, self.shape)) if a not in ints)
            if len(ints) == 1 and whole and None not in keys and self.shape[ints[0]] == 1:
                return self.reshape(final)  # the one entry of an axis (a GRU's one direction): no copy
            if len(ints) == 1 and whole and None not in keys:  # one step of a sequence: one Gather
                rec = self.rec
                return Traced(rec, rec.node("Gather", [self.ref, rec.const(np.array(spec[ints[0]].start, np.int64))],
                                            axis=ints[0]), final, self.dtype)
            return Traced(self.rec, _emit_slice(self, plain), sub_shape, self.dtype).reshape(final)
        out = Traced(self.rec, None, sub_shape, self.dtype)
        out._base, out._key, out._base_version = self, plain, self._version
        out._lazy_view = True  # emitted when read: `a[key] += v` never reads it
        return out


    # ---- shape ops ---------------------------------------------------------------------
    def reshape(self, *shape, order="C"):
        """A reshaped view, as NumPy's of a contiguous array: writes into it reach this array."""
        out = self._reshape_value(*shape)
        if out is not self:
            out._reshaped, out._reshaped_version = self, self._version
        return out

    def _reshape_value(self, *shape):
        """The values reshaped, as of now (the tracer's own reshapes: no view)."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        shape = tuple(int(s) for s in shape)
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1]))
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if shape == self.shape:
            return self
        rec = self.rec
        return Traced(rec, rec.node("Reshape", [self.ref, rec.const(np.array(shape, np.int64))]), shape, self.dtype)

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = tuple(int(a) % self.ndim for a in axes) if axes else tuple(reversed(range(self.ndim)))
        if axes == tuple(range(self.ndim)):
            return self
        rec = self.rec
        return Traced(rec, rec.node("Transpose", [self.ref], perm=list(axes)),
                      tuple(self.shape[a] for a in axes), self.dtype)

    def swapaxes(self, a, b):
        return swapaxes(self, a, b)

    def astype(self, dtype, copy=True):
        return _as_dtype(self, dtype)

    def copy(self):
        return Traced(self.rec, self.ref, self.shape, self.dtype)

    def ravel(self):
        return self.reshape(-1)

    # ---- reductions --------------------------------------------------------------------
    def _reduce(self, op, axis, keepdims, dtype=None):
        x = self if dtype is None else _as_dtype(self, dtype)
        axes = tuple(range(self.ndim)) if axis is None else tuple(
            a % self.ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,)))
        rec = self.rec
        shape = tuple(1 if i in axes else n for i, n in enumerate(self.shape))
        if not axes:
            return x
        ref, logical = x.ref, op in ("ReduceMax", "ReduceMin") and x.dtype == np.bool_
        if logical:  # no bool reductions: as bytes (uint8 from opset 12), a quarter of int32's traffic
            ref = rec.node("Cast", [ref], to=TensorProto.UINT8)  # (no Traced dtype: cast back below)
        if not keepdims:  # the reduced axes dropped by the op itself, not by a Reshape to this
            shape = tuple(n for i, n in enumerate(self.shape) if i not in axes)  # trace's shape:
            # a fill's arrays have a length only the pass knows (tracer.fill_masked)
        if rec.opset >= 18 or (op == "ReduceSum" and rec.opset >= 13):
            name = rec.node(op, [ref, rec.const(np.array(axes, np.int64))], keepdims=int(keepdims))
        else:
            name = rec.node(op, [ref], axes=list(axes), keepdims=int(keepdims))
        if logical:
            name = rec.node("Cast", [name], to=TensorProto.BOOL)
        return Traced(rec, name, shape, x.dtype)

    def sum(self, axis=None, keepdims=False, dtype=None):
        return self._reduce("ReduceSum", axis, keepdims, dtype)

    def mean(self, axis=None, keepdims=False, dtype=None):
        return self._reduce("ReduceMean", axis, keepdims, dtype)

    def max(self, axis=None, keepdims=False):
        return self._reduce("ReduceMax", axis, keepdims)

    def min(self, axis=None, keepdims=False):
        return self._reduce("ReduceMin", axis, keepdims)

    def any(self, axis=None, keepdims=False):
        out = _as_dtype(self._reduce("ReduceMax", axis, keepdims), np.bool_)
        out._branch = True if axis is None else None
        return out

    def all(self, axis=None, keepdims=False):
        out = _as_dtype(self._reduce("ReduceMin", axis, keepdims), np.bool_)
        out._branch = False if axis is None else None
        return out

    def argmax(self, axis=None):
        if axis is None:
            return self._reshape_value(-1).argmax(0)
        axis %= self.ndim
        rec = self.rec
        name = rec.node("ArgMax", [self.ref], axis=axis, keepdims=0, select_last_index=0)
        return Traced(rec, name, self.shape[:axis] + self.shape[axis + 1:], np.int64)

    # ---- operators ---------------------------------------------------------------------
    def __add__(self, o):
        return add(self, o)

    def __radd__(self, o):
        return add(o, self)

    def __sub__(self, o):
        return subtract(self, o)

    def __rsub__(self, o):
        return subtract(o, self)

    def __mul__(self, o):
        return multiply(self, o)

    def __rmul__(self, o):
        return multiply(o, self)

    def __truediv__(self, o):
        return divide(self, o)

    def __rtruediv__(self, o):
        return divide(o, self)

    def __pow__(self, o):
        return power(self, o)

    def __matmul__(self, o):
        return matmul(self, o)

    def __rmatmul__(self, o):
        return matmul(o, self)

    def __neg__(self):
        return _unary("Neg", self)

    def __pos__(self):
        return self

    def __abs__(self):
        return _unary("Abs", self)

    def __invert__(self):
        return _unary("Not", self)

    def __and__(self, o):
        return _binary("And", self, o, np.bool_)

    __rand__ = __and__

    def __or__(self, o):
        return _binary("Or", self, o, np.bool_)

    __ror__ = __or__

    def __lt__(self, o):
        return _binary("Less", self, o, np.bool_)

    def __le__(self, o):
        return _binary("LessOrEqual", self, o, np.bool_)

    def __gt__(self, o):
        return _binary("Greater", self, o, np.bool_)

    def __ge__(self, o):
        return _binary("GreaterOrEqual", self, o, np.bool_)

    def __eq__(self, o):  # noqa: D105 - elementwise, as NumPy's
        return _binary("Equal", self, o, np.bool_)

    def __ne__(self, o):
        return ~_binary("Equal", self, o, np.bool_)

    __hash__ = object.__hash__


class Masked:
    """`a[mask]` of a traced array: usable only in `b[mask] = <elementwise expression>`."""

    __array_ufunc__ = None

    def __init__(self, full: Traced, mask: Traced):
        self.full, self.mask = full, mask

    def expand(self, mask):
        if mask is not self.mask:
            raise TraceError("boolean-mask assignment from a selection by another mask")
        return self.full

    def _op(self, o, fn):
        if isinstance(o, Masked):
            o = o.expand(self.mask)
        elif isinstance(o, Traced) or (isinstance(o, np.ndarray) and o.ndim):
            raise TraceError("a masked selection combined with an array")
        return Masked(fn(self.full, o), self.mask)

    def __gt__(self, o):
        return self._op(o, lambda a, b: a > b)

    def __lt__(self, o):
        return self._op(o, lambda a, b: a < b)

    def __ge__(self, o):
        return self._op(o, lambda a, b: a >= b)

    def __le__(self, o):
        return self._op(o, lambda a, b: a <= b)

    def __mul__(self, o):
        return self._op(o, multiply)

    def __add__(self, o):
        return self._op(o, add)

    def __sub__(self, o):
        return self._op(o, subtract)

    def __truediv__(self, o):
        return self._op(o, divide)

    def astype(self, dtype, copy=True):
        return Masked(_as_dtype(self.full, dtype), self.mask)


def _emit_slice(base: "Traced", plain) -> str:
    """The ONNX Slice of `base` for a basic index (ints kept as length-1 slices)."""
    rec = base.rec
    starts, ends, axes, steps = [], [], [], []
    for a, (sl, n) in enumerate(zip(_basic_key(plain, base.shape), base.shape)):
        start, stop, step = sl.indices(n)
        if (start, stop, step) == (0, n, 1):
            continue
        length = len(range(start, stop, step))
        if step < 0:
            stop = start + (length - 1) * step - 1 if length else start
            stop = stop if stop >= 0 else -(1 << 62)
        starts.append(start)
        ends.append(stop)
        axes.append(a)
        steps.append(step)
    name = base.ref
    if axes:
        name = rec.node("Slice", [name, rec.const(np.array(starts, np.int64)), rec.const(np.array(ends, np.int64)),
                                  rec.const(np.array(axes, np.int64)), rec.const(np.array(steps, np.int64))])
    return name


# ---- helpers ------------------------------------------------------------------------------
def _basic_key(keys, shape) -> list[slice]:
    """A basic index (ints, slices, one Ellipsis) as one slice per axis."""
    keys = keys if isinstance(keys, tuple) else (keys,)
    if any(k is Ellipsis for k in keys):
        i = keys.index(Ellipsis)
        fill = len(shape) - (len(keys) - 1)
        keys = keys[:i] + (slice(None),) * fill + keys[i + 1:]
    keys = keys + (slice(None),) * (len(shape) - len(keys))
    if len(keys) != len(shape):
        raise TraceError(f"index {keys} does not fit an array of shape {shape}")
    out = []
    for k, n in zip(keys, shape):
        if isinstance(k, slice):
            out.append(slice(*k.indices(n)))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k) % n
            out.append(slice(i, i + 1, 1))
        else:
            raise TraceError(f"unsupported index {k!r} of a traced array")
    return out


def _full_key(keys, ndim) -> tuple:
    """A basic index (no None) with its Ellipsis expanded and trailing axes filled: one key per axis."""
    if any(k is Ellipsis for k in keys):
        i = keys.index(Ellipsis)
        keys = keys[:i] + (slice(None),) * (ndim - (len(keys) - 1)) + keys[i + 1:]
    return keys + (slice(None),) * (ndim - len(keys))


def _index_result_shape(keys, shape) -> tuple[int, ...]:
    """NumPy's result shape for a basic index (ints drop axes, None adds them)."""
    return np.empty(shape, dtype=np.bool_)[keys if isinstance(keys, tuple) else (keys,)].shape \
        if np.prod(shape) < (1 << 16) else _index_shape_slow(keys, shape)


def _index_shape_slow(keys, shape):
    keys = keys if isinstance(keys, tuple) else (keys,)
    strided = np.lib.stride_tricks.as_strided(np.zeros(1, np.bool_), shape=shape, strides=(0,) * len(shape))
    return strided[keys].shape


def _covers(key, shape) -> bool:
    return all(sl.indices(n) == (0, n, 1) for sl, n in zip(_basic_key(key, shape), shape))


def _by_steps(pending):
    """Pending adds grouped by their steps (each group is one interleave)."""
    groups: dict[tuple, list] = {}
    for spec, value in pending:
        groups.setdefault(tuple(sl.step for sl in spec), []).append((spec, value))
    return list(groups.values())


def _scatter_strided(rec: Recorder, entries, shape, dtype) -> Traced:
    """The sum of values placed at strided slices (all with the same steps) of a zero array.

    Positions of one residue class (start mod step per axis) form a lattice; each value is a
    block of its class's lattice (a Pad there if it is shifted), and the classes interleave
    into the full array by one Concat per strided axis and a Reshape: no full-size Pad or
    Where per window offset.
    """
    steps = [sl.step for sl in entries[0][0]]
    strided = [a for a, st in enumerate(steps) if st > 1]
    lattice = [-(-n // st) for n, st in zip(shape, steps)]
    classes: dict[tuple, Traced] = {}
    for spec, value in entries:
        residue = tuple(sl.start % sl.step for sl in spec)
        pads = [sl.start // sl.step for sl in spec]
        pads += [m - q - n for m, q, n in zip(lattice, pads, value.shape)]
        block = value
        if any(pads):
            block = Traced(rec, rec.node("Pad", [value.ref, rec.const(np.array(pads, np.int64))]),
                           tuple(lattice), dtype)
        classes[residue] = block if residue not in classes else add(classes[residue], block)
    if not strided:
        (only,) = classes.values()
        return only
    # each class lattice gets a size-1 axis after every strided axis, then Concat fills it
    expanded = []
    for a, m in enumerate(lattice):
        expanded.append(m)
        if a in strided:
            expanded.append(1)
    where_axis = {a: a + 1 + strided.index(a) for a in strided}

    def build(prefix: tuple, level: int) -> Traced:
        if level == len(strided):
            residue = tuple(prefix[strided.index(a)] if a in strided else 0 for a in range(len(shape)))
            block = classes.get(residue)
            if block is None:
                return Traced(rec, rec.node("Expand", [rec.const(np.zeros((), dtype)),
                                                       rec.const(np.array(expanded, np.int64))]),
                              tuple(expanded), dtype)
            return block._reshape_value(expanded)
        a = strided[level]
        parts = [build(prefix + (r,), level + 1) for r in range(steps[a])]
        out_shape = list(parts[0].shape)
        out_shape[where_axis[a]] = steps[a]
        return Traced(rec, rec.node("Concat", [p.ref for p in parts], axis=where_axis[a]), tuple(out_shape), dtype)

    merged = build((), 0)._reshape_value([m * st for m, st in zip(lattice, steps)])
    if any(m * st != n for m, st, n in zip(lattice, steps, shape)):
        merged = merged[tuple(slice(0, n) for n in shape)].copy()
    return merged


def _squeezed_value_shape(vshape, target):
    """A value broadcast into a slice: NumPy aligns trailing axes."""
    return vshape if len(vshape) <= len(target) else tuple(vshape[len(vshape) - len(target):])


def _value_for_key(value: Traced, key, shape, sub_shape) -> Traced:
    """`value` as written by `a[key] = value`: broadcast to NumPy's result shape of the
    index (integer indices drop their axes), then shaped like the slice (they keep them)."""
    keys = key if isinstance(key, tuple) else (key,)
    result = _index_result_shape(keys, shape)
    if result == sub_shape:
        return broadcast_to(value._reshape_value(_squeezed_value_shape(value.shape, sub_shape)), sub_shape)
    return broadcast_to(value._reshape_value(_squeezed_value_shape(value.shape, result)), result)._reshape_value(sub_shape)


def _place(rec: Recorder, value: Traced, spec, shape):
    """`value` (the slice's shape) placed at `spec` in a zero array of `shape`, and the mask
    of the positions it covers (a constant, broadcast over untouched axes)."""
    name, cur = value.ref, list(value.shape)
    mask_shape = [n if s != slice(0, n, 1) else 1 for s, n in zip(spec, shape)]
    mask = np.zeros(mask_shape, np.bool_)
    mask[tuple(s if m > 1 or s != slice(0, 1, 1) or n == 1 else slice(None)
               for s, m, n in zip(spec, mask_shape, shape))] = True
    for a, (s, n) in enumerate(zip(spec, shape)):
        start, stop, step = s.indices(n)
        if (start, stop, step) == (0, n, 1):
            continue
        if step < 0:
            raise TraceError("writing through a reversed slice")
        length = cur[a]
        if step > 1 and length > 1:  # interleave step-1 zeros: (.., L, 1) -> (.., L, step) -> (.., L*step)
            un = rec.node("Unsqueeze", [name, rec.const(np.array([a + 1], np.int64))])
            pads = [0] * (2 * (len(cur) + 1))
            pads[len(cur) + 1 + a + 1] = step - 1
            padded = rec.node("Pad", [un, rec.const(np.array(pads, np.int64))])
            cur[a] = length * step
            name = rec.node("Reshape", [padded, rec.const(np.array(cur, np.int64))])
            covered = length * step
        else:
            covered = length
        end = n - start - covered
        if end < 0:
            name = rec.node("Slice", [name, rec.const(np.array([0], np.int64)),
                                      rec.const(np.array([covered + end], np.int64)),
                                      rec.const(np.array([a], np.int64))])
            covered += end
            end = 0
        pads = [0] * (2 * len(cur))
        pads[a], pads[len(cur) + a] = start, end
        name = rec.node("Pad", [name, rec.const(np.array(pads, np.int64))])
        cur[a] = n
    return Traced(rec, name, shape, value.dtype), mask


def _lift(rec: Recorder, v, dtype=None) -> Traced:
    """A Traced for a Traced, NumPy value or Python scalar (scalars take `dtype`, as NumPy 2)."""
    if isinstance(v, Traced):
        if v.rec is not rec:
            raise TraceError("a traced array from another compile was used")
        return v
    if isinstance(v, Masked):
        raise TraceError("a masked selection used outside `a[mask] = ...`")
    if isinstance(v, (bool, int, float, np.bool_)) and not isinstance(v, np.ndarray) and dtype is not None \
            and not isinstance(v, (np.floating, np.integer)):
        arr = np.asarray(v, dtype=dtype)
    else:
        arr = np.asarray(v)
    return Traced(rec, rec.const(arr if arr is v else arr), arr.shape, arr.dtype)


def _rec_of(*xs) -> Recorder | None:
    for x in xs:
        if isinstance(x, Traced):
            return x.rec
        if isinstance(x, Masked):
            return x.full.rec
    return None


def _as_dtype(x: Traced, dtype) -> Traced:
    dtype = _dt(dtype)
    if x.dtype == dtype:
        return x
    rec = x.rec
    out = Traced(rec, rec.node("Cast", [x.ref], to=_onnx_type(dtype)), x.shape, dtype)
    if x._fill is not None and not x._pending and not x._writes:
        out._fill = np.asarray(x._fill).astype(dtype).item()
    return out


def _result_dtype(a, b) -> np.dtype:
    def probe(v):
        if isinstance(v, Traced):
            return np.empty(0, v.dtype)
        return v
    return _dt(np.result_type(probe(a), probe(b)))


def _operand_names(rec: Recorder, ts: list[Traced], shape) -> list[str]:
    """Names for an elementwise node's operands; an unwritten filled array (ones_like...)
    is read as its scalar where the other operands already give the result's shape."""
    names = [t.ref if t._fill is None or t._pending or t._writes else None for t in ts]
    kept = [t.shape for t, n in zip(ts, names) if n is not None]
    if kept and np.broadcast_shapes(*kept) == tuple(shape):
        operands = [(n, t.shape) if n is not None else (rec.const(np.asarray(t._fill, t.dtype)), ())
                    for t, n in zip(ts, names)]
    else:
        operands = [(t.ref, t.shape) for t in ts]
    return [_scalar_as_ones(rec, n, s, shape) for n, s in operands]


def _scalar_as_ones(rec: Recorder, name: str, operand_shape, shape) -> str:
    """A one-element operand of rank 0 or 1 as an array of 1's of the result's rank where the
    result's last axis has length 1 (rows' statistics, keepdims: a LayerNorm's or a
    softmax's, a global pool's [N, C, 1, 1]). onnxruntime's CPU broadcasting walks such a
    result one element at a time: Mul of [16, 16, 16, 1] by a scalar took 50 us, by a
    [1, 1, 1, 1] 1.2 us, as of a [4096] by a scalar (onnxruntime 1.32, one thread; a [1, 1]
    serves one trailing 1, not two: a ResNet's [1, 8, 512, 1, 1] Div still took 69 us); such
    nodes were 4-9% of a transformer's compiled pass. The same arithmetic on the same
    elements: the same bits."""
    if (len(shape) not in _ONES_SHAPES or shape[-1] != 1 or len(operand_shape) > 1
            or int(np.prod(operand_shape)) != 1):
        return name
    return rec.as_ones_shaped(name, len(shape))


def _binary(op: str, a, b, out_dtype=None, dtype=None) -> Traced:
    rec = _rec_of(a, b)
    if dtype is None:
        dtype = _result_dtype(a, b)
        if op in ("And", "Or"):
            dtype = np.dtype(np.bool_)
    ta, tb = _as_dtype(_lift(rec, a, dtype), dtype), _as_dtype(_lift(rec, b, dtype), dtype)
    shape = np.broadcast_shapes(ta.shape, tb.shape)
    return Traced(rec, rec.node(op, _operand_names(rec, [ta, tb], shape)), shape,
                  dtype if out_dtype is None else out_dtype)


def _unary(op: str, x: Traced, **attrs) -> Traced:
    rec = x.rec
    return Traced(rec, rec.node(op, [x.ref], **attrs), x.shape, x.dtype)


def _elementwise(np_fn, op):
    def fn(a, b=None, out=None, **kwargs):
        args = (a,) if b is None else (a, b)
        if _rec_of(*args) is None:
            result = np_fn(*args, **kwargs)
        else:
            result = op(*args)
        if out is not None:
            if not isinstance(out, Traced):
                raise TraceError(f"{np_fn.__name__}(out=...) into a NumPy array")
            out._rebind(result)
            return out
        return result
    fn.__name__ = np_fn.__name__
    return fn


def _float_unary(op):
    def fn(x):
        x = x if x.dtype.kind == "f" else _as_dtype(x, np.float64)
        return _unary(op, x)
    return fn


def _div(a, b):
    dtype = _result_dtype(a, b)
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    return _binary("Div", a, b, dtype=dtype)


def _pow(a, b):
    if isinstance(b, (int, float)) and b == 2:
        rec = _rec_of(a)
        a = _lift(rec, a)
        return a * a
    return _binary("Pow", a, b)


add = _elementwise(np.add, lambda a, b: _binary("Add", a, b))
subtract = _elementwise(np.subtract, lambda a, b: _binary("Sub", a, b))
multiply = _elementwise(np.multiply, lambda a, b: _binary("Mul", a, b))
divide = _elementwise(np.divide, _div)
true_divide = divide
power = _elementwise(np.power, _pow)
maximum = _elementwise(np.maximum, lambda a, b: _binary("Max", a, b))
minimum = _elementwise(np.minimum, lambda a, b: _binary("Min", a, b))
absolute = abs_ = _elementwise(np.abs, lambda x: _unary("Abs", x))
exp = _elementwise(np.exp, _float_unary("Exp"))
log = _elementwise(np.log, _float_unary("Log"))
sqrt = _elementwise(np.sqrt, _float_unary("Sqrt"))
def _tanh(x: Traced) -> Traced:
    """tanh to ~2 ulps (onnxruntime's float32 Tanh is ~5 ulps off; a DeepLIFT quotient of
    two saturated tanh values would amplify the difference): float32 through onnxruntime's
    float64 Tanh (a few float64 ulps) rounded back, three nodes (a recurrent net's unrolled
    steps hold hundreds of tanh); float64 from expm1."""
    if x.dtype.kind == "f" and x.dtype.itemsize <= 4:
        return _as_dtype(_unary("Tanh", _wide(x)), x.dtype)
    x = x if x.dtype.kind == "f" else _as_dtype(x, np.float64)
    t = _expm1(-2 * abs(x))
    return _unary("Sign", x) * (-t / (t + 2))


tanh = _elementwise(np.tanh, _tanh)


def erf(x: Traced) -> Traced:
    """onnxruntime's Erf, float32 only (it has no float64 kernel; NumPy has no erf at all:
    rules/elementwise.py holds the rational fits the other backends use)."""
    if x.dtype != np.float32:
        raise TraceError(f"erf of {x.dtype}: onnxruntime's Erf is float32 only")
    return _unary("Erf", x)


sin = _elementwise(np.sin, _float_unary("Sin"))
cos = _elementwise(np.cos, _float_unary("Cos"))
sinh = _elementwise(np.sinh, _float_unary("Sinh"))
cosh = _elementwise(np.cosh, _float_unary("Cosh"))
arctan = _elementwise(np.arctan, _float_unary("Atan"))
floor = _elementwise(np.floor, lambda x: _unary("Floor", x))
ceil = _elementwise(np.ceil, lambda x: _unary("Ceil", x))
sign = _elementwise(np.sign, lambda x: _unary("Sign", x))
negative = _elementwise(np.negative, lambda x: _unary("Neg", x))
globals()["abs"] = absolute


def _no_onnx(name):
    def fn(*args, **kwargs):
        if _rec_of(*args) is None:
            return getattr(np, name)(*args, **kwargs)
        raise TraceError(f"{name} has no exact ONNX equivalent in the compiled engine")
    fn.__name__ = name
    return fn


#: arrays up to this many elements take the fewer-node float64 route of expm1
_SMALL = 1 << 15


def _expm1(x: Traced) -> Traced:
    """e^x - 1 to a few ulps. Small float32 arrays (a recurrent step's gates, of which an
    unrolled net holds hundreds): in float64, e^x - 1 (its cancellation costs float64 digits
    only, ~1e-12 relative where |x| >= 1e-4) or x (1 + x/2 + x^2/6) below, rounded back (12
    nodes). Large float32 ones (attention scores: float64 passes there cost 3x the float32
    ones): Kahan's (u - 1) x / log(u) with u = e^x, x where u == 1 (the rounding of u cancels
    in the quotient; ~5 ulps with onnxruntime's Log, 11 nodes where a Taylor polynomial took
    28, which made it most of a compiled softmax). x is clipped below at -20 first (expm1 is
    -1 there in float32; log of an underflowed u would be -inf). float64: a Taylor
    polynomial where |x| < 1/2 (e^x - 1 cancels there)."""
    if x.dtype.kind == "f" and x.dtype.itemsize <= 4 and x.size <= _SMALL:
        w = _wide(x)
        series = w * (w * (w * (1.0 / 6) + 0.5) + 1)
        return _as_dtype(where(abs(w) < 1e-4, series, _unary("Exp", w) - 1), x.dtype)
    x = x if x.dtype.kind == "f" else _as_dtype(x, np.float64)
    rec = x.rec
    if x.dtype.itemsize <= 4:
        z, u, log_u = _kahan_parts(x)
        # where u == 1 (log u = 0): (-tiny) z / (-tiny) = z, with no mask (see _TINY)
        return (u - 1 - _TINY) * (z / (log_u - _TINY))
    terms = 18  # truncated after z^18/18!: 0.5^18 / 19! ~ 3e-23 relative
    small = abs(x) < 0.5
    # z = x where |x| < 1/2 and finite elsewhere (NaN stays NaN), so that the blend below is
    # exact: each unselected value is finite and meets a 0 (onnxruntime's Where on a full
    # array costs ~20 Muls; a Clip is one pass)
    half = rec.const(np.asarray(0.5, x.dtype))
    z = Traced(rec, rec.node("Clip", [x.ref, rec.const(np.asarray(-0.5, x.dtype)), half]), x.shape, x.dtype)
    acc = z * (1.0 / math.factorial(terms)) + 1.0 / math.factorial(terms - 1)
    for n in range(terms - 2, 0, -1):
        acc = acc * z + 1.0 / math.factorial(n)
    picked = _as_dtype(small, x.dtype)
    return acc * z * picked + (_unary("Exp", x) - 1) * (1 - picked)


def _wide(x: Traced) -> Traced:
    """x in float64 (an integer or float32 array): where onnxruntime's float32 kernel is
    coarser than NumPy's, the float64 kernel rounded back is as fine or finer."""
    return _as_dtype(x, np.float64) if x.dtype != np.float64 else x


def _log1p64(u: Traced) -> Traced:
    """log(1 + u) for float64 u, to a few float64 ulps (Goldberg: log(w) * u / (w - 1) with
    w = 1 + u rounded; onnxruntime has no Log1p)."""
    w = u + 1
    exact = w == 1
    return where(exact, u, _unary("Log", w) * u / where(exact, 1.0, w - 1))


def _log1p(x: Traced) -> Traced:
    """log(1 + x), computed in float64 and rounded to x's dtype: within an ulp of NumPy's
    float32 log1p (onnxruntime's float32 Log is ~4 ulps off, too coarse for a DeepLIFT
    quotient of two close values)."""
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    return _as_dtype(_log1p64(_wide(x)), dtype)


def _logaddexp(a, b) -> Traced:
    """log(e^a + e^b) as NumPy computes it (max + log1p(e^-|a - b|), a + log 2 where a == b,
    so that equal infinities stay infinite), in float64 rounded to the operands' dtype."""
    rec = _rec_of(a, b)
    dtype = _result_dtype(a, b)
    dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
    ta, tb = _wide(_lift(rec, a, dtype)), _wide(_lift(rec, b, dtype))
    top = maximum(ta, tb)
    out = where(ta == tb, ta + math.log(2.0), top + _log1p64(_unary("Exp", -abs(ta - tb))))
    return _as_dtype(out, dtype)


#: subtracted from both terms of Kahan's quotient (u - 1) / log u instead of a mask for u == 1:
#: there it makes (-tiny) / (-tiny) = 1; elsewhere |u - 1| and |log u| are at least 5.9e-8,
#: whose ulp is far above 1e-30, so both terms keep their bits (two passes fewer than adding
#: a Cast(u == 1) to both, the same result everywhere)
_TINY = 1e-30


def _kahan_parts(x: Traced):
    """The pieces of Kahan's expm1 / exprel for a large float32 array: z = x clipped below at
    -20 (expm1 is -1 there in float32; the log of an underflowed e^z would be -inf), u = e^z,
    and log u capped at 89 (the log of the largest float32 is 88.7), so that an overflowed
    u = inf gives inf, not inf * 0."""
    rec = x.rec
    z = Traced(rec, rec.node("Clip", [x.ref, rec.const(np.asarray(-20.0, x.dtype))]), x.shape, x.dtype)
    u = _unary("Exp", z)
    return z, u, minimum(_unary("Log", u), np.asarray(89.0, x.dtype))


def exprel(x, out=None, nonpositive=False):
    """(e^x - 1) / x, 1 at x = 0 (liftir.rule.exprel in a trace). Large float32 arrays with
    x <= 0 promised (`nonpositive`: the Rescale of exp and of the logistic functions): with
    w = x / 2 and t = tanh w, exprel(x) = (t / w) / (1 - t), an identity in which nothing
    cancels for w <= 0 (t / w is tanh's own relative accuracy, 1 - t >= 1) and which needs
    no Log: onnxruntime's float32 Log is 10x its Exp or Mul (2.3 ms on 1.2M elements), and
    this is 2.5x faster than Kahan's quotient, within 3 eps of float64 (Kahan's: 2; the
    float32 Tanh kernel is within 2.7 eps, measured on [-15, 0] down to 1e-12); w = 0 gives
    (-tiny) / (-tiny) = 1 (see _TINY). Other large float32 arrays: Kahan's quotient without
    the product by x and the division by it, and no fill at 0, (u - 1 - tiny) /
    (log u + (x - z) - tiny) with z = x clipped at -20 and u = e^z (below -20 it is -1 / x,
    and x - z there puts x in place of log u = z). Otherwise expm1(x) / x, 1 where x == 0."""
    if not isinstance(x, Traced):
        raise TraceError("exprel of a NumPy value in a trace")
    large_float32 = _large_float32(x)
    if large_float32 and nonpositive:
        result = _exprel_of_double(x * 0.5)
    elif large_float32:
        z, u, log_u = _kahan_parts(x)
        result = (u - 1 - _TINY) / (log_u + (x - z) - _TINY)
    else:
        result = where(x == 0, 1.0, _expm1(x) / x)
    if out is not None:
        out._rebind(result)
        return out
    return result


def _large_float32(x: Traced) -> bool:
    return x.dtype.kind == "f" and x.dtype.itemsize <= 4 and x.size > _SMALL


def _exprel_of_double(w: Traced) -> Traced:
    """exprel(2 w) for w <= 0, from t = tanh w: (t / w) / (1 - t) (`exprel`), at w - tiny:
    never 0, so t / w needs no guard of its own at w = 0 (where it is 1, tanh's slope), one
    pass fewer than shifting both t and w. The shift leaves every |w| >= 1e-21 its bits (its
    float32 ulp is above 2e-30); below, exprel(2 w) is 1 to float32 precision at w and at
    w - tiny alike, and onnxruntime's float32 Tanh holds its accuracy down to 1e-30 and below
    (`tanh_half_ratio`)."""
    w = w - _TINY
    t = _unary("Tanh", w)  # onnxruntime's float32 kernel, not `tanh` (its float64 route)
    return (t / w) / (1 - t)


def exprel_of_negative(a, scale=1.0, out=None):
    """exprel(-scale a) for a >= 0 (liftir.rule.exprel_of_negative): `exprel`'s values, with
    the tanh identity's halving folded into the negation, a * (-scale / 2) in one Mul (both
    scalings are by powers of two for the rules' scales 1 and 2, so the same bits)."""
    if not isinstance(a, Traced):
        raise TraceError("exprel of a NumPy value in a trace")
    if _large_float32(a):
        result = _exprel_of_double(a * (-0.5 * scale))
    else:
        result = exprel(a * -scale, nonpositive=True)
    if out is not None:
        out._rebind(result)
        return out
    return result


#: added to a softmax's |dz| before tanh(a / 2) / a (`tanh_half_ratio`): a + floor is a itself
#: from 3.4e-13 up in float32 (1.8e-4 in float64), and below that tanh(a / 2) / a is 1/2 to
#: the dtype's rounding at a and at a + floor alike (1/2 - a^2/24); tanh(floor / 2) is far
#: above the 1e-30 under which onnxruntime's float32 Tanh loses accuracy
_HALF_RATIO_FLOOR = 1e-20


def tanh_half_ratio(a):
    """tanh(a / 2) / a for a >= 0, 1/2 at 0 (liftir.rule.tanh_half_ratio): t / b with
    b = a + floor and t = tanh(b / 2) (`_HALF_RATIO_FLOOR`), four full-size passes where
    (t + tiny) / (a + 2 tiny) took five; large float32 arrays through onnxruntime's float32
    Tanh (within 2.4 eps of float64 on [0, 300] down to 1e-45, measured), others through
    `tanh`. An infinite a gives 1 / inf = 0, NaN stays NaN."""
    if not isinstance(a, Traced):
        raise TraceError("tanh_half_ratio of a NumPy value in a trace")
    b = a + _HALF_RATIO_FLOOR
    half = b * 0.5
    t = _unary("Tanh", half) if _large_float32(a) else tanh(half)
    return t / b


expm1 = _elementwise(np.expm1, _expm1)


def expm1_bounded(x):
    """e^x - 1 where |x| < 1 is promised (liftir.rule.expm1_bounded). Large float32 arrays:
    2 t / (1 - t) with t = tanh(x / 2), an identity in which nothing cancels for |x| < 1
    (|t| < 0.47, 1 - t > 0.53) and which needs no Log: Kahan's quotient took a Log (10x an
    Exp in onnxruntime's float32 kernels), 1.65 ms of an Enformer-style softmax's near rows.
    Within 4 eps of float64 for 1e-30 <= |x| < 1 and at 0; below 1e-30 onnxruntime's Tanh,
    whose products go subnormal, is up to 1e-5 off relative (1e-42 absolute), which no sum of
    a softmax's terms can see. Otherwise `expm1`."""
    if not isinstance(x, Traced) or not (x.dtype.kind == "f" and x.dtype.itemsize <= 4 and x.size > _SMALL):
        return expm1(x)
    t = _unary("Tanh", x * 0.5)  # onnxruntime's float32 kernel, not `tanh` (its float64 route)
    return (t + t) / (1 - t)
log1p = _elementwise(np.log1p, _log1p)
logaddexp = _elementwise(np.logaddexp, _logaddexp)


def bincount(x, weights=None, minlength=0):
    """Sums of traced `weights` at constant positions `x`: ScatterElements(reduction="add")."""
    rec = _rec_of(x, weights)
    if rec is None:
        return np.bincount(x, weights=weights, minlength=minlength)
    if isinstance(x, Traced) or weights is None:
        raise TraceError("bincount of traced positions (or without weights)")
    if rec.opset < 16:
        raise TraceError(f"bincount needs ScatterElements(reduction='add'), opset 16; the model has {rec.opset}")
    positions = np.asarray(x, np.int64).reshape(-1)
    size = int(max(minlength, int(positions.max()) + 1 if positions.size else 0))
    w = _lift(rec, weights).reshape(-1)
    zeros = rec.const(np.broadcast_to(np.zeros((), w.dtype), (size,)))
    name = rec.node("ScatterElements", [zeros, rec.const(positions), w.ref], axis=0, reduction="add")
    return Traced(rec, name, (size,), w.dtype)


tensordot = _no_onnx("tensordot")


def take(x, indices, axis=None):
    """np.take: one Gather (constant or traced indices)."""
    rec = _rec_of(x, indices)
    if rec is None:
        return np.take(x, indices, axis=axis)
    tx = _lift(rec, x)
    if axis is None:
        tx, axis = tx.reshape(-1), 0
    axis %= tx.ndim
    ti = _as_dtype(_lift(rec, np.asarray(indices, np.int64) if not isinstance(indices, Traced) else indices),
                   np.int64)
    shape = tx.shape[:axis] + ti.shape + tx.shape[axis + 1:]
    return Traced(rec, rec.node("Gather", [tx.ref, ti.ref], axis=axis), shape, tx.dtype)


def split(x, indices_or_sections, axis=0):
    """np.split: the parts as slices of x (views, as NumPy's)."""
    if not isinstance(x, Traced):
        return np.split(x, indices_or_sections, axis=axis)
    axis %= x.ndim
    n = x.shape[axis]
    if np.ndim(indices_or_sections) == 0:
        sections = int(indices_or_sections)
        if n % sections:
            raise TraceError(f"split of {n} into {sections} unequal sections in a trace")
        bounds = [n // sections * i for i in range(1, sections)]
    else:
        bounds = [int(b) for b in indices_or_sections]
    edges = [0] + bounds + [n]
    lead = (slice(None),) * axis
    return [x[lead + (slice(a, max(a, b)),)] for a, b in zip(edges[:-1], edges[1:])]


def split_each(x, axis):
    """x's slices of length 1 along `axis` (each keeping the axis), as one Split node: a walk
    over time reads every step of a tensor once, and onnxruntime runs per-step Slices or
    Gathers of it as a node each (~15-25 us apiece on small steps) unless it fuses them."""
    if not isinstance(x, Traced):
        return [x[(slice(None),) * (axis % x.ndim) + (slice(i, i + 1),)] for i in range(x.shape[axis])]
    rec = x.rec
    axis %= x.ndim
    n = x.shape[axis]
    if n == 1:
        return [x]
    if rec.opset >= 13:
        names = rec.node("Split", [x.ref, rec.const(np.ones(n, np.int64))], n_out=n, axis=axis)
    else:
        names = rec.node("Split", [x.ref], n_out=n, axis=axis, split=[1] * n)
    shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
    return [Traced(rec, name, shape, x.dtype) for name in names]


def einsum(equation, *operands):
    """np.einsum with explicit output subscripts: one Einsum node."""
    rec = _rec_of(*operands)
    if rec is None:
        return np.einsum(equation, *operands)
    spec = equation.replace(" ", "")
    if "->" not in spec or "." in spec:
        raise TraceError(f"einsum {equation!r} without explicit output subscripts (or with ...) in a trace")
    ins, out = spec.split("->")
    terms = ins.split(",")
    dtype = _dt(np.result_type(*[np.empty(0, o.dtype) if isinstance(o, Traced) else o for o in operands]))
    ts = [_as_dtype(_lift(rec, o), dtype) for o in operands]
    dims: dict[str, int] = {}
    for term, t in zip(terms, ts):
        for c, size in zip(term, t.shape):
            dims[c] = max(dims.get(c, 1), size)
    return Traced(rec, rec.node("Einsum", [t.ref for t in ts], equation=spec), tuple(dims[c] for c in out), dtype)


def round(x, decimals=0):  # noqa: A001 - NumPy's name
    if not isinstance(x, Traced):
        return np.round(x, decimals)
    if decimals:
        raise TraceError("round(decimals=...) in a trace")
    return _unary("Round", x)


def clip(x, lo, hi, out=None):
    if _rec_of(x, lo, hi) is None:
        return np.clip(x, lo, hi)
    result = x
    if lo is not None:
        result = maximum(result, lo)
    if hi is not None:
        result = minimum(result, hi)
    if out is not None:
        out._rebind(result)
        return out
    return result


def where(cond, a, b):
    rec = _rec_of(cond, a, b)
    if rec is None:
        return np.where(cond, a, b)
    dtype = _result_dtype(a, b)
    tc = _as_dtype(_lift(rec, cond, np.bool_), np.bool_)
    ta, tb = _as_dtype(_lift(rec, a, dtype), dtype), _as_dtype(_lift(rec, b, dtype), dtype)
    shape = np.broadcast_shapes(tc.shape, ta.shape, tb.shape)
    return Traced(rec, rec.node("Where", _operand_names(rec, [tc, ta, tb], shape)), shape, dtype)


def broadcast_to(x, shape):
    if not isinstance(x, Traced):
        return np.broadcast_to(x, shape)
    shape = tuple(int(s) for s in shape)
    if x.shape == shape:
        return x
    rec = x.rec
    return Traced(rec, rec.node("Expand", [x.ref, rec.const(np.array(shape, np.int64))]), shape, x.dtype)


def reshape(x, shape):
    return x.reshape(shape)


def transpose(x, axes=None):
    return x.transpose(axes) if axes is not None else x.transpose()


def swapaxes(x, a, b):
    if not isinstance(x, Traced):
        return np.swapaxes(x, a, b)
    perm = list(range(x.ndim))
    a, b = a % x.ndim, b % x.ndim
    perm[a], perm[b] = perm[b], perm[a]
    return x.transpose(perm)


def moveaxis(x, src, dst):
    if not isinstance(x, Traced):
        return np.moveaxis(x, src, dst)
    src_l = [s % x.ndim for s in np.atleast_1d(src).tolist()]
    dst_l = [d % x.ndim for d in np.atleast_1d(dst).tolist()]
    order = [None] * x.ndim
    for s, d in zip(src_l, dst_l):
        order[d] = s
    rest = iter(a for a in range(x.ndim) if a not in src_l)
    return x.transpose([o if o is not None else next(rest) for o in order])


def expand_dims(x, axis):
    if not isinstance(x, Traced):
        return np.expand_dims(x, axis)
    axes = np.atleast_1d(axis).tolist()
    nd = x.ndim + len(axes)
    shape = list(x.shape)
    for a in sorted(a % nd for a in axes):
        shape.insert(a, 1)
    return x.reshape(shape)


def squeeze(x, axis=None):
    if not isinstance(x, Traced):
        return np.squeeze(x, axis)
    axes = [a % x.ndim for a in (np.atleast_1d(axis).tolist() if axis is not None else
                                 [i for i, n in enumerate(x.shape) if n == 1])]
    return x.reshape([n for i, n in enumerate(x.shape) if i not in axes])


def ascontiguousarray(x):
    return x if isinstance(x, Traced) else np.ascontiguousarray(x)


def asarray(x, dtype=None):
    if isinstance(x, Traced):
        return x if dtype is None else _as_dtype(x, dtype)
    return np.asarray(x, dtype=dtype)


def concatenate(xs, axis=0):
    rec = _rec_of(*xs)
    if rec is None:
        return np.concatenate(xs, axis=axis)
    dtype = _dt(np.result_type(*[np.empty(0, x.dtype) if isinstance(x, Traced) else x for x in xs]))
    ts = [_as_dtype(_lift(rec, x, dtype), dtype) for x in xs]
    axis %= ts[0].ndim
    shape = list(ts[0].shape)
    shape[axis] = builtins.sum(t.shape[axis] for t in ts)
    return Traced(rec, rec.node("Concat", [t.ref for t in ts], axis=axis), shape, dtype)


def stack(xs, axis=0):
    if _rec_of(*xs) is None:
        return np.stack(xs, axis=axis)
    return concatenate([expand_dims(x, axis) for x in xs], axis=axis)


def repeat(x, repeats, axis):
    """np.repeat with one integer count: each element `repeats` times along `axis`
    (Unsqueeze, Expand, Reshape)."""
    if not isinstance(x, Traced):
        return np.repeat(x, repeats, axis=axis)
    if not isinstance(repeats, (int, np.integer)) or axis is None:
        raise TraceError("repeat with per-element counts or without an axis in a trace")
    axis %= x.ndim
    expanded = broadcast_to(expand_dims(x, axis + 1), x.shape[:axis + 1] + (int(repeats),) + x.shape[axis + 1:])
    return expanded._reshape_value(x.shape[:axis] + (x.shape[axis] * int(repeats),) + x.shape[axis + 1:])


def tile(x, reps):
    if not isinstance(x, Traced):
        return np.tile(x, reps)
    reps = (int(reps),) if np.ndim(reps) == 0 else tuple(int(r) for r in reps)
    if len(reps) != x.ndim:
        raise TraceError(f"tile with {len(reps)} counts for an array of {x.ndim} axes in a trace")
    rec = x.rec
    return Traced(rec, rec.node("Tile", [x.ref, rec.const(np.array(reps, np.int64))]),
                  tuple(n * r for n, r in zip(x.shape, reps)), x.dtype)


def matmul(a, b, out=None):
    rec = _rec_of(a, b)
    if rec is None:
        return np.matmul(a, b)
    dtype = _result_dtype(a, b)
    ta, tb = _as_dtype(_lift(rec, a), dtype), _as_dtype(_lift(rec, b), dtype)
    if ta.ndim < 2 or tb.ndim < 2:
        raise TraceError("matmul of a 1-D operand in a trace")
    shape = np.broadcast_shapes(ta.shape[:-2], tb.shape[:-2]) + (ta.shape[-2], tb.shape[-1])
    result = Traced(rec, rec.node("MatMul", [ta.ref, tb.ref]), shape, dtype)
    if out is not None:
        out._rebind(result)
        return out
    return result


def take_along_axis(x, idx, axis):
    rec = _rec_of(x, idx)
    if rec is None:
        return np.take_along_axis(x, idx, axis)
    tx, ti = _lift(rec, x), _as_dtype(_lift(rec, idx), np.int64)
    axis %= tx.ndim
    shape = list(np.broadcast_shapes(tx.shape[:axis] + (1,) + tx.shape[axis + 1:],
                                     ti.shape[:axis] + (1,) + ti.shape[axis + 1:]))
    tx = broadcast_to(tx, tuple(shape[:axis] + [tx.shape[axis]] + shape[axis + 1:]))
    shape[axis] = ti.shape[axis]
    ti = broadcast_to(ti, tuple(shape))
    return Traced(rec, rec.node("GatherElements", [tx.ref, ti.ref], axis=axis), shape, tx.dtype)


def pad(x, width, mode="constant", constant_values=0):
    if not isinstance(x, Traced):
        return np.pad(x, width, mode=mode, constant_values=constant_values)
    if mode != "constant":
        raise TraceError(f"pad(mode={mode!r}) in a trace")
    width = np.broadcast_to(np.asarray(width, np.int64).reshape(-1, 2) if np.ndim(width) else
                            np.full((x.ndim, 2), int(width)), (x.ndim, 2))
    rec = x.rec
    pads = np.concatenate([width[:, 0], width[:, 1]]).astype(np.int64)
    value = rec.const(np.asarray(constant_values, dtype=x.dtype))
    shape = tuple(int(n + lo + hi) for n, (lo, hi) in zip(x.shape, width))
    return Traced(rec, rec.node("Pad", [x.ref, rec.const(pads), value]), shape, x.dtype)


# ---- array creation: mutable traced arrays of a known fill --------------------------------
_CURRENT: list[Recorder] = []


def _filled(shape, value, dtype) -> Traced:
    if not _CURRENT:
        raise TraceError("array creation outside a trace")
    rec = _CURRENT[-1]
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dtype = _dt(dtype or np.float64)
    const = np.broadcast_to(np.asarray(value, dtype=dtype), shape)
    name = rec.const(const) if const.size > 1 else rec.const(np.full(shape, value, dtype))
    out = Traced(rec, rec.node("Identity", [name]), shape, dtype)
    out._fill = value
    return out


def zeros(shape, dtype=np.float64):
    return _filled(shape, 0, dtype)


def ones(shape, dtype=np.float64):
    return _filled(shape, 1, dtype)


def empty(shape, dtype=np.float64):
    return _filled(shape, 0, dtype)


def full(shape, value, dtype=None):
    return _filled(shape, value, dtype if dtype is not None else np.result_type(value))


def _like(fill):
    def fn(x, dtype=None, **kwargs):
        if not isinstance(x, Traced):
            return {0: np.zeros_like, 1: np.ones_like}[fill](x, dtype=dtype)
        return _filled(x.shape, fill, dtype or x.dtype)
    return fn


zeros_like, ones_like, empty_like = _like(0), _like(1), _like(0)


def full_like(x, value, dtype=None):
    if not isinstance(x, Traced):
        return np.full_like(x, value, dtype=dtype)
    return _filled(x.shape, value, dtype or x.dtype)


def arange(*args, dtype=None):
    return np.arange(*args, dtype=dtype)


def argmax(x, axis=None):
    return x.argmax(axis) if isinstance(x, Traced) else np.argmax(x, axis)


def sum(x, axis=None, keepdims=False, dtype=None):  # noqa: A001 - NumPy's name
    return x.sum(axis, keepdims, dtype) if isinstance(x, Traced) else np.sum(x, axis, keepdims=keepdims, dtype=dtype)


def mean(x, axis=None, keepdims=False, dtype=None):
    return x.mean(axis, keepdims, dtype) if isinstance(x, Traced) else np.mean(x, axis, keepdims=keepdims,
                                                                             dtype=dtype)


class _Lib:
    class stride_tricks:  # noqa: N801 - NumPy's name
        @staticmethod
        def as_strided(*args, **kwargs):
            raise TraceError("as_strided in a trace")


lib = _Lib
for _t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "bool_", "dtype"):
    globals()[_t] = getattr(np, _t)
ndarray = Traced
errstate = np.errstate
del _t


class recording:  # noqa: N801 - a context manager named for what it does
    """`with recording(rec):` array creation (zeros, ones, full...) writes into `rec`."""

    def __init__(self, rec: Recorder):
        self.rec = rec

    def __enter__(self):
        _CURRENT.append(self.rec)
        return self.rec

    def __exit__(self, *exc):
        _CURRENT.pop()


def cond(pred, fast, general, *args):
    """`fast(*args) if pred else general(*args)` for a traced boolean `pred` (one element):
    an ONNX If, each function recorded into its own branch, so the compiled pass takes a
    rule's shortcut when the data allow it instead of always the general path. The functions
    must read only their arguments (traced ones reach them as copies: an in-place write in a
    branch stays in it) and return arrays (or a tuple of them) of the same shapes and dtypes
    in both. A `pred` known at trace time picks its branch in Python."""
    if not isinstance(pred, Traced):
        return fast(*args) if bool(pred) else general(*args)
    rec = pred.rec
    if pred.size != 1:
        raise TraceError(f"cond on a traced array of shape {pred.shape} (one element needed)")
    flag = _as_dtype(pred, np.bool_)._reshape_value(())
    refs = [a.ref if isinstance(a, Traced) else None for a in args]  # emitted here, not in a branch
    flag_ref = flag.ref
    branches, shapes = [], None
    for fn in (fast, general):
        graph, outs = _record_branch(rec, fn, [Traced(rec, r, a.shape, a.dtype) if r is not None else a
                                               for r, a in zip(refs, args)])
        sig = [(o.shape, o.dtype) for o in outs]
        if shapes is not None and sig != shapes:
            raise TraceError(f"cond branches return {shapes} and {sig}")
        shapes = sig
        branches.append(graph)
    names = rec.node("If", [flag_ref], n_out=len(shapes), then_branch=branches[0], else_branch=branches[1])
    names = [names] if len(shapes) == 1 else names
    outs = [Traced(rec, n, shape, dtype) for n, (shape, dtype) in zip(names, shapes)]
    return outs[0] if len(outs) == 1 else tuple(outs)


def _record_branch(rec: Recorder, fn, args):
    """fn(*args) recorded as a subgraph of its own (outer values read by name; constants made
    in it stay initializers of the main graph, nodes made for them stay in the branch)."""
    saved_nodes, saved_consts = rec.nodes, dict(rec._consts)
    rec.nodes = []
    try:
        out = fn(*args)
        single = not isinstance(out, tuple)
        outs = [_lift(rec, o) for o in ((out,) if single else out)]
        infos = []
        for o in outs:
            name = rec.fresh("b")
            rec.nodes.append(helper.make_node("Identity", [o.ref], [name], name=rec.fresh("n")))
            infos.append(helper.make_tensor_value_info(name, _onnx_type(o.dtype), list(o.shape)))
        graph = helper.make_graph(live_nodes(rec.nodes, {i.name for i in infos}), rec.fresh("branch"), [], infos)
    finally:
        rec.nodes, rec._consts = saved_nodes, saved_consts
    return graph, outs


def fill_masked(out: Traced, mask, fn, *args) -> Traced:
    """out[mask] = fn(*args at mask), fn evaluated on the masked elements only, as NumPy's
    fill_where does: the masked flat positions, a Gather per array argument, fn, one ScatterND
    (a rule's special case, e.g. the derivative where dx ~ 0, costs what its few elements
    cost instead of fn on every element and a full-size Where), inside an If on mask.any():
    the mask is usually empty, and finding the positions alone costs ~2-4 elementwise passes
    where a Cast and a ReduceMax cost ~1.5 (an LSTM's gates: 2.2 ms against 0.8 on
    64x100x192). fn must be elementwise: its array arguments reach it as 1-D arrays whose
    length is known only when the pass runs (they are declared of length 1), or whole, in
    their own broadcasting shapes, where most elements are masked (below).

    A large mask is searched by blocks (`_masked_by_blocks`): which blocks of _BLOCK
    consecutive elements hold a masked element comes from the reduction the If needs anyway,
    and the positions are searched in those blocks only. (By rows of the last axis, a ViT's GELU, 270
    masked of 532k, took 0.87 ms against 2.2 for the whole mask; but an Enformer-style stem's
    GELU, 1005 masked of 1M spread over 631 of its 1024 rows, still searched 62% of it.)

    Where more than `_DENSE_FILL` of the elements are masked, fn runs on every element and
    one Where picks (a count of the mask decides, in the pass): a reference one base away
    from each sequence (a variant's effect) leaves almost every activation unmoved, and the
    gathers and the scatter of nearly all elements cost an Enformer-style stem GELU 5x its
    Rescale."""
    rec = out.rec
    mask = _as_dtype(_lift(rec, mask), np.bool_)
    if mask.shape != out.shape:
        mask = broadcast_to(mask, out.shape)
    # blocks of 32 (16, 8) where the size allows, else the rows of the last axis
    block = next((b for b in (_BLOCK, _BLOCK // 2, _BLOCK // 4) if out.size % b == 0),
                 out.shape[-1] if out.ndim >= 2 else None)
    shape = tuple(out.shape)
    flat = out._reshape_value((-1,))  # the If's value flat: its branch's Reshape back was a copy
    if out.size > _SMALL and block:
        blocks = mask._reshape_value((-1, block)).any(axis=1)

        def sparse(flat, mask, blocks, *args):
            return _scatter_masked(flat, shape, _masked_by_blocks(mask, blocks, block), fn, args)

        def dense(flat, mask, blocks, *args):
            return where(mask, fn(*args), flat._reshape_value(shape))._reshape_value((-1,))

        def counted(flat, mask, blocks, *args):  # most elements masked: fn on all, one Where
            many = mask.astype(np.int32).sum() > int(out.size * _DENSE_FILL)
            return cond(many, dense, sparse, flat, mask, blocks, *args)

        def some(flat, mask, blocks, *args):  # the mask is counted only where most blocks hold some
            most = blocks.astype(np.int32).sum() > int(blocks.size * _DENSE_BLOCKS)
            return cond(most, counted, sparse, flat, mask, blocks, *args)
        filled = cond(blocks.any(), some, lambda flat, mask, blocks, *args: flat, flat, mask, blocks, *args)
    else:
        filled = cond(mask.any(), lambda flat, mask, *args: _scatter_masked(flat, shape, _masked(mask), fn, args),
                      lambda flat, mask, *args: flat, flat, mask, *args)
    out._rebind(filled._reshape_value(shape))
    return out


def _masked(mask: Traced) -> str:
    """The flat (C order) positions of the masked elements, (n,)."""
    return _true_positions(mask.rec, mask._reshape_value((-1,)).ref, mask.size)


def _true_positions(rec: Recorder, flat: str, length: int) -> str:
    """The positions (ascending, (n,) int64) where the 1-D boolean `flat` of `length` holds:
    NumPy's flatnonzero, as a Compress of 0..length-1 (its Range folded to a constant when the
    session is built). onnxruntime's NonZero gives the same positions at twice the time (one
    thread, 168K flags of which 15% true: 0.73 ms, Compress 0.46; 1%: 0.38 against 0.20)."""
    iota = rec.node("Range", [rec.const(np.asarray(0, np.int64)), rec.const(np.asarray(length, np.int64)),
                              rec.const(np.asarray(1, np.int64))])
    return rec.node("Compress", [iota, flat], axis=0)


#: elements per block that `fill_masked` searches a large mask by: for k masked elements of n,
#: the search reads n / B block flags and k B elements at most, least near B = sqrt(n / k);
#: 32 suits the masks measured (a few hundred to a thousand of 0.5-1M)
_BLOCK = 32
#: the fraction of masked elements above which `fill_masked` evaluates fn everywhere, and
#: the fraction of blocks holding one that must be exceeded first (a cheaper count): the
#: search, gathers and scatter cost ~3.5 ns per searched element and ~25 per masked one
#: (onnxruntime, one thread), fn on every element and a Where ~12 ns per element, so dense
#: pays beyond ~35% masked, and only where nearly every block is searched (an
#: Enformer-style tower GELU, 9% masked in 65% of its blocks, stays sparse without counting)
_DENSE_FILL = 0.35
_DENSE_BLOCKS = 0.85


def _masked_by_blocks(mask: Traced, blocks: Traced, length: int) -> str:
    """`_masked`'s positions (the same, in the same order) from the blocks of `length`
    consecutive elements (C order) that hold a masked element (`blocks`, their any()): the
    picked blocks' flags select from the picked blocks' positions, one Compress (NonZero's
    (block among them, offset) pairs, gathered and added, took twice the time: an
    Enformer-style tower GELU's 25K of 168K searched flags, 0.9 ms against 0.46)."""
    rec = mask.rec
    picked = _true_positions(rec, blocks.ref, blocks.size)  # (b,)
    flat_mask = mask._reshape_value((-1, length))
    inside = rec.node("Reshape", [rec.node("Gather", [flat_mask.ref, picked], axis=0),
                                  rec.const(np.array([-1], np.int64))])  # the picked blocks' flags, (b length,)
    # each picked block's flat positions, (b, length): its start plus 0..length-1
    starts = rec.node("Unsqueeze", [rec.node("Mul", [picked, rec.const(np.asarray(length, np.int64))]),
                                    rec.const(np.array([1], np.int64))])
    positions = rec.node("Add", [starts, rec.const(np.arange(length, dtype=np.int64)[None])])
    flat_positions = rec.node("Reshape", [positions, rec.const(np.array([-1], np.int64))])
    return rec.node("Compress", [flat_positions, inside], axis=0)


def _own_positions(rec, flat: str, shape: tuple, own: tuple) -> str:
    """The flat positions `flat` of an array of `shape` as positions in an operand of shape
    `own` (same rank) broadcast against it: the same where nothing broadcasts, the position
    modulo the operand's size where only leading axes do (a shared reference row: one Mod),
    else unravelled by `shape`'s strides and ravelled by the operand's."""
    if own == shape:
        return flat
    lead = next(i for i, n in enumerate(own) if n != 1) if any(n != 1 for n in own) else len(own)
    if own[lead:] == shape[lead:]:
        size = int(np.prod(own))
        return rec.node("Mod", [flat, rec.const(np.asarray(size, np.int64))]) if size > 1 else \
            rec.node("Mul", [flat, rec.const(np.asarray(0, np.int64))])
    column = rec.node("Reshape", [flat, rec.const(np.array([-1, 1], np.int64))])
    strides = np.array([int(np.prod(shape[i + 1:])) for i in range(len(shape))], np.int64)
    own_strides = np.array([int(np.prod(own[i + 1:])) if own[i] != 1 else 0 for i in range(len(own))], np.int64)
    multi = rec.node("Mod", [rec.node("Div", [column, rec.const(strides[None])]),
                             rec.const(np.array(shape, np.int64)[None])])
    weighted = rec.node("Mul", [multi, rec.const(own_strides[None])])
    return rec.node("ReduceSum", [weighted, rec.const(np.array([1], np.int64))], keepdims=0)


def _scatter_masked(flat: Traced, shape: tuple, idx: str, fn, args) -> Traced:
    """`flat` (an array of `shape`, flattened) with fn(*args at idx) written at the flat
    positions `idx` (n,): each array argument read by a 1-D Gather of its flattened self,
    the results by one ScatterND (GatherND of (n, ndim) index rows and their unravelling by
    Div and Mod cost an Enformer-style stem GELU's fill, 49K of 524K elements, 3.5 of its
    7.6 ms)."""
    rec = flat.rec
    nd = len(shape)
    picked = []
    for a in args:
        if not (isinstance(a, Traced) or getattr(a, "ndim", 0)):
            picked.append(a)
            continue
        t = _lift(rec, a)
        at = _own_positions(rec, idx, shape, (1,) * (nd - t.ndim) + t.shape)
        table = t._reshape_value((-1,))
        picked.append(Traced(rec, rec.node("Gather", [table.ref, at], axis=0), (1,), t.dtype))
    vals = _as_dtype(_lift(rec, fn(*picked), flat.dtype), flat.dtype)
    if vals.shape != (1,):
        raise TraceError(f"fill_where's function returned shape {vals.shape} for its selected elements")
    column = rec.node("Reshape", [idx, rec.const(np.array([-1, 1], np.int64))])
    return Traced(rec, rec.node("ScatterND", [flat.ref, column, vals.ref]), flat.shape, flat.dtype)


def reduce_rows_where(rows, fn, fallback, *arrays) -> Traced:
    """liftir.rule.reduce_rows_where in a trace: the rows' positions, a Gather of those rows
    per array (a broadcast array's own row index by strides), fn, and a ScatterND of its
    results into the fallback. fn's arguments are declared with every row (their count is
    known only when the pass runs), so that its ops choose their large-array forms; its
    reshapes must therefore keep the row axis symbolic (-1), as a reduction does."""
    rec = _rec_of(rows, fallback, *arrays)
    rows = _as_dtype(_lift(rec, rows), np.bool_)
    lead = rows.shape[:-1]
    count = int(np.prod(lead))
    fallback = broadcast_to(_lift(rec, fallback, None), rows.shape)
    flat = rec.node("Reshape", [rows.ref, rec.const(np.array([-1], np.int64))])
    picked = _true_positions(rec, flat, count)  # (k,)
    args = []
    for a in arrays:
        a = _lift(rec, a)
        a = a._reshape_value((1,) * (len(lead) + 1 - a.ndim) + a.shape)
        own = a.shape[:-1]
        at = _own_positions(rec, picked, tuple(lead), tuple(own))  # a broadcast array's own rows
        table = a._reshape_value((int(np.prod(own)), a.shape[-1]))
        args.append(Traced(rec, rec.node("Gather", [table.ref, at], axis=0), (count, a.shape[-1]), a.dtype))
    values = _lift(rec, fn(*args), fallback.dtype)
    if values.shape != (count, 1):
        raise TraceError(f"reduce_rows_where's function returned shape {values.shape} for rows of shape {(count, 1)}")
    values = _as_dtype(values, fallback.dtype)
    flat_values = rec.node("Reshape", [values.ref, rec.const(np.array([-1], np.int64))])
    indices = rec.node("Reshape", [picked, rec.const(np.array([-1, 1], np.int64))])
    table = fallback._reshape_value((count,))
    out = Traced(rec, rec.node("ScatterND", [table.ref, indices, flat_values]), (count,), fallback.dtype)
    return out._reshape_value(rows.shape)


def live_nodes(nodes: list, wanted: set[str]) -> list:
    """The nodes some wanted output depends on, in their order: a trace also records what
    the rules computed and did not use (the `.any()` of a shortcut, overwritten buffers)."""
    needed, keep = set(wanted), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node_reads(node))
    return keep[::-1]


def node_reads(node) -> list[str]:
    """The values a node reads: its inputs and the outer values its subgraphs (If) name."""
    reads = [i for i in node.input if i]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == attr.GRAPH else list(attr.graphs) if attr.type == attr.GRAPHS else []):
            made = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            reads += [i for n in g.node for i in node_reads(n) if i not in made]
    return reads


def is_tracer(xp: Any) -> bool:
    """True for this module (kernels emit their op as one ONNX node instead of computing)."""
    return getattr(xp, "__name__", "") == __name__


def emit_node(op: str, inputs: list, attrs: dict, out_shape=None) -> Traced:
    """One ONNX node of a kernel (Conv, ConvTranspose...) on traced/NumPy inputs; its output
    shape from ONNX shape inference when not given."""
    rec = _rec_of(*inputs)
    lifted = [None if v is None else _lift(rec, v) for v in inputs]
    names = ["" if v is None else v.ref for v in lifted]
    while names and names[-1] == "":
        names.pop()
    first = next(v for v in lifted if v is not None)
    if out_shape is None:
        out_shape = _infer_shape(op, [v for v in lifted if v is not None], attrs, rec.opset)
    return Traced(rec, rec.node(op, names, **attrs), out_shape, first.dtype)


def _infer_shape(op, inputs, attrs, opset):
    import onnx
    names = [f"i{i}" for i in range(len(inputs))]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)], "probe",
        [helper.make_tensor_value_info(n, _onnx_type(v.dtype), list(v.shape)) for n, v in zip(names, inputs)],
        [helper.make_tensor_value_info("y", _onnx_type(inputs[0].dtype), None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    out = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0]
    dims = out.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        raise TraceError(f"no static output shape for a {op} kernel")
    return tuple(d.dim_value for d in dims)


_ = builtins  # the module shadows abs/round/sum; builtins stays reachable

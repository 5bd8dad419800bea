"""Bounded evaluation of ONNX nodes on the host, for constant folding and static shapes.

A ~1 KB model can ask for unbounded work: a constant `Loop` of 1e9 iterations, a
`ConstantOfShape` of 1e12 zeros, an `Expand`/`Tile`/`Range` that multiplies a small
constant into terabytes. ONNX's reference evaluator would try; liftir refuses, naming the
node and the limit, *before* allocating. The limits are a budget shared by one folding
pass (and every subgraph it runs):
- elements: no output may hold more than `max_elements` or than its largest input (an op
  that only moves existing constants around, like Transpose of a big weight, is allowed);
- iterations: the control-flow body runs (Loop, Scan) of the whole pass;
- seconds: wall time of the whole pass, checked before every op run, inside subgraphs too.
`LIMITS` holds the defaults; they are module constants so a deployment can change them.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx.reference import ReferenceEvaluator

from .errors import FoldingLimitError

LIMITS = {"max_elements": 1 << 28, "max_iterations": 100_000, "seconds": 60.0}

# Ops whose output shape is the broadcast of their input shapes (numpy-style).
BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "PRelu"})


@dataclass
class Budget:
    max_elements: int
    max_iterations: int
    seconds: float
    started: float = field(default_factory=time.monotonic)
    iterations: int = 0
    node: str = "?"  # the top-level node being evaluated, for messages

    def refuse(self, what: str) -> None:
        raise FoldingLimitError(
            f"evaluating constant node {self.node!r} at load would {what}; liftir refuses "
            f"(limits in liftir.budget.LIMITS: {self.max_elements} elements, "
            f"{self.max_iterations} loop iterations, {self.seconds:g} s)")

    def check_time(self) -> None:
        if time.monotonic() - self.started > self.seconds:
            self.refuse(f"take more than {self.seconds:g} s")

    def check_elements(self, op_type: str, count: float, inputs) -> None:
        largest = max((np.size(a) for a in inputs if isinstance(a, np.ndarray)), default=0)
        if count > max(self.max_elements, largest):
            self.refuse(f"make a {op_type} output of {_human(count)} elements")

    def count_iteration(self, op_type: str) -> None:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            self.refuse(f"run more than {self.max_iterations} {op_type} iterations")
        self.check_time()


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("liftir_budget", default=None)


@contextlib.contextmanager
def budget(**limits: Any):
    """Share one budget over every evaluation in the block (a whole folding pass)."""
    if _current.get() is not None:  # nested: the outer budget already bounds the work
        yield _current.get()
        return
    token = _current.set(Budget(**{**LIMITS, **limits}))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def _human(count: float) -> str:
    return f"{count:.3g}" if count >= 1e6 else str(int(count))


def _ints(value) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _broadcast_size(shapes: list[tuple[int, ...]]) -> float:
    rank = max((len(s) for s in shapes), default=0)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    return math.prod(0.0 if 0 in ds else float(max(ds)) for ds in zip(*padded)) if padded else 1.0


def _predicted_elements(op_type: str, args: tuple, attrs: dict) -> float | None:
    """How many elements the op would allocate, from its inputs, before running it."""
    a = [x if isinstance(x, np.ndarray) or x is None else np.asarray(x) for x in args]
    try:
        if op_type == "ConstantOfShape":
            return math.prod(float(d) for d in _ints(a[0]))
        if op_type == "Expand":
            return _broadcast_size([a[0].shape, tuple(_ints(a[1]))])
        if op_type == "Tile":
            return float(a[0].size) * math.prod(float(r) for r in _ints(a[1]))
        if op_type == "Range":
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in a[:3])
            return max(math.ceil((limit - start) / delta), 0) if delta else math.inf
        if op_type == "OneHot":
            return float(a[0].size) * abs(float(np.asarray(a[1]).reshape(-1)[0]))
        if op_type == "Pad" and len(a) > 1 and a[1] is not None:
            pads = _ints(a[1])
            if len(pads) == 2 * a[0].ndim:
                return math.prod(float(d + pads[i] + pads[i + a[0].ndim]) for i, d in enumerate(a[0].shape))
        if op_type in ("Resize", "Upsample"):
            sizes = a[3] if op_type == "Resize" and len(a) > 3 and a[3] is not None and a[3].size else None
            if sizes is not None:
                return float(a[0].size) / max(math.prod(a[0].shape[-len(_ints(sizes)):]), 1) * math.prod(
                    float(s) for s in _ints(sizes))
            scales = a[2] if op_type == "Resize" and len(a) > 2 else (a[1] if len(a) > 1 else attrs.get("scales"))
            if scales is not None and np.size(scales):
                return float(a[0].size) * math.prod(float(s) for s in np.asarray(scales).reshape(-1))
        if op_type in BROADCAST_OPS:
            return _broadcast_size([x.shape for x in a if isinstance(x, np.ndarray)])
    except (IndexError, ValueError, TypeError, OverflowError):
        return None  # malformed inputs: let the op itself report them
    return None


_guarded: dict[type, type] = {}


def _guard(cls: type) -> type:
    """A subclass of the reference op that checks the budget around every run."""
    if cls in _guarded:
        return _guarded[cls]

    class Guarded(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            body = getattr(self, "_run_body", None)
            if callable(body):  # Loop and Scan: count every run of the body
                def counted(*b_args, **b_kwargs):
                    bud = _current.get()
                    if bud is not None:
                        bud.count_iteration(self.onnx_node.op_type)
                    return body(*b_args, **b_kwargs)
                self._run_body = counted

        def run(self, *args, **kwargs):
            bud = _current.get()
            if bud is None:
                return super().run(*args, **kwargs)
            bud.check_time()
            op_type = self.onnx_node.op_type
            if op_type == "Loop" and args and args[0] is not None and np.size(args[0]):
                trips = int(np.asarray(args[0]).reshape(-1)[0])
                if trips > bud.max_iterations - bud.iterations:
                    bud.refuse(f"run a Loop of {_human(trips)} iterations")
            attrs = {a.name: a for a in self.onnx_node.attribute}
            predicted = _predicted_elements(op_type, args, attrs)
            if predicted is not None:
                bud.check_elements(op_type, predicted, args)
            results = super().run(*args, **kwargs)
            for r in results if isinstance(results, (tuple, list)) else (results,):
                if isinstance(r, np.ndarray):
                    bud.check_elements(op_type, r.size, args)
            return results

    Guarded.__name__ = Guarded.__qualname__ = cls.__name__
    _guarded[cls] = Guarded
    return Guarded


class BoundedEvaluator(ReferenceEvaluator):
    """ONNX's reference evaluator with every op (subgraphs included) under the budget."""

    def _load_impl(self, *args, **kwargs):
        return _guard(super()._load_impl(*args, **kwargs))


def run_node(node_proto, opsets: dict[str, int], feeds: dict[str, np.ndarray], name: str) -> list:
    """Evaluate one node within the current budget (a fresh default one if none is active)."""
    with budget() as bud:
        bud.node = name
        bud.check_time()
        return BoundedEvaluator(node_proto, opsets=opsets).run(None, feeds)

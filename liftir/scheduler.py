"""The scheduler: one batched forward over [actual; reference], then multipliers in
reverse topological order.

It knows nothing of particular ops: it receives a graph whose nodes are already bound to
rules (a `Plan`), runs each rule's forward on the stacked batch, and walks the graph
backwards summing the multipliers a tensor receives from its consumers (paper eq. 4),
dropping each one as soon as it has been used.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import networkx as nx
import numpy as np

from .backend import to_host
from .batch_axis import AXIS0, BatchAxis, broadcast_rows, locate, repeat_rows, take_rows, tile_rows
from .errors import BatchAxisError, RuleError, UnsupportedOpError
from .folding import evaluate_static, static_nodes
from .graph import Graph
from .held import HELD, held_region
from .methods import Mode
from .registry import check_overrides, is_builtin, lookup
from .rule import NodeContext, Rule

logger = logging.getLogger("liftir")


class Plan:
    """A graph with every value-carrying node bound to its rule for one mode."""

    def __init__(self, graph: Graph, mode: Mode | str, method: str,
                 overrides: Mapping[str, Rule | type] | None = None, integer_inputs: tuple[str, ...] = ()):
        self.graph = graph
        self.mode = mode = Mode.parse(mode, "mode")
        self.static = static_nodes(graph)
        #: nodes computing from integer inputs only (liftir/held.py): evaluated, never differentiated
        overrides = check_overrides(overrides)
        self.held, self.embeddings = held_region(
            graph, self.static, list(integer_inputs),
            has_rule=lambda node: lookup(node.op_type, node.domain, node.opset, overrides) is not None)
        self.rules: dict[str, Rule] = {}
        self.node_cache: dict[str, dict] = {}
        self._static_values: dict[tuple, dict[str, np.ndarray]] = {}
        self._device_constants: dict[str, dict[str, Any]] = {}
        self._order_cache: dict[tuple[str, ...], list[str]] = {}
        self._ort_forward: dict[tuple[str, ...], Any] = {}
        self._batch_axes: dict[tuple, dict[str, BatchAxis]] = {}
        self._batch_free: dict[tuple, set[str]] = {}
        #: (shape, dtype) of every forward tensor per (outputs, input shapes), from a forward that
        #: exposed them all: what a forward exposing fewer fills the rest with (`Unexposed`)
        self._shapes: dict[tuple, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
        self.method = method
        #: nodes with no rule for this mode; fatal only on the way to an explained tensor
        #: (a classifier's label head, ArgMax and friends, need none to explain its scores)
        self.missing: dict[str, tuple[str, str]] = {}
        self._required: set[tuple[str, ...]] = set()
        host = set(graph.constants) | {o for n in self.static for o in graph.nodes[n].outputs}
        for name in graph.order:
            if name in self.static:
                continue
            if name in self.held:
                self.rules[name] = HELD
                continue
            node = graph.nodes[name]
            rule = lookup(node.op_type, node.domain, node.opset, overrides)
            if rule is None or not rule.supports(mode):
                self.missing[name] = (node.domain, node.op_type)
            else:
                self.rules[name] = rule
                rule.check_shapes(node, [None if i in host else _declared_shape(graph, i) for i in node.inputs])
        #: a node ties constants to the samples of a fixed batch (Rule.needs_own_references):
        #: every sample is forwarded with its own reference row
        self.own_references = any(rule.needs_own_references(graph.nodes[name], graph.constants)
                                  for name, rule in self.rules.items() if rule is not HELD)
        #: run NumPy float32 forwards as one onnxruntime session (see liftir/ort_forward.py);
        #: never when a user rule replaces a built-in one, since its forward must be the one used
        self.use_onnxruntime = all(rule is HELD or is_builtin(rule) for rule in self.rules.values())

    def require(self, tensors: tuple[str, ...]) -> None:
        """Raise UnsupportedOpError listing every rule-less node needed for `tensors`."""
        if tensors in self._required:
            return
        missing = [(name,) + self.missing[name] for name in self.order_for(tensors) if name in self.missing]
        if missing:
            raise UnsupportedOpError(missing, self.method)
        self._required.add(tensors)

    def order_for(self, tensors: tuple[str, ...]) -> list[str]:
        """Nodes needed to compute `tensors`, in topological order."""
        if tensors not in self._order_cache:
            needed: set[str] = set()
            for t in tensors:
                src = self.graph.producer.get(t)
                if src is not None:
                    needed.add(src)
                    needed |= nx.ancestors(self.graph.dag, src)
            self._order_cache[tensors] = [n for n in self.graph.order if n in needed]
        return self._order_cache[tensors]

    def device_constants(self, xp) -> dict[str, Any]:
        """Constants uploaded once per backend (a no-op for NumPy)."""
        key = xp.__name__
        if key not in self._device_constants:
            self._device_constants[key] = {k: xp.asarray(v) for k, v in self.graph.constants.items()}
        return self._device_constants[key]


def _declared_shape(graph: Graph, tensor: str):
    """An activation's shape as declared or inferred at load (None where unknown)."""
    info = graph.tensor_info(tensor) if tensor else None
    return info.shape if info is not None else None


class NotExposed(RuntimeError):
    """A rule read the value of a forward tensor its pass's forward did not expose."""


class Unexposed:
    """A forward tensor whose value the pass does not need, only its shape and dtype.

    A forward session that returns fewer tensors leaves onnxruntime free to fuse and to
    reuse buffers (liftir/compile/compiler.py: forward_exposure decides which); what the
    backward asks of the rest is their shapes. Reading the value raises NotExposed, which the
    Explainer answers by running the call again with every tensor exposed."""

    __slots__ = ("name", "shape", "dtype")

    def __init__(self, name: str, shape: tuple[int, ...], dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _refuse(self, *args, **kwargs):
        raise NotExposed(f"the forward did not expose tensor {self.name!r}, which a rule reads")

    __getitem__ = __array__ = __array_ufunc__ = __array_function__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __neg__ = __abs__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    reshape = astype = copy = transpose = sum = max = min = mean = _refuse


class Run:
    """The activations of one batched forward: P actual rows, then R reference rows."""

    def __init__(self, plan: Plan, xp, n_actual: int, n_ref: int, mode: Mode | str, options: dict):
        self.plan = plan
        self.xp = xp
        self.n_actual = n_actual
        self.n_ref = n_ref
        self.mode = Mode.parse(mode, "mode")
        self.options = options
        self.values: dict[str, Any] = {}
        self.static: dict[str, np.ndarray] = {}
        #: where the samples are in every computed tensor (liftir/batch_axis.py)
        self.batch: dict[str, BatchAxis] = {}
        self.constants = plan.device_constants(xp)

    def loc(self, name: str) -> BatchAxis:
        return self.batch.get(name, AXIS0)

    def is_host(self, name: str) -> bool:
        return name in self.plan.graph.constants or name in self.static

    def host_value(self, name: str) -> np.ndarray | None:
        if name in self.plan.graph.constants:
            return self.plan.graph.constants[name]
        return self.static.get(name)

    def device(self, name: str):
        if name in self.values:
            return self.values[name]
        if name in self.constants:
            return self.constants[name]
        if name in self.static:
            return self.xp.asarray(self.static[name])
        raise RuleError(f"tensor {name!r} has not been computed")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.device(name).shape)

    def actual_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the actual rows of `name` (what its multiplier looks like, less K)."""
        shape = self.shape(name)
        if name in self.values:
            return self.loc(name).resized(shape, self.n_actual)
        return (self.n_actual,) + tuple(shape[1:])

    def actual(self, name: str):
        value = self.device(name)
        return take_rows(value, self.loc(name), 0, self.n_actual) if name in self.values else value

    def reference(self, name: str):
        """The reference rows; one shared reference row broadcasts against the actual rows."""
        if self.n_ref == 0:
            return None
        value = self.device(name)
        if name not in self.values:
            return value
        loc = self.loc(name)
        ref = take_rows(value, loc, self.n_actual, self.n_actual + self.n_ref)
        return broadcast_rows(self.xp, ref, loc, self.n_actual) if self.n_ref == 1 else ref


def forward(plan: Plan, xp, feeds: dict[str, Any], n_actual: int, n_ref: int,
            outputs: tuple[str, ...], mode: Mode | str, options: dict, engine: str = "auto",
            exposed: frozenset[str] | None = None) -> Run:
    """Run every node needed for `outputs` over the stacked batch in `feeds`.

    engine "rules" runs each rule's forward; "auto" may use one onnxruntime session instead,
    which returns every tensor, or with `exposed` only those (and `outputs`; the rest are
    `Unexposed` shapes, known from one full forward at these input shapes).
    """
    signature = _batch_signature(outputs, feeds)
    if n_actual + n_ref == 1 and signature not in plan._batch_axes:
        _locate_one_row_by_two(plan, xp, feeds, outputs, mode, options, engine)
    if exposed is not None and (signature not in plan._shapes or signature not in plan._batch_free):
        forward(plan, xp, feeds, n_actual, n_ref, outputs, mode, options, engine)
        if signature not in plan._shapes:  # the full forward did not run on onnxruntime
            exposed = None
    run = Run(plan, xp, n_actual, n_ref, mode, options)
    run.values.update(feeds)
    if engine == "auto" and _forward_on_onnxruntime(plan, run, feeds, outputs, exposed):
        try:
            _locate_batch(plan, run, outputs, feeds)
            return run
        except BatchAxisError:
            # onnxruntime ran a batch size frozen into the graph literally; the rules' forward
            # (Reshape keeps the samples) may not: try it before refusing
            run = Run(plan, xp, n_actual, n_ref, mode, options)
            run.values.update(feeds)
    signature = tuple(sorted((k, tuple(v.shape)) for k, v in feeds.items()))
    cached_static = plan._static_values.get(signature)
    graph = plan.graph
    for name in plan.order_for(outputs):
        node = graph.nodes[name]
        if name in plan.static:
            if cached_static is not None and all(o in cached_static for o in node.outputs if o):
                run.static.update({o: cached_static[o] for o in node.outputs if o})
                continue
            shapes = {i: tuple(np.shape(run.host_value(i))) if run.is_host(i) else run.shape(i)
                      for i in node.inputs if i}  # Shape may read a constant's or static tensor's
            for out, value in zip(node.outputs, evaluate_static(graph, node, shapes, run.static)):
                if out:
                    run.static[out] = value
            continue
        ctx = NodeContext(node, run, plan)
        inputs = [run.device(i) if i else None for i in node.inputs]
        result = plan.rules[name].forward(ctx, *inputs)
        results = result if isinstance(result, tuple) else (result,)
        if len(results) < sum(1 for o in node.outputs if o):
            raise RuleError(f"rule {type(plan.rules[name]).__name__} for node {name!r} ({node.op_type}) "
                            f"returned {len(results)} outputs, the node has {len(node.outputs)}")
        for out, value in zip(node.outputs, results):
            if out:
                run.values[out] = value
    plan._static_values.setdefault(signature, {}).update(run.static)
    _locate_batch(plan, run, outputs, feeds)
    return run


def _locate_one_row_by_two(plan: Plan, xp, feeds: dict[str, Any], outputs: tuple[str, ...], mode, options,
                           engine: str) -> None:
    """The batch location of a forward of one row (a gradient method on one sample, `predict`
    of one), from a forward of that row twice. With one row every axis of length 1 may hold
    the samples, and shape propagation cannot tell which: an Enformer-style attention's
    sequence-major (L, N, heads, d) MatMuls were refused as mixing samples, so saliency of a
    single sequence failed where two worked. The locations (axis, outer, inner factors) do
    not depend on the row count, so the two-row run's serve the one-row run. A graph that
    runs one row only (a batch size frozen into it) leaves the one-row run to locate itself."""
    doubled = {k: xp.concatenate([v, v]) for k, v in feeds.items()}
    try:
        forward(plan, xp, doubled, 2, 0, outputs, mode, options, engine)
    except Exception:  # noqa: BLE001 - the one-row run goes on as before and reports its own errors
        return
    two = _batch_signature(outputs, doubled)
    one = _batch_signature(outputs, feeds)
    plan._batch_axes[one] = plan._batch_axes[two]
    plan._batch_free[one] = plan._batch_free[two]


def _batch_signature(outputs: tuple[str, ...], feeds: dict[str, Any]) -> tuple:
    return (tuple(outputs),) + tuple(sorted((k, tuple(v.shape)) for k, v in feeds.items()))


def _locate_batch(plan: Plan, run: Run, outputs: tuple[str, ...], feeds: dict[str, Any]) -> None:
    """Fill `run.batch` (cached per input signature); BatchAxisError names a mixing node."""
    signature = _batch_signature(outputs, feeds)
    if signature not in plan._batch_axes:
        graph = plan.graph
        nodes = [graph.nodes[n] for n in plan.order_for(outputs) if n not in plan.static]
        rows = next(iter(feeds.values())).shape[0]
        free: set[str] = set()
        plan._batch_axes[signature] = locate(
            nodes, feeds, lambda t: tuple(run.values[t].shape) if t in run.values else None,
            run.host_value, rows,
            lambda node: plan.rules[node.name].type_only_inputs if node.name in plan.rules else (),
            lambda name: name in graph.constants, batch_free=free)
        plan._batch_free[signature] = free
    run.batch = plan._batch_axes[signature]
    for name in plan._batch_free[signature]:  # no samples in them: constants of this run
        if name in run.values:
            run.static[name] = to_host(run.values.pop(name))


def backward(run: Run, seeds: dict[str, Any], wrt: tuple[str, ...], outputs: tuple[str, ...],
             observer: Callable | None = None, node_backward: Callable | None = None) -> dict[str, Any]:
    """Propagate multipliers from `seeds` (tensor -> (K, P, ...)) back to the tensors `wrt`.

    `observer(node, ctx, grad_outs, grad_ins)`, if given, sees every node's multipliers
    (used by `liftir check` to test each rule's local summation-to-delta).
    `node_backward(rule, ctx, grad_outs)` replaces `rule.backward` (RevealCancel uses it).
    """
    plan = run.plan
    graph = plan.graph
    grads: dict[str, Any] = dict(seeds)
    captured: dict[str, Any] = {}  # multipliers of wanted intermediate tensors
    pending = {w for w in wrt if w in graph.producer}
    k = next(iter(seeds.values())).shape[0]
    for name in reversed(plan.order_for(outputs)):
        if name in plan.static:
            continue
        node = graph.nodes[name]
        for o in node.outputs:
            if o in pending and o in grads:
                captured[o] = grads[o]
        pending.difference_update(node.outputs)
        if not pending and all(w in captured or w in graph.producer for w in wrt):
            break  # only intermediate tensors were wanted, and all are reached
        if name in plan.held:
            continue  # integer inputs are held: no multipliers past their embeddings
        grad_outs = [grads.pop(o, None) if o else None for o in node.outputs]
        if all(g is None for g in grad_outs):
            continue
        rule = plan.rules[name]
        ctx = NodeContext(node, run, plan)
        grad_ins = node_backward(rule, ctx, grad_outs) if node_backward else rule.backward(ctx, *grad_outs)
        if observer is not None:
            observer(node, ctx, grad_outs, grad_ins)
        # rules may answer for every optional input the op can have (Conv's bias, Gemm's C)
        # even where the node omits it: trailing Nones are fine
        if not isinstance(grad_ins, (tuple, list)) or any(g is not None for g in grad_ins[len(node.inputs):]):
            raise RuleError(f"rule {type(rule).__name__}.backward for node {name!r} ({node.op_type}) must "
                            f"return a tuple with one multiplier (or None) per input ({len(node.inputs)})")
        for index, (inp, g) in enumerate(zip(node.inputs, grad_ins)):
            if g is None or not inp or run.is_host(inp):
                continue
            expected = (k,) + ctx.input_shape(index)
            if tuple(g.shape) != expected:
                raise RuleError(f"rule {type(rule).__name__} for node {name!r} ({node.op_type}) returned a "
                                f"multiplier of shape {tuple(g.shape)} for input {index} ({inp!r}); "
                                f"expected {expected}")
            grads[inp] = grads[inp] + g if inp in grads else g
    return {w: captured[w] if w in captured else grads.get(w) for w in wrt}


class PairedRun(Run):
    """Every (actual i, reference b) pair of a forward over N actual rows and their references.

    DeepLIFT-SHAP needs DeepLIFT for N*B pairs; the forward ran the N actual rows once, and
    this view expands the stored activations into pairs (sample-major) as rules ask for them.
    References are B rows shared by all samples (tiled N times) or N*B rows already in pair
    order (each sample's own references).
    """

    def __init__(self, base: Run, pairs: int, tile_references: bool = True):
        n = base.n_actual
        super().__init__(base.plan, base.xp, n * pairs, n * pairs, base.mode, base.options)
        self.values, self.static, self.batch = base.values, base.static, base.batch
        self.n_samples, self.pairs, self.tile_references = n, pairs, tile_references
        self._expanded_cache: dict[tuple[str, bool], Any] = {}

    def _expanded(self, name: str, reference: bool):
        key = (name, reference)
        if key not in self._expanded_cache:
            value, loc = self.values[name], self.loc(name)
            rows = loc.rows_of(tuple(value.shape))
            if not reference:
                actual = take_rows(value, loc, 0, self.n_samples)
                self._expanded_cache[key] = repeat_rows(self.xp, actual, loc, self.pairs)
            elif self.tile_references:
                part = take_rows(value, loc, self.n_samples, rows)
                self._expanded_cache[key] = tile_rows(self.xp, part, loc, self.n_samples)
            else:
                self._expanded_cache[key] = take_rows(value, loc, self.n_samples, rows)
        return self._expanded_cache[key]

    def actual(self, name: str):
        return self._expanded(name, False) if name in self.values else self.device(name)

    def reference(self, name: str):
        return self._expanded(name, True) if name in self.values else self.device(name)


def _forward_on_onnxruntime(plan: Plan, run: Run, feeds: dict[str, Any], outputs: tuple[str, ...],
                            exposed: frozenset[str] | None = None) -> bool:
    """Fill `run` with one onnxruntime session's forward when that is possible; else False.
    With `exposed`, the session returns those tensors, `outputs`, the static ones and those
    without samples; the others become `Unexposed` with their shapes from `plan._shapes`.

    Used for NumPy float32 batches of standard-domain graphs; anything else, or any error
    from onnxruntime (e.g. a batch size frozen into the graph), falls back to the rules,
    and an error says so in one logged line (onnxruntime's own log is silenced).
    """
    if not plan.use_onnxruntime or run.xp is not np or any(v.dtype.kind == "f" and v.dtype != np.float32
                                                           for v in feeds.values()):
        return False
    order = plan.order_for(outputs)
    signature = _batch_signature(outputs, feeds)
    if exposed is not None:
        exposed = frozenset(exposed) | set(outputs) | plan._batch_free[signature] | {
            o for n in order if n in plan.static for o in plan.graph.nodes[n].outputs if o}
    key = (tuple(outputs), exposed)
    if key not in plan._ort_forward:
        graph = plan.graph
        standard = all(graph.nodes[n].domain in ("", "ai.onnx") for n in order)
        session = None
        if standard:
            try:
                from .ort_forward import OrtForward
                session = OrtForward(graph, order, outputs, exposed)
            except Exception as exc:  # onnxruntime cannot build it: the rules will do
                _log_fallback("cannot build a session for this graph", exc)
                session = None
        plan._ort_forward[key] = session
    session = plan._ort_forward[key]
    if session is None:
        return False
    try:
        values = session(feeds)
    except Exception as exc:
        _log_fallback(f"failed on a batch of {next(iter(feeds.values())).shape[0]} rows", exc)
        plan._ort_forward[key] = None
        return False
    if all(v.size for v in feeds.values()) and any(
            getattr(values.get(o), "size", 1) == 0 for n in order if n not in plan.static
            for o in plan.graph.nodes[n].outputs if o):
        return False  # an empty activation from full inputs: the rules say which node and why
    shapes = plan._shapes.setdefault(signature, {}) if exposed is None else plan._shapes[signature]
    for name in order:
        node = plan.graph.nodes[name]
        for o in node.outputs:
            if o and o not in values and o in shapes and name not in plan.static:
                run.values[o] = Unexposed(o, *shapes[o])
            if not o or o not in values:
                continue
            if name in plan.static:
                run.static[o] = values[o]
            else:
                run.values[o] = values[o]
                if exposed is None:
                    shapes[o] = (tuple(values[o].shape), values[o].dtype)
    return all(o in run.values or o in run.static for o in outputs)


def _log_fallback(what: str, exc: Exception) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    logger.warning("onnxruntime %s (%s); liftir's own rules compute the forward instead "
                   "(slower, same results)", what, first[:300])

"""Compile one attribution pass (forward over [actual; reference] and the multiplier pass)
into one ONNX model, run by one onnxruntime session.

The forward is the model's own nodes (what the interpreter runs on onnxruntime too); the
backward is the scheduler's reverse walk with every rule's own backward, run once on the
recording array module (`tracer`), so the emitted graph is the interpreter's arithmetic
written down. The seed (which targets, with which weights) is an input of the graph, so
one compiled pass serves every target spec of the same shape: passes are cached per
(explained tensor, attributed tensors, batch shapes, number of targets).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import scheduler
from ..methods import METHODS
from ..onnx_models import make_model
from ..ort_forward import runnable
from ..threads import session_options
from . import device, tiling, tracer
from .forms import FormTrial
from .sinking import sink_into_branches
from .tracer import Recorder, Traced, TraceError

logger = logging.getLogger("liftir")

SEED = "liftir_seed"
#: methods whose passes compile: integrated gradients its gradient passes over points of
#: the path, DeepLIFT-SHAP its passes over (sample, reference) pairs, RevealCancel its split
#: forward and backward
COMPILED_METHODS = tuple(METHODS)


def multiplier_name(tensor: str) -> str:
    return f"liftir_multiplier:{tensor}"


@dataclass
class CompiledPass:
    """One compiled forward + backward for fixed shapes, and how to read its outputs."""

    model: onnx.ModelProto
    feeds: tuple[str, ...]
    seed_shape: tuple[int, ...]
    multipliers: dict[str, str | None]  # attributed tensor -> output name (None: not reached)
    values: tuple[str, ...]  # forward tensors returned (explained, attributed intermediates)
    batch: dict
    n_actual: int
    n_ref: int
    seed_dtype: np.dtype = np.dtype(np.float32)
    #: the sessions of its forms, the one that runs chosen on its calls (liftir/compile/forms.py)
    trial: FormTrial | None = None
    runner: object = None  # IO binding on a GPU (None: session.run on host arrays)
    #: DeepLIFT-SHAP: the (sample, reference) pairs each sample's multipliers come for, the
    #: references shared by all samples (tiled) or each sample's own (0: not a paired pass)
    pairs: int = 0
    tile_references: bool = True
    #: RevealCancel: tensors whose split D = d+ - d- the pass returns too
    split: tuple[str, ...] = ()
    #: the values' shapes (the tracer's, the probe forward's), which `tiling` cuts the graph by
    shapes: dict | None = None

    @property
    def session(self):
        """The onnxruntime session its calls run now (None before `start`)."""
        return None if self.trial is None else self.trial.session

    def tiled_form(self, xp=np, threads: int = 1) -> onnx.ModelProto | None:
        """The pass with its long elementwise chains run chunk by chunk in cache (`tiling`; the
        same bits), the second form a one-thread CPU session may run (liftir/compile/forms.py),
        or None: no chain pays, or a session elsewhere (two threads per chunk measured no
        faster: the nodes' overhead doubles)."""
        if xp is not np or threads != 1 or not self.shapes:
            return None
        tiled = tiling.tiled_model(self.model, self.shapes)
        return None if len(tiled.graph.node) == len(self.model.graph.node) else tiled

    def start(self, xp=np, threads: int | None = None):
        """Open the onnxruntime session on the device of array module `xp`: the CPU for
        NumPy, the CUDA provider with IO binding for CuPy (liftir/compile/device.py), with
        `threads` intra-op threads (None: `cpu_threads()`). On one CPU thread the tiled form
        is built too once the pass is called in a loop, and the faster kept (`FormTrial`)."""
        import onnxruntime as ort
        options = session_options(shared_arena=xp is np)
        if threads is not None:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3

        def build(model):
            session = ort.InferenceSession(model.SerializeToString(), options, providers=device.providers_for(xp))
            device.require_providers(session, xp)
            return session

        first = build(self.model)
        builders = []
        if xp is np and options.intra_op_num_threads == 1 and self.shapes:
            def tiled():
                try:
                    form = self.tiled_form(xp, 1)
                    return None if form is None else build(form)  # None: no chain pays, nothing to try
                except Exception as exc:  # noqa: BLE001 - the graph as compiled runs, as it did
                    logger.warning("liftir: the tiled form of a compiled pass did not build (%s: %s); "
                                   "the pass keeps its graph as compiled", type(exc).__name__, exc)
                    return None
            builders.append(tiled)
        self.trial = FormTrial(first, builders)
        self.runner = None if xp is np else device.BoundRunner(first, self.model, xp, device.device_of(xp))
        return self

    def __call__(self, feeds: dict[str, np.ndarray], seed: np.ndarray):
        spreads = [spread_name(w) for w in self.split]
        names = [o for o in self.multipliers.values() if o] + list(self.values) + spreads
        if self.runner is not None:
            inputs = {k: feeds[k] for k in self.feeds}
            inputs[SEED] = seed
            out = dict(zip(names, self.runner(names, inputs)))
        else:
            inputs = {k: np.ascontiguousarray(feeds[k]) for k in self.feeds}
            inputs[SEED] = np.ascontiguousarray(seed)
            out = dict(zip(names, self.trial.run(lambda session: session.run(names, inputs))))
        grads = {w: (out[o] if o else None) for w, o in self.multipliers.items()}
        values = {v: out[v] for v in self.values}
        if self.split:
            values["liftir_spread"] = {w: out[spread_name(w)] for w in self.split}
        return grads, values


def _standard(node) -> None:
    if node.domain not in ("", "ai.onnx"):
        raise TraceError(f"node {node.name!r}: op {node.domain}::{node.op_type} is not a standard ONNX op")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.proto.attribute):
        raise TraceError(f"node {node.name!r} ({node.op_type}) holds subgraphs")


live_nodes = tracer.live_nodes


def _listing(failures: list[str]) -> str:
    return f"{len(failures)} node(s) cannot be compiled:\n" + "\n".join(f"  - {f}" for f in failures)


def _recording_failures(rec: Recorder, failures: list[str], inner=None):
    """A node_backward (around `inner`, default the rule's own backward) that notes a rule's
    TraceError by node and goes on with zero multipliers, so that one compile attempt lists
    every node that does not compile. The nodes a rule emits are named after its model node."""
    def node_backward(rule, ctx, grad_outs):
        rec.scope = f"{ctx.node.name} ({ctx.node.op_type}) backward/"
        try:
            return rule.backward(ctx, *grad_outs) if inner is None else inner(rule, ctx, grad_outs)
        except TraceError as exc:
            node = ctx.node
            failures.append(f"node {node.name!r} ({node.op_type}, rule {type(rule).__name__}): {exc}")
            k = next(g for g in grad_outs if g is not None).shape[0]
            return tuple(None if not name or ctx.is_const(i) else
                         tracer.zeros((k,) + ctx.input_shape(i), np.float32)
                         for i, name in enumerate(node.inputs))
        finally:
            rec.scope = ""
    return node_backward


def spread_name(tensor: str) -> str:
    return f"liftir_spread:{tensor}"


@dataclass
class _Trace:
    """One pass recorded on the tracer: its probe forward, the recorded backward, its seed."""

    rec: Recorder
    probe: scheduler.Run
    seed: Traced
    seed_shape: tuple[int, ...]
    grads: dict
    spread: dict | None


def _trace(plan: scheduler.Plan, feeds: dict[str, np.ndarray], n_actual: int, n_ref: int,
           explained: str, wrt: tuple[str, ...], k: int, options: dict, pairs: int,
           tile_references: bool, split: tuple[str, ...] | None) -> _Trace:
    """Record the pass's backward (and RevealCancel's split forward) over a probe forward."""
    graph = plan.graph
    if not plan.use_onnxruntime:
        raise TraceError("a user rule replaces a built-in one (its forward is array code, not an ONNX op)")
    for v in feeds.values():
        if v.dtype.kind == "f" and v.dtype != np.float32:
            raise TraceError(f"inputs of dtype {v.dtype} (the compiled engine runs float32 models)")
    order = [n for n in plan.order_for((explained,)) if n not in plan.static]
    failures = []
    for name in order:
        try:
            _standard(graph.nodes[name])
        except TraceError as exc:
            failures.append(str(exc))
    if failures:
        raise TraceError(_listing(failures))
    # shapes, dtypes, static values and where the samples are: one forward of the interpreter
    probe = scheduler.forward(plan, np, feeds, n_actual, n_ref, (explained,), plan.mode, options)
    opset = graph.opsets.get("", graph.opsets.get("ai.onnx", 0))
    rec = Recorder(opset)
    with tracer.recording(rec):
        run = scheduler.Run(plan, tracer, n_actual, n_ref, plan.mode, options)
        run.static, run.batch = probe.static, probe.batch
        for name, value in probe.values.items():
            run.values[name] = Traced(rec, name, value.shape, value.dtype)
        if pairs:
            run = scheduler.PairedRun(run, pairs, tile_references=tile_references)
        seed_shape = (k,) + probe.loc(explained).resized(tuple(probe.values[explained].shape),
                                                         n_actual * pairs if pairs else n_actual)
        seed = Traced(rec, SEED, seed_shape, probe.values[explained].dtype)
        inner, start, spread = None, seed, None
        if split is not None:
            from .. import revealcancel
            spread = revealcancel.split_forward(run, plan.order_for((explained,)), split)
            inner, start = revealcancel.node_backward(spread), tracer.concatenate([seed, seed])
        grads = scheduler.backward(run, {explained: start}, wrt, (explained,),
                                   node_backward=_recording_failures(rec, failures, inner))
    if failures:
        raise TraceError(_listing(failures))
    return _Trace(rec, probe, seed, seed_shape, grads, spread)


def _read_by_backward(trace: _Trace, feeds) -> set[str]:
    """The forward tensors the recorded backward reads the values of: everything else only
    lends its shape. All recorded nodes count, not only live ones: the interpreter runs the
    same rules on arrays and also reads what a trace leaves dead (a shortcut's `.any()`)."""
    read = {i for node in trace.rec.nodes for i in tracer.node_reads(node)}
    return {t for t in trace.probe.values if t in read and t not in feeds}


def _returned(explained: str, wrt: tuple[str, ...], feeds) -> tuple[str, ...]:
    """The forward tensors a pass returns whatever its backward reads: the explained tensor
    and the attributed intermediate ones."""
    return tuple(dict.fromkeys(t for t in (explained,) + tuple(wrt) if t not in feeds))


def _exposure(trace: _Trace, feeds, explained: str, wrt: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_read_by_backward(trace, feeds)) | frozenset(_returned(explained, wrt, feeds))


def forward_exposure(plan: scheduler.Plan, feeds: dict[str, np.ndarray], n_actual: int, n_ref: int,
                     explained: str, wrt: tuple[str, ...], k: int, options: dict, pairs: int = 0,
                     tile_references: bool = True, split: tuple[str, ...] | None = None) -> frozenset[str]:
    """The forward tensors a pass needs the values of: what its backward reads, the explained
    tensor and the attributed ones. The interpreter's forward session exposes these and no
    more, as the compiled pass of the same call does (`_exposure` for both): both then give
    onnxruntime the same freedom to fuse, and their forwards agree bit for bit. Raises
    TraceError as compile_pass."""
    trace = _trace(plan, feeds, n_actual, n_ref, explained, wrt, k, options, pairs, tile_references, split)
    return _exposure(trace, feeds, explained, wrt)


def compile_pass(plan: scheduler.Plan, feeds: dict[str, np.ndarray], n_actual: int, n_ref: int,
                 explained: str, wrt: tuple[str, ...], k: int, options: dict, pairs: int = 0,
                 tile_references: bool = True, split: tuple[str, ...] | None = None) -> CompiledPass:
    """Trace one pass for these feed shapes (values are irrelevant: only shapes are read).

    With `pairs` (DeepLIFT-SHAP), the forward runs the samples and references once and the
    backward every (sample, reference) pair, as `scheduler.PairedRun` expands them: the
    expansion is recorded too, so it happens inside the graph.

    With `split` (RevealCancel: the tensors the split starts from, the attributed ones), the
    graph also runs the forward of the positive/negative split and the RevealCancel
    backward, on a seed of k targets stacked twice ([m+; m-]), and returns the split D of
    each `wrt` tensor.

    Raises TraceError naming what cannot be compiled; the caller falls back to the interpreter.
    """
    graph = plan.graph
    trace = _trace(plan, feeds, n_actual, n_ref, explained, wrt, k, options, pairs, tile_references, split)
    rec, probe, seed, seed_shape, grads, spread = (trace.rec, trace.probe, trace.seed, trace.seed_shape,
                                                   trace.grads, trace.spread)
    order = [n for n in plan.order_for((explained,)) if n not in plan.static]
    opset = rec.opset
    with tracer.recording(rec):
        outputs, multipliers = [], {}
        for w in wrt if split is not None else ():
            d = spread[w]
            d = d if isinstance(d, Traced) else tracer._lift(rec, d)
            rec.nodes.append(helper.make_node("Identity", [d.ref], [spread_name(w)], name=rec.fresh("n")))
            outputs.append(helper.make_tensor_value_info(spread_name(w), tracer._onnx_type(d.dtype), list(d.shape)))
        for w in wrt:
            g = grads.get(w)
            if g is None:
                multipliers[w] = None
                continue
            if not isinstance(g, Traced):
                g = tracer._lift(rec, g)
            name = multiplier_name(w)
            rec.nodes.append(helper.make_node("Identity", [g.ref], [name], name=rec.fresh("n")))
            outputs.append(helper.make_tensor_value_info(name, tracer._onnx_type(g.dtype), list(g.shape)))
            multipliers[w] = name
    values = _returned(explained, wrt, feeds)
    # the forward tensors the backward reads are graph outputs too, as in the interpreter's
    # forward session of the same call (forward_exposure): onnxruntime then fuses the same
    # nodes in both, and the two forwards agree bit for bit (fusing a ResNet's residual Add
    # into its convolution moved the attributions by 2e-5 of their largest)
    exposed = _exposure(trace, feeds, explained, wrt)
    produced = [o for name in order for o in graph.nodes[name].outputs if o in exposed]
    for v in dict.fromkeys(values + tuple(produced)):
        outputs.append(helper.make_tensor_value_info(v, tracer._onnx_type(probe.values[v].dtype),
                                                     list(probe.values[v].shape)))
    used = {i for name in order for i in graph.nodes[name].forward_reads if i}
    initializers = [numpy_helper.from_array(np.asarray(graph.constants[c]), c) for c in sorted(used)
                    if c in graph.constants]
    initializers += [numpy_helper.from_array(np.asarray(probe.static[s]), s) for s in sorted(used)
                     if s in probe.static and s not in graph.constants]
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for name, v in feeds.items()]
    inputs.append(helper.make_tensor_value_info(SEED, tracer._onnx_type(seed.dtype), list(seed_shape)))
    forward_nodes = [p for name in order for p in runnable(graph.nodes[name])]
    opsets = dict(graph.opsets)
    opsets[""] = opset
    opsets.pop("ai.onnx", None)
    nodes = live_nodes(forward_nodes + rec.nodes, {o.name for o in outputs})
    nodes = sink_into_branches(nodes, {o.name for o in outputs})
    read = {i for node in nodes for i in tracer.node_reads(node)}
    model = make_model(
        helper.make_graph(nodes, "liftir_explainer", inputs, outputs,
                          [t for t in initializers + rec.initializers if t.name in read]),
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], producer_name="liftir")
    shapes = dict(rec.shapes)
    shapes.update({name: tuple(v.shape) for name, v in feeds.items()})
    shapes.update({name: tuple(v.shape) for name, v in probe.values.items()})
    return CompiledPass(model, tuple(feeds), seed_shape, multipliers, values, probe.batch, n_actual, n_ref,
                        np.dtype(seed.dtype), pairs=pairs, tile_references=tile_references,
                        split=tuple(wrt) if split is not None else (), shapes=shapes)

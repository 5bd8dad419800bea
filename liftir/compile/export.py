"""The explainer as a standalone ONNX model: serve attributions with onnxruntime alone.

`export(explainer, batch_size, target)` wraps one compiled pass (liftir/compile/compiler.py)
with what `Explainer.attribute` does around it, recorded by the same tracer: stack each
input with its baseline, seed the chosen target(s), and turn multipliers into attributions
(m * (x - x0) for DeepLIFT, m * x for gradient x input, m otherwise) and, for DeepLIFT,
the convergence deltas. The result takes the model's inputs (batch fixed to `batch_size`, other open dimensions
given by `shapes`) and, for reference methods, one baseline row per input (`<name>_baseline`,
shape (1, ...); (N, ...) for models with integer inputs, whose reference rows are each
sample's own: pad ids, the sample's own mask), and outputs one attribution per attributed
tensor (`<name>_attribution`, shaped like it, or (N, K, ...) for several targets: the float
inputs, and for integer inputs the embeddings computed from them) and `delta` (N,) / (N, K).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import targets
from ..errors import InputError
from ..methods import Attribution
from ..rule import difference
from . import tracer
from .compiler import SEED, compile_pass
from .tracer import Recorder, Traced, TraceError

STACKED = "liftir_stacked:"


def export(explainer, batch_size: int = 1, target=None, output: str | None = None,
           shapes: dict | None = None) -> onnx.ModelProto:
    ex = explainer
    method = ex.method
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    n = batch_size
    out = ex._output_for_call(output)
    explained, stripped = ex.explained_tensor(out)
    zeros = [np.zeros((n,) + dims, info.dtype) for info, dims in zip(ex.inputs, sample_shapes(ex, shapes))]
    # integer inputs (token ids, masks) are held at their reference values row by row: a
    # sample's reference keeps its own mask, so every input takes one baseline row per sample
    held = len(ex.attributed) != len(ex.input_names) or bool(ex.plan.embeddings)
    ref_rows = n if held else 1
    refs = [z[:ref_rows].copy() for z in zeros] if method.uses_reference else None
    cost, rest = ex._row_cost(zeros, explained)
    if isinstance(target, list):
        target = np.asarray(target)
    k = targets.n_targets(rest, target)
    axis = targets.softmax_axis(ex.graph, out) if stripped else -1
    feeds = ex._feeds(zeros, refs)
    wrt = tuple(ex.attributed)
    compiled = compile_pass(ex.plan, feeds, n, 0 if refs is None else ref_rows, explained, wrt, k, ex.options)
    for name in wrt:
        if compiled.batch.get(name) is not None and compiled.batch[name].axis != 0:
            raise TraceError(f"attributed tensor {name!r} does not hold the samples on axis 0")
    dtype = compiled.seed_dtype  # the explained output's (the inputs may be token ids)
    seed = targets.seed((n,) + rest, target, stripped, axis, slice(None), dtype).astype(dtype)
    model = compiled.model
    opset = next(o.version for o in model.opset_import if o.domain == "")
    rec = Recorder(opset, prefix="liftir_export/")
    graph = model.graph
    # the pass's stacked inputs become Concat(actual, baseline) of the new inputs
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in feeds:
                node.input[i] = STACKED + name
    new_inputs, outputs = [], []
    for info, z in zip(ex.inputs, zeros):
        name = info.name
        elem = helper.np_dtype_to_tensor_dtype(z.dtype)
        new_inputs.append(helper.make_tensor_value_info(name, elem, list(z.shape)))
        if refs is not None:
            new_inputs.append(helper.make_tensor_value_info(f"{name}_baseline", elem, [ref_rows] + list(z.shape[1:])))
            rec.nodes.append(helper.make_node("Concat", [name, f"{name}_baseline"], [STACKED + name], axis=0,
                                              name=rec.fresh("n")))
        else:
            rec.nodes.append(helper.make_node("Identity", [name], [STACKED + name], name=rec.fresh("n")))
    with tracer.recording(rec):
        seed_t = tracer._lift(rec, seed)
        rec.nodes.append(helper.make_node("Identity", [seed_t.ref], [SEED], name=rec.fresh("n")))
        sums = None
        for name in wrt:
            x, x0 = _actual_and_reference(rec, compiled, ex, name, n, ref_rows if refs is not None else 0)
            m_name = compiled.multipliers.get(name)
            if m_name is None:
                a = tracer.zeros((k,) + x.shape, x.dtype)
            else:
                m = Traced(rec, m_name, (k,) + x.shape, x.dtype)
                if method.attribution is Attribution.DELTA:
                    a = m * difference(tracer, x, x0)  # equal infinities (a -inf mask) did not move
                elif method.attribution is Attribution.INPUT:
                    a = m * x
                else:
                    a = m
            if method.attribution is Attribution.DELTA:
                s = a.reshape(k, n, -1).sum(axis=2)
                sums = s if sums is None else sums + s
            outputs.append((f"{name}_attribution", _per_sample(a, k, target)))
        if method.attribution is Attribution.DELTA:
            y = Traced(rec, explained, (n + ref_rows,) + rest, dtype)
            diff = y[:n] - y[n:]
            explained_diff = (seed_t * diff).reshape(k, n, -1).sum(axis=2)
            outputs.append(("delta", _per_sample(sums - explained_diff, k, target)))
    del graph.input[:]
    graph.input.extend(new_inputs)
    graph.initializer.extend(rec.initializers)
    for nm, value in outputs:
        rec.nodes.append(helper.make_node("Identity", [value.ref], [nm], name=rec.fresh("n")))
    body = _topological(list(graph.node) + rec.nodes,
                        {i.name for i in graph.input} | {t.name for t in graph.initializer})
    # only what the outputs need: onnxruntime warns, each time a session is built, of every
    # initializer no node reads (a constant the trace made for a branch it dropped)
    body = tracer.live_nodes(body, {nm for nm, _ in outputs})
    read = {name for node in body for name in tracer.node_reads(node)}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(body)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                        for nm, v in outputs)
    graph.name = f"liftir_{method.name}"
    model.doc_string = (f"liftir {method.name} explainer of {out!r}, target {target!r}, batch {n}: inputs "
                        f"{', '.join(ex.input_names)}" + (" and one baseline row each" if refs is not None else ""))
    onnx.checker.check_model(model)
    return model


def sample_shapes(ex, shapes: dict | None) -> list[tuple[int, ...]]:
    """Each input's per-sample shape: the model's where it declares every dimension, else
    what `shapes` gives (a text model's sequence length is usually left open)."""
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(ex.input_names))
    if unknown:
        raise InputError(f"shapes names no input of the model: {unknown}; its inputs are {ex.input_names}")
    result, missing = [], []
    for info in ex.inputs:
        declared = None if info.shape is None else tuple(info.shape[1:])
        given = shapes.get(info.name)
        if given is not None:
            given = tuple(int(d) for d in given)
            if any(d < 1 for d in given) or (declared is not None and (len(given) != len(declared) or any(
                    isinstance(d, int) and d > 0 and d != g for d, g in zip(declared, given)))):
                raise InputError(f"shapes[{info.name!r}] = {given} does not fit the model's input shape "
                                 f"(N, {', '.join(str(d) if isinstance(d, int) and d > 0 else '?' for d in declared or ())})")
            result.append(given)
        elif declared is not None and all(isinstance(d, int) and d > 0 for d in declared):
            result.append(declared)
        else:
            missing.append(f"{info.name} (N, {', '.join(str(d) if isinstance(d, int) and d > 0 else '?' for d in declared or ('...',))})")
            result.append(())
    if missing:
        raise InputError("export needs every input's shape past the batch: give shapes={name: (...)} "
                         f"(CLI: --shape NAME=D1,D2) for {'; '.join(missing)}")
    return result


def _actual_and_reference(rec, compiled, ex, name: str, n: int, ref_rows: int):
    """The actual rows of attributed tensor `name` and its reference rows (None without):
    a float input is the graph input and its baseline; an embedding (a float tensor computed
    from integer inputs) is the pass's forward tensor, its first n rows and the rest."""
    if name in ex.input_names:
        info = ex.inputs[ex.input_names.index(name)]
        shape = (n,) + tuple(info.shape[1:])
        x = Traced(rec, name, shape, np.dtype(info.dtype))
        return x, (Traced(rec, f"{name}_baseline", (ref_rows,) + shape[1:], x.dtype) if ref_rows else None)
    out = next(o for o in compiled.model.graph.output if o.name == name)
    shape = tuple(d.dim_value for d in out.type.tensor_type.shape.dim)
    full = Traced(rec, name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type)))
    return full[:n], (full[n:] if ref_rows else None)


def _topological(nodes, available: set[str]) -> list:
    """Nodes ordered so that each comes after the producers of its inputs (ONNX requires it)."""
    ready, pending, order = set(available) | {""}, list(nodes), []
    while pending:
        left = []
        for nd in pending:
            if all(i in ready for i in tracer.node_reads(nd)):
                order.append(nd)
                ready.update(nd.output)
            else:
                left.append(nd)
        if len(left) == len(pending):
            raise TraceError(f"the exported graph is not connected: {left[0].op_type} node {left[0].name!r} "
                             f"reads {[i for i in tracer.node_reads(left[0]) if i not in ready]}")
        pending = left
    return order


def _per_sample(a: Traced, k: int, target) -> Traced:
    """(K, N, ...) -> (N, ...) for one target, (N, K, ...) for several (as attribute returns)."""
    if targets.several(k, target):
        return tracer.moveaxis(a, 0, 1)
    return a.reshape(a.shape[1:])

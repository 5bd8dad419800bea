"""Tiling a compiled pass for the CPU's cache (liftir/compile/tiling.py) changes no bit.

The rewrite runs a region of elementwise ops chunk by chunk along one axis; every chunk's
arithmetic is element for element the whole op's, so the tiled graph must give exactly the
untiled graph's values, in onnxruntime, for any wiring: broadcast inputs (a shared
reference row), row reductions whose rows stay whole, values read outside the region in
the middle of it, and an outside node that reads the region and feeds it again. The
compiled passes of real models (recurrent nets, attention) are checked the same way with
small chunks, so that the tracer's shapes, which the rewrite cuts by, are exercised too.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from liftir.compile import forms, tiling


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _chain_model(rows=64, steps=40, width=96):
    """A Rescale-like chain over x [rows, steps, width] against a shared reference row
    [1, steps, width]: row maxima (a reduction kept whole), a total over everything read by
    an outside node in the middle (whose value flows back in), two values leaving midway."""
    def n(op, inputs, outputs, **attrs):  # named after its output
        return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)

    nodes = [
        n("Sub", ["x", "r"], ["d"]), n("Abs", ["d"], ["a"]), n("Neg", ["a"], ["na"]), n("Exp", ["na"], ["e"]),
        n("ReduceMax", ["d", "axis2"], ["m"], keepdims=1),  # per row: the chunk axis stays whole
        n("Sub", ["d", "m"], ["s"]), n("Tanh", ["s"], ["t"]), n("Mul", ["t", "e"], ["te"]),
        n("Add", ["te", "a"], ["u"]),
        n("ReduceSum", ["a"], ["total"], keepdims=1),  # over every axis: outside the region
        n("Mul", ["u", "total"], ["v"]),  # reads the outside node, which read the region
        n("Add", ["e", "one"], ["e1"]), n("Div", ["v", "e1"], ["w"]), n("Mul", ["w", "half"], ["y"]),
        n("Transpose", ["te"], ["te_t"], perm=[1, 0, 2]),  # a value leaving midway
    ]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, steps, width]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, steps, width])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in (
            ("y", [rows, steps, width]), ("te_t", [steps, rows, width]), ("total", [1, 1, 1]),
            ("e", [rows, steps, width]))],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    return model, shapes


def _feeds(rows=64, steps=40, width=96, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, steps, width)).astype(np.float32),
            "r": rng.standard_normal((1, steps, width)).astype(np.float32)}


def test_a_tiled_chain_gives_the_same_bits():
    model, shapes = _chain_model()
    tiled = tiling.tiled_model(model, shapes, chunk_elements=4096)
    onnx.checker.check_model(tiled)
    ops = [node.op_type for node in tiled.graph.node]
    chunks = {node.name.rsplit("/chunk", 1)[1] for node in tiled.graph.node if "/chunk" in node.name}
    assert len(chunks) >= 6 and ops.count("Slice") >= len(chunks) and "Concat" in ops
    # the shared reference row is broadcast along the chunk axis (rows): read whole, not sliced
    assert any("r" in node.input for node in tiled.graph.node if "/chunk" in node.name)
    assert not any(node.op_type == "Slice" and node.input[0] == "r" for node in tiled.graph.node)
    feeds = _feeds()
    want = _session(model).run(None, feeds)
    got = _session(tiled).run(None, feeds)
    for w, g in zip(want, got):
        assert w.shape == g.shape and np.array_equal(w, g)


def test_the_region_is_cut_where_an_outside_node_reads_it_and_feeds_it_again():
    """ReduceSum(a) reads the region and Mul(u, total) reads it back: one block in place of
    the whole region would be a cycle. The rewrite is valid ONNX in topological order."""
    model, shapes = _chain_model()
    tiled = tiling.tiled_model(model, shapes, chunk_elements=4096)
    made = {i.name for i in tiled.graph.input} | {i.name for i in tiled.graph.initializer}
    for node in tiled.graph.node:
        assert all(i in made for i in node.input if i), node.name
        made.update(node.output)


def test_small_frames_and_short_chains_are_left_alone():
    model, shapes = _chain_model(rows=4, steps=8, width=16)  # 512 elements: already in cache
    assert tiling.tiled_model(model, shapes).graph.node == model.graph.node
    n = helper.make_node
    graph = helper.make_graph(  # two ops between an input and an output: nothing to gain
        [n("Mul", ["x", "x"], ["s"]), n("Add", ["s", "x"], ["y"])], "short",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 40, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 40, 96])])
    short = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    shapes = {"x": (64, 40, 96), "s": (64, 40, 96), "y": (64, 40, 96)}
    assert tiling.tiled_model(short, shapes, chunk_elements=4096).graph.node == short.graph.node


def test_unknown_shapes_and_reductions_over_the_chunk_axis_are_not_cut():
    model, shapes = _chain_model()
    del shapes["s"]  # a value without a shape: its nodes stay whole
    tiled = tiling.tiled_model(model, shapes, chunk_elements=4096)
    names = {node.name for node in tiled.graph.node}
    assert "s" in names and not any(name.startswith("s/chunk") for name in names)
    feeds = _feeds(seed=1)
    for w, g in zip(_session(model).run(None, feeds), _session(tiled).run(None, feeds)):
        assert np.array_equal(w, g)
    frames = {0: ((64, 40, 96), (0,))}  # a reduction over the frame's chunk axis has no key
    assert tiling._region_keys(frames, 4096) == {}


# ---- random wiring ------------------------------------------------------------------------
_UNARY = ("Abs", "Neg", "Tanh", "Exp", "Sigmoid")
_BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min")
def _input_shapes(dims):
    a, b, c = dims
    return {"x": (a, b, c), "y": (a, b, c), "ref": (1, b, c), "rows": (a, b, 1)}


def _random_model(seed, dims=(24, 10, 16), size=18):
    """A random DAG over full tensors [a, b, c], a broadcast reference row, per-row values
    [a, b, 1] and scalars: unary and binary elementwise ops, Where on a comparison,
    reductions over one axis (kept whole in a chunk when it is not the chunk axis), totals over
    every axis and Transposes read by later nodes (outside the region, feeding it again),
    and several values leaving as graph outputs."""
    rng = np.random.default_rng(seed)
    shapes = _input_shapes(dims)
    values = dict(shapes)
    nodes, inits = [], [numpy_helper.from_array(np.array(axes, np.int64), "axis" + "".join(map(str, axes)))
                        for axes in ([0], [1], [2], [1, 2])]
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    values["half"] = ()

    def pick():
        return str(rng.choice(sorted(values)))

    for k in range(size):
        out, kind = f"v{k}", rng.random()
        if kind < 0.3:
            op = str(rng.choice(_UNARY))
            a = pick()
            nodes.append(helper.make_node(op, [a], [out], name=out))
            values[out] = values[a]
        elif kind < 0.75:
            op, a, b = str(rng.choice(_BINARY)), pick(), pick()
            nodes.append(helper.make_node(op, [a, b], [out], name=out))
            values[out] = tuple(np.broadcast_shapes(values[a], values[b]))
        elif kind < 0.85:
            a, b, c = pick(), pick(), pick()
            nodes.append(helper.make_node("Greater", [a, b], [out + "c"], name=out + "c"))
            nodes.append(helper.make_node("Where", [out + "c", b, c], [out], name=out))
            values[out] = tuple(np.broadcast_shapes(values[a], values[b], values[c]))
        elif kind < 0.93:
            a = next((v for v in rng.permutation(sorted(values)) if len(values[v]) == 3), "x")
            op, axes = str(rng.choice(["ReduceSum", "ReduceMax"])), ([0], [1], [2], [2], [1, 2])[rng.integers(5)]
            nodes.append(helper.make_node(op, [a, "axis" + "".join(map(str, axes))], [out], name=out, keepdims=1))
            values[out] = tuple(1 if i in axes else n for i, n in enumerate(values[a]))
        elif kind < 0.97:
            a = pick()
            nodes.append(helper.make_node("ReduceSum", [a], [out], name=out, keepdims=1))
            values[out] = (1,) * len(values[a])
        else:
            a = next((v for v in rng.permutation(sorted(values)) if values[v] == tuple(dims)), "x")
            nodes.append(helper.make_node("Transpose", [a], [out + "t"], name=out + "t", perm=[1, 0, 2]))
            nodes.append(helper.make_node("Transpose", [out + "t"], [out], name=out, perm=[1, 0, 2]))
            values[out] = values[a]
    made = [f"v{k}" for k in range(size)]
    outputs = sorted(set(rng.choice(made, size=4)) | {made[-1]})
    graph = helper.make_graph(
        nodes, f"random{seed}",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, values[name]) for name in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, values


@pytest.mark.parametrize("dims", [(24, 10, 16), (3, 40, 32), (7, 5, 64)])  # chunk axes 0, 1, 2
def test_random_wiring_tiles_to_the_same_bits(monkeypatch, dims):
    """Forty random graphs, every region tiled whatever its estimated gain, in chunks of 256
    elements (chunks of one row or step among them): the rewrite is valid ONNX in
    topological order and gives the untiled values bit for bit (NaN and infinities
    included); most graphs have a region to cut."""
    monkeypatch.setattr(tiling, "MIN_GAIN", -np.inf)
    rng = np.random.default_rng(0)
    feeds = {name: (rng.standard_normal(shape) * 3).astype(np.float32) for name, shape in _input_shapes(dims).items()}
    tiled_graphs = 0
    for seed in range(40):
        model, shapes = _random_model(seed, dims)
        tiled = tiling.tiled_model(model, shapes, chunk_elements=256)
        onnx.checker.check_model(tiled)
        made = {i.name for i in tiled.graph.input} | {i.name for i in tiled.graph.initializer}
        for node in tiled.graph.node:
            assert all(i in made for i in node.input if i), (seed, node.name)
            made.update(node.output)
        tiled_graphs += any("/chunk" in node.name for node in tiled.graph.node)
        with np.errstate(all="ignore"):
            want = _session(model).run(None, feeds)
            got = _session(tiled).run(None, feeds)
        for w, g in zip(want, got):
            assert w.shape == g.shape and np.array_equal(w, g, equal_nan=True), seed
    assert tiled_graphs >= 20


# ---- compiled passes of real models ------------------------------------------------------
pytest.importorskip("torch")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks small enough that the zoo's test-sized models are tiled, on one thread (the
    only sessions the compiled engine tiles): a recurrent net's gates of hidden size 12 are
    each a tensor of their own (rules/recurrent.py `_gate_input`), a few chunks of 32."""
    monkeypatch.setattr(tiling, "CHUNK_ELEMENTS", 32)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "1")


@pytest.mark.parametrize("name", ["lstm_bi", "gru", "enformer_small"])
def test_compiled_recurrent_and_attention_passes_tile_bit_for_bit(name, small_chunks, caplog):
    """A pass called in a loop runs its graph as compiled, then its tiled form
    (liftir/compile/forms.py), then the faster: every call gives the same bits."""
    import liftir
    import test_architectures as ta
    proto = ta.exported(name, "ts17")
    arch = ta.ARCHS[name]
    _, feeds = ta._feeds(arch, 2, seed=3)
    base = ta._reference(arch, feeds)
    x, x0, target = feeds["input"], base["input"], ta._target(name)
    ex = liftir.Explainer(proto, "deeplift", engine="compiled")
    with caplog.at_level("WARNING", logger="liftir"):
        calls = [ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
                 for _ in range(2 * forms.CALLS + 1)]
    assert "did not build" not in caplog.text  # the tiled form ran its calls
    passes = [p for p in ex._compiled.passes.values() if p is not None]
    assert passes, ex._compiled.reasons
    made = [p.tiled_form(threads=1) for p in passes]
    assert any("/chunk" in node.name for m in made if m is not None for node in m.graph.node)  # it was tiled
    assert all(len(m.graph.node) > len(p.model.graph.node) for m, p in zip(made, passes) if m is not None)
    assert all(p.trial.chosen is not None for p in passes)  # both forms ran, one was kept
    first, first_delta = calls[0]
    for result, delta in calls[1:]:
        assert np.array_equal(result, first) and np.array_equal(delta, first_delta)
    # and it conserves: sum of attributions = f(x) - f(x0) from onnxruntime
    ref = np.broadcast_to(x0, x.shape)
    diff = (ta._ort(proto, {"input": x})[:, target] - ta._ort(proto, {"input": ref})[:, target]).astype(np.float64)
    total = first.astype(np.float64).reshape(len(x), -1).sum(axis=1)
    assert float(np.abs(total - diff).max()) <= ta.DL32_TOL * float(np.abs(diff).max())


def test_sessions_on_several_threads_are_not_tiled(monkeypatch):
    model, shapes = _chain_model()
    from liftir.compile.compiler import CompiledPass
    compiled = CompiledPass(model, ("x", "r"), (1,), {}, (), {}, 1, 1, shapes=shapes)
    monkeypatch.setattr(tiling, "CHUNK_ELEMENTS", 4096)
    assert compiled.tiled_form(threads=2) is None
    assert compiled.tiled_form(threads=1) is not None
    monkeypatch.setattr(tiling, "MIN_GAIN", np.inf)  # no chain pays: no second form
    assert compiled.tiled_form(threads=1) is None

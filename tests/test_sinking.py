"""Moving a single-reader producer into the If branches that pass its value through
(liftir/compile/sinking.py): the same outputs from onnxruntime, one copy fewer."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import liftir
from liftir.compile.sinking import sink_into_branches
from onnx_builders import model

_F = TensorProto.FLOAT


def _branch(nodes, output):
    return helper.make_graph(nodes, "branch", [], [helper.make_tensor_value_info(output, _F, None)])


def _if_graph(extra_reader=False, nested=False):
    """a = x * 2; y = If(sum(x) > 0): then a (passed through), else -a; with `extra_reader`
    a is also a graph output; with `nested` the pass-through sits one If deeper."""
    then = _branch([helper.make_node("Identity", ["a"], ["t"])], "t")
    if nested:
        then = _branch([helper.make_node("If", ["c"], ["t2"], then_branch=then,
                                         else_branch=_branch([helper.make_node("Abs", ["a"], ["u"])], "u")),
                        helper.make_node("Identity", ["t2"], ["t3"])], "t3")
    other = _branch([helper.make_node("Neg", ["a"], ["e"])], "e")
    nodes = [helper.make_node("Mul", ["x", "two"], ["a"], name="double"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    outputs = {"y": np.float32, "a": np.float32} if extra_reader else {"y": np.float32}
    return model(nodes, {"x": (2, 3)}, outputs, {"two": np.float32(2), "zero": np.float32(0)},
                 output_shapes={"y": (2, 3)}, check=False)


def _run(m, x):
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _sunk(m):
    sunk = type(m)()
    sunk.CopyFrom(m)
    nodes = sink_into_branches(list(m.graph.node), {o.name for o in m.graph.output})
    del sunk.graph.node[:]
    sunk.graph.node.extend(nodes)
    return sunk


def _pass_through_identities(graph):
    """Identity nodes in If branches whose input is not made in that branch."""
    found = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                made = {o for n in attr.g.node for o in n.output}
                found += sum(1 for n in attr.g.node if n.op_type == "Identity" and n.input[0] not in made)
                found += _pass_through_identities(attr.g)
    return found


@pytest.mark.parametrize("nested", [False, True])
def test_a_single_reader_producer_moves_into_the_branches(nested):
    m = _if_graph(nested=nested)
    sunk = _sunk(m)
    assert _pass_through_identities(m.graph) == 1
    assert _pass_through_identities(sunk.graph) == 0
    assert "double" not in [n.name for n in sunk.graph.node]
    for x in (np.ones((2, 3), np.float32), -np.ones((2, 3), np.float32)):  # both branches
        np.testing.assert_array_equal(_run(sunk, x)[0], _run(m, x)[0])


def test_a_producer_read_elsewhere_stays():
    m = _if_graph(extra_reader=True)
    sunk = _sunk(m)
    assert [n.name for n in sunk.graph.node] == [n.name for n in m.graph.node]
    assert _pass_through_identities(sunk.graph) == 1


def test_compiled_pass_copies_no_single_reader_value_out_of_a_branch():
    """A Sigmoid's Rescale (no fill needed) and a masked difference: every value an If's
    fast branch returns unchanged is made inside it, and the pass still equals the interpreter."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Gelu", ["s"], ["y"], domain="")]
    m = model(nodes, {"x": (2, 8)}, ["y"], {"w": w}, opset=20)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    compiled = liftir.Explainer(m, "deeplift", engine="compiled")
    got, delta = compiled.attribute(x, target=1, return_convergence_delta=True)
    passes = [p for p in compiled._compiled.passes.values() if p is not None]
    assert passes and _pass_through_identities(passes[0].model.graph) == 0
    want = liftir.Explainer(m, "deeplift", engine="interpreter").attribute(x, target=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.abs(delta).max() < 1e-5

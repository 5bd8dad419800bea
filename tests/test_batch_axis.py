"""liftir/batch_axis.py on its own: locations through views, and the row helpers on them."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from liftir.batch_axis import (AXIS0, BatchAxis, locate, repeat_rows, samples_first, take_rows,
                               tile_rows)
from liftir.errors import BatchAxisError

N, T, E = 3, 4, 5


def _node(op, inputs, outputs, name="n", **attrs):
    from liftir.graph import Node
    proto = helper.make_node(op, inputs, outputs, name=name, **attrs)
    return Node(name, op, "", tuple(inputs), tuple(outputs), attrs, 17, 0, proto)


def _locate(nodes, shapes, host=None):
    host = host or {}
    return locate(nodes, {"x": None}, lambda t: shapes.get(t), lambda t: host.get(t), N, lambda n: ())


def test_reshape_merging_the_batch_with_the_next_axis():
    locs = _locate([_node("Reshape", ["x", "s"], ["y"])], {"x": (N, T, E), "y": (N * T, E)}, {"s": np.array([-1, E])})
    assert locs["y"] == BatchAxis(0, 1, T)


def test_transpose_then_merge_outer():
    nodes = [_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), _node("Reshape", ["t", "s"], ["y"], name="r")]
    locs = _locate(nodes, {"x": (N, T, E), "t": (T, N, E), "y": (T * N, E)}, {"s": np.array([-1, E])})
    assert locs["t"] == BatchAxis(1) and locs["y"] == BatchAxis(0, T, 1)


def test_reshape_splitting_the_batch_is_refused_by_name():
    with pytest.raises(BatchAxisError, match="'split_me'"):
        _locate([_node("Reshape", ["x", "s"], ["y"], name="split_me")], {"x": (N * 2, E), "y": (N, 2 * E)},
                {"s": np.array([N, 2 * E])})


def test_softmax_over_the_moved_batch_axis_is_refused():
    nodes = [_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), _node("Softmax", ["t"], ["y"], name="sm", axis=1)]
    with pytest.raises(BatchAxisError, match="'sm'.*axis 1"):
        _locate(nodes, {"x": (N, T, E), "t": (T, N, E), "y": (T, N, E)})


@pytest.mark.parametrize("loc,shape", [(AXIS0, (N, T)), (BatchAxis(1), (T, N, E)), (BatchAxis(0, 1, T), (N * T, E)),
                                       (BatchAxis(0, T, 1), (T * N, E)), (BatchAxis(1, 2, 2), (E, 2 * N * 2))])
def test_row_helpers_agree_with_an_explicit_per_sample_view(loc, shape):
    """Against a plain NumPy reading of the (outer, N, inner) factorization."""
    x = np.arange(np.prod(shape)).reshape(shape)
    view, b = loc.split_shape(shape)
    per_sample = np.moveaxis(x.reshape(view), b, 0)  # (N, ..., outer, inner, ...)
    first = samples_first(np, x, loc)
    assert first.shape[0] == N
    np.testing.assert_array_equal(first.reshape(N, -1), per_sample.reshape(N, -1))
    np.testing.assert_array_equal(samples_first(np, take_rows(x, loc, 1, 3), loc).reshape(2, -1),
                                  per_sample[1:3].reshape(2, -1))
    rep = samples_first(np, repeat_rows(np, x, loc, 2), loc)
    np.testing.assert_array_equal(rep.reshape(2 * N, -1), np.repeat(per_sample.reshape(N, -1), 2, axis=0))
    til = samples_first(np, tile_rows(np, x, loc, 2), loc)
    np.testing.assert_array_equal(til.reshape(2 * N, -1), np.tile(per_sample.reshape(N, -1), (2, 1)))


def test_tensors_read_for_their_type_only_hold_no_samples():
    """CastLike(constant, x) and what is computed from it alone hold no samples: `locate`
    gives them no location and lists them as batch-free (the scheduler keeps them as
    constants of the run; a (1,) zero was once sliced as if it held the batch)."""
    nodes = [_node("CastLike", ["zero", "x"], ["z"], name="like"), _node("Neg", ["z"], ["nz"], name="neg"),
             _node("Where", ["c", "nz", "x"], ["y"], name="pick")]
    shapes = {"x": (N, E), "z": (1,), "nz": (1,), "c": (N, E), "y": (N, E)}
    free: set[str] = set()
    locs = locate(nodes, {"x": None, "c": None}, lambda t: shapes.get(t), lambda t: None, N,
                  lambda n: (1,) if n.op_type == "CastLike" else (), batch_free=free)
    assert free == {"z", "nz"} and "z" not in locs and locs["y"] == AXIS0


def test_deeplift_through_where_with_a_castlike_constant_branch():
    """End to end: Where(x > 0, CastLike(0, x), x) conserves against onnxruntime."""
    import onnxruntime
    from onnx import TensorProto, numpy_helper

    import liftir
    nodes = [helper.make_node("CastLike", ["zero", "x"], ["z"]),
             helper.make_node("Greater", ["x", "zero"], ["c"]),
             helper.make_node("Where", ["c", "z", "x"], ["neg"]),
             helper.make_node("MatMul", ["neg", "w"], ["y"])]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
                               numpy_helper.from_array(rng.standard_normal((E, 2)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.standard_normal((N, E)).astype(np.float32)
    x0 = 0.3 * rng.standard_normal((1, E)).astype(np.float32)
    sess = onnxruntime.InferenceSession(model.SerializeToString())
    diff = sess.run(None, {"x": x})[0][:, 1] - sess.run(None, {"x": x0})[0][0, 1]
    attr, delta = liftir.Explainer(model).attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    assert np.abs(attr.sum(1) - diff).max() <= 1e-5 * (1 + np.abs(diff).max())
    assert np.abs(delta).max() <= 1e-5 * (1 + np.abs(diff).max())

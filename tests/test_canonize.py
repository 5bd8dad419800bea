"""normalize_constrained_inputs: outputs unchanged on one-hot input, weights mean-free."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from liftir.canonize import normalize_constrained_inputs
from liftir.errors import InputError

RNG = np.random.default_rng(0)
OPSET = 17


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _model(nodes, inits, in_shape, out_rank=None, in_name="x", out_name="y"):
    out_shape = [f"d{i}" for i in range(out_rank or len(in_shape))]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _onehot(n, length, channels_first=True, k=4):
    x = np.eye(k, dtype=np.float32)[RNG.integers(0, k, (n, length))]  # (N, L, K)
    return np.ascontiguousarray(x.transpose(0, 2, 1)) if channels_first else x


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _conv_model(pads=(0, 0), bias=True, length=30, auto_pad=None, strides=1, dilation=1):
    attrs = {"kernel_shape": [5], "strides": [strides], "dilations": [dilation]}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    inputs = ["x", "W", "B"] if bias else ["x", "W"]
    inits = [_init("W", RNG.normal(size=(6, 4, 5)) + 2.0)]  # a large shared offset
    if bias:
        inits.append(_init("B", RNG.normal(size=6)))
    nodes = [helper.make_node("Conv", inputs, ["h"], name="conv1", **attrs),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return _model(nodes, inits, ["N", 4, length])


@pytest.mark.parametrize("kwargs", [
    {}, {"bias": False}, {"pads": (2, 2)}, {"pads": (4, 1), "strides": 2},
    {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER", "strides": 2},
    {"pads": (3, 2), "dilation": 2},
    {"auto_pad": "VALID"}])
def test_conv_outputs_unchanged_and_weights_mean_free(kwargs):
    model = _conv_model(**kwargs)
    before = model.SerializeToString()
    new = normalize_constrained_inputs(model, "x", group_axis=1)
    assert model.SerializeToString() == before  # the input model is not mutated
    onnx.checker.check_model(new)
    x = _onehot(7, 30)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    w = _weights(new)[conv.input[1]]
    assert np.abs(w.mean(axis=1)).max() < 1e-6
    assert np.abs(_weights(model)["W"].mean(axis=1)).max() > 0.5  # it really changed
    assert "W" not in _weights(new)  # the replaced initializer is dropped


def test_channels_last_input_through_transpose():
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t"),
             helper.make_node("Conv", ["xt", "W", "B"], ["y"], name="conv", kernel_shape=[3])]
    inits = [_init("W", RNG.normal(size=(5, 4, 3)) - 1.0), _init("B", RNG.normal(size=5))]
    model = _model(nodes, inits, ["N", 20, 4])
    new = normalize_constrained_inputs(model, "x", group_axis=-1)
    x = _onehot(4, 20, channels_first=False)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)


def test_total_other_than_one():
    model = _conv_model(pads=(1, 1))
    new = normalize_constrained_inputs(model, "x", group_axis=1, total=2.5)
    x = 2.5 * _onehot(3, 30)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)


def test_conv2d_channel_constraint():
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="c2", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1])]
    model = _model(nodes, [_init("W", RNG.normal(size=(2, 3, 3, 3)) + 1)], ["N", 3, 8, 9])
    new = normalize_constrained_inputs(model, "x", group_axis=1)
    x = np.eye(3, dtype=np.float32)[RNG.integers(0, 3, (2, 8, 9))].transpose(0, 3, 1, 2).copy()
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("channels_first", [True, False])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_flatten_then_gemm(channels_first, trans_b):
    length, m = 12, 7
    w = RNG.normal(size=(m, 4 * length) if trans_b else (4 * length, m)) + 0.7
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="dense", transB=trans_b,
                              alpha=0.5, beta=2.0)]
    shape = ["N", 4, length] if channels_first else ["N", length, 4]
    model = _model(nodes, [_init("W", w), _init("C", RNG.normal(size=m))], shape,
                   out_rank=2)
    axis = 1 if channels_first else 2
    new = normalize_constrained_inputs(model, "x", group_axis=axis)
    x = _onehot(5, length, channels_first=channels_first)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)
    wn = _weights(new)[new.graph.node[1].input[1]]
    wk = (wn.T if trans_b else wn).reshape(*((4, length) if channels_first else (length, 4)), m)
    assert np.abs(wk.mean(axis=axis - 1)).max() < 1e-6


def test_reshape_then_matmul_without_bias():
    length, m = 6, 3
    shape_const = numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"], name="rs"),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    model = _model(nodes, [shape_const, _init("W", RNG.normal(size=(4 * length, m)) + 1)],
                   ["N", length, 4], out_rank=2)
    new = normalize_constrained_inputs(model, "x", group_axis=2)
    x = _onehot(5, length, channels_first=False)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)
    assert [n.op_type for n in new.graph.node] == ["Reshape", "MatMul", "Add"]


def test_matmul_on_last_axis():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    model = _model(nodes, [_init("W", RNG.normal(size=(4, 8)) + 3), _init("b", np.ones(8))],
                   ["N", 10, 4])
    new = normalize_constrained_inputs(model, "x", group_axis=-1)
    x = _onehot(3, 10, channels_first=False)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)
    mm = next(n for n in new.graph.node if n.op_type == "MatMul")
    assert np.abs(_weights(new)[mm.input[1]].mean(axis=0)).max() < 1e-6


def test_shared_weight_used_by_two_convs_and_idempotence():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["a"], name="c1", kernel_shape=[3]),
             helper.make_node("Conv", ["x", "W"], ["b"], name="c2", kernel_shape=[3]),
             helper.make_node("Add", ["a", "b"], ["y"], name="sum")]
    model = _model(nodes, [_init("W", RNG.normal(size=(2, 4, 3)) + 1), _init("B", [1.0, 2.0])],
                   ["N", 4, 9])
    new = normalize_constrained_inputs(model, "x", group_axis=1)
    again = normalize_constrained_inputs(new, "x", group_axis=1)
    x = _onehot(3, 9)
    ref = _run(model, x)
    np.testing.assert_allclose(_run(new, x), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_run(again, x), ref, rtol=1e-5, atol=1e-4)


def test_zero_rows_break_the_constraint_only_locally():
    """N bases (all-zero rows) violate the constraint: outputs move only near them."""
    model = _conv_model()
    new = normalize_constrained_inputs(model, "x", group_axis=1)
    x = _onehot(1, 30)
    x[0, :, 15] = 0.0
    diff = np.abs(_run(new, x) - _run(model, x))[0].max(axis=0)  # per output position
    assert diff[:11].max() < 1e-4 and diff[16:].max() < 1e-4
    assert diff[11:16].max() > 1e-3


@pytest.mark.parametrize("make, match", [
    (lambda: (_conv_model(), "nope", 1), "not an input"),
    (lambda: (_conv_model(), "x", 0), "batch"),
    (lambda: (_conv_model(), "x", 5), "out of range"),
    (lambda: (_conv_model(), "x", 2), "conv1"),  # wrong axis: Conv contracts channels
])
def test_argument_errors(make, match):
    model, name, axis = make()
    with pytest.raises(ValueError, match=match):
        normalize_constrained_inputs(model, name, group_axis=axis)


def test_error_names_unsupported_consumer():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="early_relu"),
             helper.make_node("Conv", ["r", "W"], ["y"], name="conv", kernel_shape=[3])]
    model = _model(nodes, [_init("W", RNG.normal(size=(2, 4, 3)))], ["N", 4, 9])
    with pytest.raises(InputError, match="early_relu"):
        normalize_constrained_inputs(model, "x", group_axis=1)


def test_error_grouped_conv_and_dynamic_padded_length():
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="gconv", kernel_shape=[3], group=2)]
    model = _model(nodes, [_init("W", RNG.normal(size=(2, 2, 3)))], ["N", 4, 9])
    with pytest.raises(InputError, match="gconv.*group"):
        normalize_constrained_inputs(model, "x", group_axis=1)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="pconv", kernel_shape=[3],
                              pads=[1, 1])]
    model = _model(nodes, [_init("W", RNG.normal(size=(2, 4, 3)))], ["N", 4, "L"])
    with pytest.raises(InputError, match="pconv.*static"):
        normalize_constrained_inputs(model, "x", group_axis=1)
    # Unpadded, a symbolic length is fine.
    nodes[0] = helper.make_node("Conv", ["x", "W"], ["y"], name="vconv", kernel_shape=[3])
    model = _model(nodes, [_init("W", RNG.normal(size=(2, 4, 3)))], ["N", 4, "L"])
    new = normalize_constrained_inputs(model, "x", group_axis=1)
    x = _onehot(2, 11)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)


def test_error_matmul_over_wrong_axis():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm_len")]
    model = _model(nodes, [_init("W", RNG.normal(size=(10, 3)))], ["N", 4, 10])
    with pytest.raises(InputError, match="mm_len.*axis 1"):
        normalize_constrained_inputs(model, "x", group_axis=1)


def test_torch_exported_paper_architecture():
    """The paper's genomics CNN (section 3.2) as PyTorch exports it, input (N, L, 4)."""
    torch = pytest.importorskip("torch")
    import io
    import warnings

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 20, 15)
            self.body = torch.nn.Sequential(
                torch.nn.PReLU(), torch.nn.MaxPool1d(50, 50), torch.nn.Flatten(),
                torch.nn.Linear(60, 200), torch.nn.PReLU(), torch.nn.Linear(200, 1))

        def forward(self, x):  # one-hot (N, L, 4), as genomics loaders give it
            return self.body(self.conv(x.transpose(1, 2)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.conv.weight += 0.5  # an offset shared by the four bases, as training leaves
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 200, 4),), buf, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    new = normalize_constrained_inputs(model, "x", group_axis=-1)
    x = _onehot(8, 200, channels_first=False)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-4, atol=1e-4)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    assert np.abs(_weights(new)[conv.input[1]].mean(axis=1)).max() < 1e-6


def test_conv2d_with_bases_on_a_spatial_axis():
    """Keras-1 style genomics: input (N, 1, 4, L), kernels (M, 1, 4, k) span the bases."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="k1conv", kernel_shape=[4, 5],
                              pads=[0, 2, 0, 2], strides=[1, 2])]
    inits = [_init("W", RNG.normal(size=(3, 1, 4, 5)) + 1.5), _init("B", RNG.normal(size=3))]
    model = _model(nodes, inits, ["N", 1, 4, 21])
    new = normalize_constrained_inputs(model, "x", group_axis=2)
    x = _onehot(4, 21)[:, None]  # (N, 1, 4, L)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-5, atol=1e-4)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    assert np.abs(_weights(new)[conv.input[1]].mean(axis=2)).max() < 1e-6
    # A kernel that does not span all four bases cannot be normalized.
    nodes[0] = helper.make_node("Conv", ["x", "W"], ["y"], name="short", kernel_shape=[3, 5])
    model = _model(nodes, [_init("W", RNG.normal(size=(3, 1, 3, 5)))], ["N", 1, 4, 21])
    with pytest.raises(InputError, match="short.*whole axis"):
        normalize_constrained_inputs(model, "x", group_axis=2)

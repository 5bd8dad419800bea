"""Bad input gets a clear liftir error (a `liftir.errors` type naming what is wrong), and
leaves the Explainer usable: after every error, a valid call gives the same result as
before. Loading never runs code from the model.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

import liftir
from liftir.errors import (BackendError, BatchAxisError, InputError, LiftirError, ModelLoadError, RuleError,
                           UnsupportedOpError)
from onnx_builders import model, op_model

RNG = np.random.default_rng(0)
W1, B1, W2 = (RNG.standard_normal(s).astype(np.float32) for s in [(4, 5), (5,), (5, 3)])


def mlp():
    """x (N, 4) -> Gemm -> Relu -> Gemm -> y (N, 3), with named nodes."""
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2")]
    return model(nodes, {"x": (1, 4)}, ["y"], {"W1": W1, "b1": B1, "W2": W2}, opset=13)


X = RNG.standard_normal((3, 4)).astype(np.float32)
X0 = RNG.standard_normal((3, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def ex():
    return liftir.Explainer(mlp(), method="deeplift")


@pytest.fixture(scope="module")
def expected(ex):
    return ex.attribute(X, baselines=X0, target=1, return_convergence_delta=True)


def still_works(explainer, expected):
    attr, delta = explainer.attribute(X, baselines=X0, target=1, return_convergence_delta=True)
    np.testing.assert_array_equal(attr, expected[0])
    np.testing.assert_array_equal(delta, expected[1])


# ---- loading -----------------------------------------------------------------------------

def _truncated():
    data = mlp().SerializeToString()
    return data[: len(data) // 2]


@pytest.mark.parametrize("source, match", [
    (_truncated(), "not a readable ONNX model|no graph|does not pass"),
    (b"\x08\x07\x12\x03abc\xff\xff\xff", "not a readable ONNX model|no graph"),
    (b"", "no graph"),
    (12345, "expected a path, bytes or onnx.ModelProto"),
    (None, "expected a path, bytes or onnx.ModelProto"),
], ids=["truncated", "garbage", "empty", "int", "none"])
def test_unreadable_sources(source, match):
    with pytest.raises(ModelLoadError, match=match):
        liftir.Explainer(source)


def test_missing_file_directory_and_non_onnx_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no ONNX model file"):
        liftir.Explainer(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="no ONNX model file"):
        liftir.Explainer(tmp_path)  # a directory
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a protobuf, just some text\n" * 20)
    with pytest.raises(ModelLoadError):
        liftir.Explainer(text)
    good = tmp_path / "good.onnx"
    onnx.save(mlp(), good)
    assert liftir.Explainer(str(good)).predict(X).shape == (3, 3)


@pytest.mark.parametrize("location", ["../../../../etc/passwd", "/etc/passwd", "missing.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    m = op_model("Gemm", [(2, 3), np.ones((3, 2), np.float32)], opset=13)
    weight = m.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(ModelLoadError, match="external"):
        liftir.Explainer(path)


def _unchecked(nodes, inputs, outputs, consts=None, opset=13):
    graph = helper.make_graph(nodes, "bad", inputs, outputs,
                              [onnx.numpy_helper.from_array(v, k) for k, v in (consts or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape=("N", 4), elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape))


@pytest.mark.parametrize("bad", [
    _unchecked([helper.make_node("Relu", ["nowhere"], ["y"])], [_vi("x")], [_vi("y")]),
    _unchecked([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["y"])],
               [_vi("x")], [_vi("y")]),
    _unchecked([helper.make_node("Relu", ["x"], ["y"], bogus=3)], [_vi("x")], [_vi("y")]),
    _unchecked([], [_vi("x")], [_vi("x")]),
], ids=["undefined-input", "output-defined-twice", "unknown-attribute", "empty-graph"])
def test_models_failing_the_checker(bad):
    with pytest.raises(ModelLoadError):
        liftir.Explainer(bad)
    with pytest.raises(ModelLoadError):
        liftir.Explainer(bad.SerializeToString())


def test_unsupported_ops_are_all_listed_with_node_names():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
             helper.make_node("EyeLike", ["r"], ["e"], name="my_eyelike"),
             helper.make_node("TopK", ["e", "k"], ["v", "i"], name="topk_1", axis=1),
             helper.make_node("Hardmax", ["v"], ["y"], name="final_hardmax")]
    m = model(nodes, {"x": (2, 4)}, ["y"], {"k": np.array([2], np.int64)}, opset=13)
    with pytest.raises(UnsupportedOpError) as info:
        liftir.Explainer(m)
    err = info.value
    assert isinstance(err, LiftirError)
    assert [name for name, _, _ in err.missing] == ["my_eyelike", "topk_1", "final_hardmax"]
    text = str(err)
    for needle in ("my_eyelike", "topk_1", "final_hardmax", "EyeLike", "TopK", "Hardmax",
                   "liftir.register_rule", "3 node(s)"):
        assert needle in text, needle


def test_a_rule_for_one_method_only_is_unsupported_for_the_others():
    class DeepliftOnly(liftir.rule.Elementwise):
        modes = ("deeplift",)

        def f(self, xp, x, ctx):
            return x

        def df(self, xp, x, ctx):
            return xp.ones_like(x)

    m = op_model("Relu", [(2, 3)], opset=13)
    liftir.Explainer(m, method="deeplift", rules={"Relu": DeepliftOnly})
    with pytest.raises(UnsupportedOpError, match="saliency"):
        liftir.Explainer(m, method="saliency", rules={"Relu": DeepliftOnly})


def test_custom_domain_op_is_rejected_without_touching_onnxruntime(monkeypatch):
    """A node of a custom-op domain is 'unsupported', not handed to onnxruntime (whose
    custom-op libraries would be native code named by the model)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("onnxruntime.InferenceSession must not be built for this model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", forbidden)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MyFancyOp", ["r"], ["y"], name="fancy", domain="com.example.custom")]
    m = model(nodes, {"x": (2, 4)}, ["y"], opset=13, extra_opsets={"com.example.custom": 1}, check=False)
    m.graph.output[0].type.tensor_type.shape.CopyFrom(onnx.TensorShapeProto())
    with pytest.raises(UnsupportedOpError) as info:
        liftir.Explainer(m)
    assert info.value.missing == [("fancy", "com.example.custom", "MyFancyOp")]
    assert "com.example.custom::MyFancyOp" in str(info.value)


def test_integer_model_inputs_are_held_and_attributed_at_their_float_casts():
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), helper.make_node("Relu", ["f"], ["y"])]
    m = model(nodes, {"ids": (2, 4)}, ["y"], opset=13, input_dtypes={"ids": np.int64})
    ex = liftir.Explainer(m)
    assert ex.attributed == ["f"]
    ids = np.array([[1, -2, 3, 0], [4, 5, -6, 7]])
    attr, delta = ex.attribute(ids, baselines=np.zeros(4, np.int64), target=2, return_convergence_delta=True)
    np.testing.assert_allclose(attr["f"][:, 2], np.maximum(ids[:, 2], 0))
    assert np.abs(delta).max() == 0


def test_string_model_inputs_are_refused():
    nodes = [helper.make_node("Identity", ["s"], ["y"])]
    m = model(nodes, {"s": (2, 4)}, {"y": np.str_}, opset=13, input_dtypes={"s": np.str_})
    with pytest.raises(ModelLoadError, match="float, integer and bool inputs.*'s'"):
        liftir.Explainer(m)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "lime"}, InputError, "unknown method 'lime'"),
    ({"method": None}, InputError, "unknown method"),
    ({"backend": "tpu"}, BackendError, "unknown backend 'tpu'"),
    ({"max_rule": "biggest"}, InputError, "max_rule"),
    ({"final_activation": "drop"}, InputError, "final_activation"),
    ({"output": "no_such_tensor"}, InputError, "no tensor named 'no_such_tensor'"),
    ({"output": "W1"}, InputError, "constant"),
    ({"precision": "float16"}, InputError, "precision"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        liftir.Explainer(mlp(), **kwargs)


# ---- calls on a valid Explainer -------------------------------------------------------------

BAD_CALLS = {
    # inputs
    "complex-input": (lambda e: e.attribute(X.astype(np.complex64), target=0), "dtype complex64"),
    "string-input": (lambda e: e.attribute(np.array([["a"] * 4] * 3), target=0), "dtype <U1"),
    "object-input": (lambda e: e.attribute(np.array([[object()] * 4] * 3), target=0), "dtype object"),
    "ragged-input": (lambda e: e.attribute([[1.0, 2.0], [3.0]], target=0), "not an array|dtype"),
    "wrong-rank": (lambda e: e.attribute(X[:, :, None], target=0), "rank 2"),
    "wrong-width": (lambda e: e.attribute(X[:, :3], target=0), "axis 1 must be 4"),
    "scalar": (lambda e: e.attribute(np.float32(1.0), target=0), "rank|batch axis"),
    "empty-batch": (lambda e: e.attribute(X[:0], target=0), "empty batch"),
    "nan-input": (lambda e: e.attribute(np.where(X > 1, np.nan, X), target=0), "NaN/Inf"),
    "inf-input": (lambda e: e.attribute(np.where(X > 1, np.inf, X), target=0), "NaN/Inf"),
    "tuple-of-two": (lambda e: e.attribute((X, X), target=0), "inputs"),
    "dict-wrong-key": (lambda e: e.attribute({"z": X}, target=0), "keys must be the model inputs"),
    # baselines
    "nan-baseline": (lambda e: e.attribute(X, baselines=np.full_like(X, np.nan), target=0), "NaN/Inf"),
    "inf-baseline": (lambda e: e.attribute(X, baselines=np.full((1, 4), -np.inf, np.float32), target=0), "NaN/Inf"),
    "baseline-width": (lambda e: e.attribute(X, baselines=np.zeros((3, 5), np.float32), target=0), "baselines"),
    "baseline-batch": (lambda e: e.attribute(X, baselines=np.zeros((2, 4), np.float32), target=0), "baselines"),
    "baseline-rank": (lambda e: e.attribute(X, baselines=np.zeros((1, 1, 4), np.float32), target=0), "baselines"),
    "complex-baseline": (lambda e: e.attribute(X, baselines=np.zeros((1, 4), np.complex64), target=0), "dtype"),
    "nan-scalar-baseline": (lambda e: e.attribute(X, baselines=float("nan"), target=0), "NaN/Inf"),
    "string-scalar-baseline": (lambda e: e.attribute(X, baselines="zero", target=0), "dtype"),
    "complex-scalar-baseline": (lambda e: e.attribute(X, baselines=1j, target=0), "dtype"),
    # targets and outputs
    "target-too-big": (lambda e: e.attribute(X, target=3), "out of range"),
    "target-negative": (lambda e: e.attribute(X, target=-1), "-1 is negative"),
    "targets-negative": (lambda e: e.attribute(X, target=[0, -1, 2]), "-1 at position 1 is negative"),
    "targets-2d-negative": (lambda e: e.attribute(X, target=np.array([[0, -3]])), "-3 at position 1"),
    "targets-2d-out-of-range": (lambda e: e.attribute(X, target=np.array([[1, 2000]])),
                                "2000 at position 1 is out of range for 3 outputs"),
    "target-tuple-negative": (lambda e: e.attribute(X, target=(-1,)), "negative indices are not accepted"),
    "targets-out-of-range": (lambda e: e.attribute(X, target=[0, 1, 7]), "out of range"),
    "targets-wrong-count": (lambda e: e.attribute(X, target=[0, 1]), "one int per sample"),
    "targets-float": (lambda e: e.attribute(X, target=[0.5, 1.0, 2.0]), "int"),
    "target-float": (lambda e: e.attribute(X, target=1.5), "target"),
    "target-bool": (lambda e: e.attribute(X, target=True), "target"),
    "target-tuple-length": (lambda e: e.attribute(X, target=(1, 0)), "one int per non-batch axis"),
    "target-tuple-range": (lambda e: e.attribute(X, target=(3,)), "out of range"),
    "target-missing": (lambda e: e.attribute(X), "pass target="),
    "target-string": (lambda e: e.attribute(X, target="cat"), "target"),
    "unknown-output": (lambda e: e.attribute(X, target=0, output="nope"), "no tensor named 'nope'"),
    "unknown-output-predict": (lambda e: e.predict(X, output="nope"), "no tensor named 'nope'"),
    "constant-output": (lambda e: e.attribute(X, target=0, output="W2"), "constant"),
    "batch-size": (lambda e: e.attribute(X, target=0, batch_size=0), "batch_size"),
    "batch-size-float": (lambda e: e.attribute(X, target=0, batch_size=1.5), "batch_size"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_call_raises_input_error_and_explainer_stays_usable(ex, expected, name):
    call, match = BAD_CALLS[name]
    with pytest.raises(InputError, match=match):
        call(ex)
    still_works(ex, expected)


def test_valid_variants_of_the_same_call_agree(ex, expected):
    """Forms the checks must not reject: int inputs, a (4,) baseline, a list target, float64."""
    attr, _ = expected
    np.testing.assert_allclose(ex.attribute(X, baselines=X0, target=[1, 1, 1]), attr, rtol=1e-6)
    np.testing.assert_allclose(ex.attribute(X.astype(np.float64), baselines=X0.astype(np.float64), target=1),
                               attr, rtol=1e-6)
    xi = np.round(X * 3).astype(np.int32)
    np.testing.assert_allclose(ex.attribute(xi, baselines=X0[0], target=1),
                               ex.attribute(xi.astype(np.float32), baselines=X0[:1], target=1), rtol=1e-6)
    still_works(ex, expected)


# ---- ops the rules refuse: samples would mix along axis 0 --------------------------------

I64 = lambda *v: np.array(v, np.int64)  # noqa: E731

REFUSED = {
    "concat-axis0": lambda: op_model("Concat", [(2, 3), (2, 3)], {"axis": 0}, 13),
    "reduce-over-batch": lambda: op_model("ReduceSum", [(2, 3), I64(0)], {"keepdims": 1}, 13),
    "softmax-over-batch": lambda: op_model("Softmax", [(2, 3)], {"axis": 0}, 13),  # kept: see below
    "gather-axis0": lambda: op_model("Gather", [(2, 3), I64(0, 1)], {"axis": 0}, 13),
    "old-softmax-flattening": lambda: op_model("Softmax", [(2, 3, 4)], {"axis": 1}, 11),
    "gemm-activation-weight": lambda: op_model("Gemm", [(2, 3), (2, 3)], {"transB": 1}, 13),
    "layernorm-over-batch": lambda: op_model("LayerNormalization", [(2, 3), np.ones((2, 3), np.float32)],
                                             {"axis": 0}, 17),
    "pow-activation-exponent": lambda: op_model("Pow", [(2, 3), (2, 3)], opset=13),
    "conv-transpose-output-shape-too-big": lambda: op_model(
        "ConvTranspose", [(2, 1, 4), RNG.standard_normal((1, 1, 3)).astype(np.float32)],
        {"kernel_shape": [3], "strides": [2], "output_shape": [12]}, 13),
}


# views that move the samples off axis 0 are fine inside a graph (tests/test_batch_axis.py);
# explained directly, their output cannot be indexed per sample: a clear refusal
MOVED = {
    "flatten-axis2": lambda: op_model("Flatten", [(2, 3, 4)], {"axis": 2}, 13),
    "reshape-merging-batch": lambda: op_model("Reshape", [(2, 3, 4), I64(-1, 4)], opset=13),
    "transpose-batch": lambda: op_model("Transpose", [(2, 3, 4)], {"perm": [1, 0, 2]}, 13),
    "expand-new-leading-axis": lambda: op_model("Expand", [(2, 3), I64(2, 1, 3)], opset=13),
}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_explaining_a_tensor_whose_samples_moved_is_refused(name):
    m = MOVED[name]()
    ex = liftir.Explainer(m, method="saliency")
    with pytest.raises(BatchAxisError, match="explained tensor .* holds the samples on axis"):
        ex.attribute(RNG.standard_normal((3, 3, 4) if name != "expand-new-leading-axis" else (3, 3))
                     .astype(np.float32), target=(0, 0))


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("method", ["deeplift", "saliency"])
def test_batch_mixing_and_non_affine_uses_raise_rule_error(name, method):
    """onnxruntime runs these graphs fine, so the refusal must not depend on which engine
    runs the forward; the target is one onnxruntime's output shape makes valid."""
    m = REFUSED[name]()
    feeds = {vi.name: RNG.standard_normal((3,) + tuple(d.dim_value for d in vi.type.tensor_type.shape.dim[1:]))
             .astype(np.float32) for vi in m.graph.input if vi.name.startswith("x")}
    args = tuple(feeds.values())
    try:
        out = onnxruntime.InferenceSession(m.SerializeToString()).run(None, feeds)[0]
        target = (0,) * (out.ndim - 1) if out.ndim > 1 else None
    except Exception:  # onnxruntime refuses it too (the too-large output_shape)
        target = (0, 0)
    # keep a final softmax: stripped, the batch-axis one is refused as an InputError instead;
    # the shapes are known, so the refusal comes when the Explainer is built (a probe forward)
    with pytest.raises(RuleError, match="node"):
        liftir.Explainer(m, method=method, final_activation="keep")
    # and where the probe does not run (a batch size fixed in the model), on the first call
    for vi in m.graph.input:
        vi.type.tensor_type.shape.dim[0].dim_value = 3
    explainer = liftir.Explainer(m, method=method, final_activation="keep")
    with pytest.raises(RuleError, match="node"):
        explainer.attribute(args if len(args) > 1 else args[0], target=target)


def test_every_liftir_error_is_a_liftir_error():
    for cls in (ModelLoadError, UnsupportedOpError, InputError, BackendError, RuleError):
        assert issubclass(cls, LiftirError)
    assert issubclass(InputError, ValueError)


# ---- imports --------------------------------------------------------------------------------

def test_importing_and_using_liftir_does_not_import_cupy():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import liftir
        from onnx import helper, TensorProto
        assert "cupy" not in sys.modules, "import liftir imported cupy"
        node = helper.make_node("Relu", ["x"], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        ex = liftir.Explainer(m, method="deeplift")
        ex.attribute(np.ones((2, 3), np.float32), target=1)
        assert "cupy" not in sys.modules, "a NumPy run imported cupy"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _layered_model():
    """h = x W; y = Reshape(Where(h > 0, h, 0), Shape(h)): a shape tensor (int64, computed
    from shapes only) and a bool one (computed from the inputs' values)."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Shape", ["h"], ["s"]),
             helper.make_node("Greater", ["h", "zero"], ["b"]), helper.make_node("Where", ["b", "h", "zero"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["y"])]
    return model(nodes, {"x": (2, 4)}, ["y"], {"w": w, "zero": np.float32(0)})


@pytest.mark.parametrize("layer, match", [("s", "constants and shapes only.*Shape\)"), ("b", "tensor of bool")])
@pytest.mark.parametrize("method", ["deeplift", "integrated_gradients"])
def test_a_layer_without_attributions_is_refused_by_name(layer, match, method):
    ex = liftir.Explainer(_layered_model(), method)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    expected = ex.attribute(x, target=1, layer="h")
    with pytest.raises(InputError, match=match):
        ex.attribute(x, target=1, layer=layer)
    np.testing.assert_array_equal(ex.attribute(x, target=1, layer="h"), expected)

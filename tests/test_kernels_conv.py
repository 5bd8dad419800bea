"""Conv kernels against onnxruntime running the ONNX ops, plus the adjoint identity <A x, g> == <x, A^T g>.

The reference is always onnxruntime float32 on a one-node model built with onnx.helper (it has no float64
Conv), so float64 results are compared with a float32-sized tolerance.
"""
import importlib
import types
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from liftir.kernels import conv, conv_adjoint, conv_transpose, conv_transpose_adjoint, resolve_auto_pad

conv_module = importlib.import_module("liftir.kernels.conv")  # the package re-exports a function named `conv`


class Case(NamedTuple):
    """One layer: C input channels, M output channels; output_padding only matters for ConvTranspose."""

    c: int
    m: int
    group: int
    kernel: tuple
    strides: tuple
    pads: tuple
    dilations: tuple
    spatial: tuple
    output_padding: tuple = ()

    def attrs(self):
        return dict(strides=self.strides, pads=self.pads, dilations=self.dilations, group=self.group)

    def onnx_attrs(self, op):
        extra = {"output_padding": self.output_padding} if op == "ConvTranspose" else {}
        return dict(kernel_shape=self.kernel, **self.attrs(), **extra)

    def inputs(self, op, dtype=np.float32, seed=0):
        """x, w (in the op's ONNX layout) and b, drawn in float32 so every dtype sees the same values."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, self.c, *self.spatial)).astype(np.float32)
        w_shape = (self.m, self.c // self.group) if op == "Conv" else (self.c, self.m // self.group)
        w = rng.standard_normal((*w_shape, *self.kernel)).astype(np.float32)
        b = rng.standard_normal(self.m).astype(np.float32)
        return x.astype(dtype), w.astype(dtype), b.astype(dtype)


# several input sizes the stride does not divide (the adjoint must give their trailing rows back)
CONV_CASES = {
    "1d": Case(3, 4, 1, (3,), (1,), (1, 1), (1,), (9,)),
    "1d-grouped-s3-dil2": Case(4, 6, 2, (2,), (3,), (0, 2), (2,), (11,)),
    "2d": Case(3, 5, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (7, 8)),
    # from FEW_INPUT_CHANNELS up, a stride-1 adjoint is the flipped-kernel Conv (below, ConvTranspose)
    "1d-16ch-dil2": Case(16, 3, 1, (3,), (1,), (2, 1), (2,), (9,)),
    "2d-16ch": Case(16, 4, 1, (3, 3), (1, 1), (1, 0, 1, 2), (1, 1), (6, 5)),
    "2d-depthwise-s2-asym": Case(4, 4, 4, (3, 3), (2, 2), (0, 1, 2, 0), (1, 1), (9, 7)),
    "2d-grouped-s23-dil": Case(6, 4, 2, (3, 2), (2, 3), (1, 0, 0, 1), (2, 1), (10, 9)),
    "2d-depthwise-x2-dil2": Case(8, 16, 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), (6, 7)),
    "2d-1x1-s2": Case(5, 3, 1, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (7, 6)),
    "3d": Case(2, 3, 1, (2, 3, 2), (2, 1, 3), (1, 0, 1, 0, 1, 0), (1, 2, 1), (5, 6, 7)),
    "3d-depthwise": Case(4, 4, 4, (3, 3, 3), (1, 2, 1), (1, 1, 1, 1, 1, 1), (1, 1, 1), (4, 5, 3)),
}
CT_CASES = {
    "1d": Case(3, 4, 1, (3,), (1,), (1, 1), (1,), (7,), (0,)),
    "1d-grouped-s3-op2": Case(4, 6, 2, (2,), (3,), (0, 1), (1,), (5,), (2,)),
    "2d-s2-op1": Case(3, 5, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (5, 6), (1, 0)),
    "2d-depthwise": Case(4, 4, 4, (3, 3), (2, 1), (0, 1, 2, 0), (1, 2), (5, 4), (1, 0)),
    "2d-grouped-dil": Case(6, 4, 2, (3, 2), (3, 2), (1, 0, 0, 1), (2, 3), (4, 5), (2, 1)),
    "3d": Case(2, 3, 1, (2, 3, 2), (2, 1, 3), (1, 0, 1, 0, 1, 0), (1, 2, 1), (3, 4, 3), (1, 0, 2)),
    "3d-depthwise-x2": Case(4, 8, 4, (3, 3, 3), (2, 2, 1), (1, 1, 1, 1, 1, 1), (1, 1, 1), (3, 3, 4), (0, 1, 0)),
}
# ONNX allows output_padding < max(stride, dilation); onnxruntime only < stride, so only the array path runs it
BEYOND_STRIDE = Case(6, 4, 2, (3, 2), (1, 2), (1, 0, 0, 1), (2, 3), (4, 5), (1, 2))
# (engine, dtype, tolerance relative to the reference's magnitude)
MODES = {
    "ort-f32": ("ort", np.float32, 1e-5),
    "numpy-f32": ("numpy", np.float32, 1e-5),
    "numpy-f64": ("numpy", np.float64, 1e-5),
    "ort-f16": ("ort", np.float16, 1e-2),
    "numpy-f16": ("numpy", np.float16, 1e-2),
}


def _ort_run(op, x, w, b=None, **attrs):
    """Run one ONNX node on onnxruntime in float32: the reference the kernels must match."""
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    if b is not None:
        inits.append(numpy_helper.from_array(b.astype(np.float32), "b"))
    node = helper.make_node(op, ["x", "w"] + ["b"] * (b is not None), ["y"], **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


def _assert_adjoint(y, g, x, gx, dtype):
    """<y, g> == <x, gx> up to rounding, measured against the size of the terms summed."""
    assert gx.shape == x.shape and gx.dtype == dtype
    lhs, rhs = np.vdot(y.astype(np.float64), g), np.vdot(x.astype(np.float64), gx)
    assert abs(lhs - rhs) <= (1e-5 if dtype == np.float32 else 1e-12) * (np.abs(y).ravel() @ np.abs(g).ravel())


def _assert_close(y, ref, tol):
    assert y.shape == ref.shape
    assert np.abs(y.astype(np.float64) - ref).max() <= tol * (1 + np.abs(ref).max())


@pytest.fixture(params=["ort", "numpy"])
def engine(request, monkeypatch):
    monkeypatch.setattr(conv_module, "USE_ORT", request.param == "ort")
    return request.param


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_onnxruntime(case, mode, monkeypatch):
    engine, dtype, tol = MODES[mode]
    monkeypatch.setattr(conv_module, "USE_ORT", engine == "ort")
    case = CONV_CASES[case]
    x, w, b = case.inputs("Conv", dtype)
    y = conv(np, x, w, b, **case.attrs(), cache={})
    assert y.dtype == dtype
    _assert_close(y, _ort_run("Conv", x, w, b, **case.onnx_attrs("Conv")), tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CT_CASES)
def test_conv_transpose_matches_onnxruntime(case, mode, monkeypatch):
    engine, dtype, tol = MODES[mode]
    monkeypatch.setattr(conv_module, "USE_ORT", engine == "ort")
    case = CT_CASES[case]
    x, w, b = case.inputs("ConvTranspose", dtype)
    y = conv_transpose(np, x, w, b, **case.attrs(), output_padding=case.output_padding, cache={})
    assert y.dtype == dtype
    _assert_close(y, _ort_run("ConvTranspose", x, w, b, **case.onnx_attrs("ConvTranspose")), tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_adjoint_identity(case, dtype, engine):
    case = CONV_CASES[case]
    x, w, _ = case.inputs("Conv", dtype)
    y = conv(np, x, w, None, **case.attrs())
    g = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    _assert_adjoint(y, g, x, conv_adjoint(np, g, w, input_shape=x.shape, **case.attrs()), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CT_CASES)
def test_conv_transpose_adjoint_identity(case, dtype, engine):
    case = CT_CASES[case]
    x, w, _ = case.inputs("ConvTranspose", dtype)
    y = conv_transpose(np, x, w, None, **case.attrs(), output_padding=case.output_padding)
    g = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    _assert_adjoint(y, g, x, conv_transpose_adjoint(np, g, w, input_shape=x.shape, **case.attrs()), dtype)


def test_conv_transpose_adjoint_with_output_padding_beyond_stride(monkeypatch):
    monkeypatch.setattr(conv_module, "USE_ORT", False)
    case = BEYOND_STRIDE
    x, w, _ = case.inputs("ConvTranspose", np.float64)
    y = conv_transpose(np, x, w, None, **case.attrs(), output_padding=case.output_padding)
    g = np.random.default_rng(1).standard_normal(y.shape)
    _assert_adjoint(y, g, x, conv_transpose_adjoint(np, g, w, input_shape=x.shape, **case.attrs()), np.float64)


@pytest.mark.parametrize("case", CONV_CASES)
def test_adjoint_engines_agree(case, monkeypatch):
    case = CONV_CASES[case]
    x, w, _ = case.inputs("Conv")
    g = np.random.default_rng(1).standard_normal(conv(np, x, w, None, **case.attrs()).shape).astype(np.float32)
    by_ort = conv_adjoint(np, g, w, input_shape=x.shape, **case.attrs())
    monkeypatch.setattr(conv_module, "USE_ORT", False)
    by_array = conv_adjoint(np, g.astype(np.float64), w.astype(np.float64), input_shape=x.shape, **case.attrs())
    _assert_close(by_ort, by_array, 1e-5)


def test_array_path_uses_only_functions_cupy_has():
    """The CuPy path is the array path with xp = cupy: run it with an xp that offers only what it may call."""
    xp = types.SimpleNamespace(zeros=np.zeros, matmul=np.matmul, ascontiguousarray=np.ascontiguousarray,
                               lib=types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
                                   as_strided=np.lib.stride_tricks.as_strided)))
    case = BEYOND_STRIDE
    x, w, b = case.inputs("ConvTranspose", np.float64)
    y = conv_transpose(xp, x, w, b, **case.attrs(), output_padding=case.output_padding)
    _assert_close(y, conv_transpose(np, x, w, b, **case.attrs(), output_padding=case.output_padding), 1e-5)
    g = np.ones_like(y)
    _assert_close(conv_transpose_adjoint(xp, g, w, input_shape=x.shape, **case.attrs()),
                  conv_transpose_adjoint(np, g, w, input_shape=x.shape, **case.attrs()), 1e-5)
    bias = np.arange(case.c, dtype=np.float64)
    _assert_close(conv(xp, g, w, bias, **case.attrs()), conv(np, g, w, bias, **case.attrs()), 1e-5)


def test_cache_builds_each_engine_object_once(monkeypatch):
    case = CONV_CASES["2d-grouped-s23-dil"]
    x, w, b = case.inputs("Conv")
    cache = {}
    first = conv(np, x, w, b, cache=cache, **case.attrs())
    sessions = list(cache.values())
    np.testing.assert_array_equal(conv(np, x[:1], w, b, cache=cache, **case.attrs()), first[:1])  # dynamic batch
    assert list(cache.values()) == sessions and len(sessions) == 1
    conv_adjoint(np, first, w, input_shape=x.shape, cache=cache, **case.attrs())
    conv_adjoint(np, first, w, input_shape=x.shape, cache=cache, **case.attrs())
    assert len(cache) == 2
    monkeypatch.setattr(conv_module, "USE_ORT", False)
    conv(np, x, w, b, cache=cache, **case.attrs())
    conv(np, x, w, b, cache=cache, **case.attrs())
    assert len(cache) == 3


# (kernel, strides, dilations, spatial): odd sizes, odd and even total pads
CONV_PAD_CASES = [((3,), (2,), (1,), (7,)), ((4,), (2,), (1,), (9,)), ((2,), (3,), (1,), (11,)),
                  ((3, 2), (2, 3), (1, 1), (9, 7)), ((1, 5), (1, 2), (1, 1), (5, 9)),
                  ((2,), (3,), (2,), (11,)), ((3, 2), (2, 3), (2, 1), (9, 7))]


@pytest.mark.parametrize("auto_pad,kernel,strides,dilations,spatial", [
    (auto_pad, *case) for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID") for case in CONV_PAD_CASES
    if auto_pad == "VALID" or max(case[2]) == 1])  # onnxruntime rejects dilated SAME Conv: see the next test
def test_resolve_auto_pad_conv(auto_pad, kernel, strides, dilations, spatial):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, *spatial)).astype(np.float32)
    w = rng.standard_normal((3, 2, *kernel)).astype(np.float32)
    ref = _ort_run("Conv", x, w, auto_pad=auto_pad, kernel_shape=kernel, strides=strides, dilations=dilations)
    pads = resolve_auto_pad(auto_pad.encode(), spatial, kernel, strides, dilations, None)
    y = conv(np, x, w, None, strides=strides, pads=pads, dilations=dilations, group=1)
    _assert_close(y, ref, 1e-6)


def test_resolve_auto_pad_conv_dilated_same():
    """Spec: out = ceil(in / stride), total = (out - 1) * stride + (k - 1) * dilation + 1 - in."""
    assert resolve_auto_pad("SAME_UPPER", (11,), (2,), (3,), (2,), None) == [0, 1]
    assert resolve_auto_pad("SAME_LOWER", (11,), (2,), (3,), (2,), None) == [1, 0]
    assert resolve_auto_pad("SAME_UPPER", (9, 7), (3, 2), (2, 3), (2, 1), None) == [2, 0, 2, 1]
    assert resolve_auto_pad("SAME_LOWER", (9, 7), (3, 2), (2, 3), (2, 1), None) == [2, 1, 2, 0]


# (kernel, strides, dilations, output_padding, spatial, output_shape or None)
TRANSPOSE_PAD_CASES = [((3,), (2,), (1,), (0,), (5,), None), ((4,), (2,), (1,), (1,), (5,), None),
                       ((2,), (3,), (1,), (0,), (7,), None),  # total < 0: onnxruntime keeps the natural size
                       ((3, 2), (2, 3), (2, 1), (1, 0), (5, 4), None),
                       ((4,), (2,), (1,), (0,), (5,), (9,)), ((5,), (3,), (1,), (0,), (4,), (11,)),
                       ((3, 3), (2, 2), (1, 2), (0, 0), (4, 5), (1, 3, 8, 12))]


@pytest.mark.parametrize("auto_pad,kernel,strides,dilations,output_padding,spatial,output_shape", [
    (auto_pad, *case) for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET") for case in TRANSPOSE_PAD_CASES
    if auto_pad != "NOTSET" or case[-1] is not None])  # NOTSET without output_shape is plain explicit pads
def test_resolve_auto_pad_conv_transpose(auto_pad, kernel, strides, dilations, output_padding, spatial, output_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, *spatial)).astype(np.float32)
    w = rng.standard_normal((2, 3, *kernel)).astype(np.float32)
    shape_attr = {} if output_shape is None else {"output_shape": output_shape}
    ref = _ort_run("ConvTranspose", x, w, auto_pad=auto_pad, kernel_shape=kernel, strides=strides,
                   dilations=dilations, output_padding=output_padding, **shape_attr)
    pads = resolve_auto_pad(auto_pad, spatial, kernel, strides, dilations, None, transpose=True,
                            output_shape=output_shape, output_padding=output_padding)
    y = conv_transpose(np, x, w, None, strides=strides, pads=pads, dilations=dilations, group=1,
                       output_padding=output_padding)
    _assert_close(y, ref, 1e-6)


def test_resolve_auto_pad_explicit_and_too_large_output_shape():
    assert resolve_auto_pad("NOTSET", (5, 5), (3, 3), (1, 1), (1, 1), [1, 0, 2, 1]) == [1, 0, 2, 1]
    assert resolve_auto_pad("NOTSET", (5, 5), (3, 3), (1, 1), (1, 1), None) == [0, 0, 0, 0]
    # natural size 20: onnxruntime takes up to 20 + stride - 1 (extra rows as output_padding), not 23
    assert resolve_auto_pad("SAME_UPPER", (7,), (2,), (3,), (1,), None, transpose=True, output_shape=(22,)) == [0, 0]
    with pytest.raises(ValueError, match="output_padding"):
        resolve_auto_pad("SAME_UPPER", (7,), (2,), (3,), (1,), None, transpose=True, output_shape=(23,))

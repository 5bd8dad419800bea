"""liftir's forward pass equals onnxruntime's, op by op, over the attribute combinations.

Parametrized over `liftir.registered_ops()`: a newly registered rule gets a failing test
until it has forward cases in CASES, so nothing runs untested. `predict` runs the forward
alone (no reference rows) through the rules' own `forward` (never the onnxruntime session
that attribution runs NumPy float32 forwards on), so this checks the rules and the
constant/static handling around them.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import liftir
from onnx_builders import model, op_model, random_feeds, run_ort

RTOL, ATOL = 1e-5, 1e-6


@dataclass
class Case:
    """One model and how to draw its inputs; `build` is lazy so collection stays cheap."""

    id: str
    build: Callable[[], onnx.ModelProto]
    low: float = -2.0
    high: float = 2.0
    feeds: Callable[[np.random.Generator], dict] | None = None
    rtol: float = RTOL
    atol: float = ATOL
    batch: int = 2


def op(op_type, inputs, attrs=None, opset=17, id="", n_outputs=1, output_dtypes=None, **kw):
    """A single-node Case; see onnx_builders.op_model for the `inputs` convention."""
    name = id or "-".join(f"{k}={v}" for k, v in (attrs or {}).items()) or "default"
    return Case(f"{name}-op{opset}",
                lambda: op_model(op_type, inputs, attrs, opset, n_outputs, output_dtypes), **kw)


def f32(*values):
    return np.array(values, dtype=np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


R = np.random.default_rng(1234)


def w(*shape):
    """A fixed random float32 weight."""
    return R.standard_normal(shape).astype(np.float32)


# Unary elementwise ops: (op, attrs, opset, input range)
UNARY = {
    "Abs": [({}, 13)], "Neg": [({}, 13)], "Relu": [({}, 6), ({}, 14)], "Sign": [({}, 13)],
    "Floor": [({}, 13)], "Ceil": [({}, 13)], "Round": [({}, 11)],
    "Sigmoid": [({}, 13), ({}, 13, -40, 40)], "Tanh": [({}, 13), ({}, 13, -30, 30)],
    "Softplus": [({}, 1), ({}, 1, -60, 60)], "Softsign": [({}, 1)],
    "Exp": [({}, 13), ({}, 13, -60, 60)], "Log": [({}, 13, 1e-3, 5)], "Sqrt": [({}, 13, 0, 5)],
    "Reciprocal": [({}, 13, 0.1, 4)], "Sin": [({}, 7, -6, 6)], "Cos": [({}, 7, -6, 6)],
    "Atan": [({}, 7, -6, 6)], "Erf": [({}, 13, -4, 4)],
    "Elu": [({}, 6), ({"alpha": 0.3}, 6)], "Selu": [({}, 6), ({"alpha": 1.2, "gamma": 0.9}, 6)],
    "Celu": [({}, 12), ({"alpha": 2.0}, 12)], "LeakyRelu": [({}, 16), ({"alpha": 0.2}, 6)],
    "HardSigmoid": [({}, 6, -4, 4), ({"alpha": 0.5, "beta": 0.3}, 6, -4, 4)],
    "HardSwish": [({}, 14, -5, 5)], "ThresholdedRelu": [({}, 10), ({"alpha": 0.5}, 10)],
    "Mish": [({}, 18, -6, 6)], "Gelu": [({}, 20, -5, 5), ({"approximate": "tanh"}, 20, -5, 5)],
    "Identity": [({}, 16)],
}

CASES: dict[str, list[Case]] = {}
for _op, _variants in UNARY.items():
    CASES[_op] = [op(_op, [(2, 3, 5)], a, rest[0], low=rest[1] if len(rest) > 1 else -2.0,
                     high=rest[2] if len(rest) > 2 else 2.0,
                     id=("-".join(f"{k}={v}" for k, v in a.items()) or "default")
                     + (f"-range{rest[1]}..{rest[2]}" if len(rest) > 1 else ""))
                  for a, *rest in _variants]

# Round half to even, like onnxruntime and NumPy
CASES["Round"].append(op("Round", [(2, 6)], opset=11, id="halves",
                         feeds=lambda rng: {"x0": np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5]] * 2, np.float32)}))
CASES["Sign"].append(op("Sign", [(2, 3)], opset=13, id="zeros",
                        feeds=lambda rng: {"x0": np.array([[0.0, -0.0, 1.0]] * 2, np.float32)}))

CASES["PRelu"] = [
    op("PRelu", [(2, 3, 4, 4), w(3, 1, 1)], opset=9, id="per-channel"),
    op("PRelu", [(2, 3, 4), f32(0.25)], opset=16, id="shared"),
    op("PRelu", [(2, 5), w(5)], opset=16, id="per-feature"),
]
CASES["Clip"] = [
    op("Clip", [(2, 3, 4)], {"min": -0.5, "max": 0.7}, 6, id="attrs"),
    op("Clip", [(2, 3, 4)], {"min": -0.5}, 6, id="attr-min-only"),
    op("Clip", [(2, 3, 4), f32(-0.5)[0], f32(0.7)[0]], opset=11, id="inputs"),
    op("Clip", [(2, 3, 4), None, f32(0.3)[0]], opset=13, id="max-only"),
    op("Clip", [(2, 3, 4), f32(-0.3)[0]], opset=13, id="min-only"),
    op("Clip", [(2, 3, 4)], opset=13, id="no-bounds"),
]
CASES["Pow"] = [
    op("Pow", [(2, 3, 4), f32(2.0)[0]], opset=13, id="square"),
    op("Pow", [(2, 3, 4), f32(3.0)[0]], opset=7, id="cube"),
    op("Pow", [(2, 3, 4), f32(0.5)[0]], opset=15, id="sqrt", low=0.0),
    op("Pow", [(2, 3, 4), i64(2)[0]], opset=15, id="int-exponent"),
    op("Pow", [(2, 3, 4), f32(1, 2, 3, 0.5)], opset=13, id="per-feature", low=0.1),
]
CASES["Cast"] = [
    op("Cast", [(2, 3, 4)], {"to": TensorProto.DOUBLE}, 13, id="to-double", output_dtypes=[np.float64]),
    op("Cast", [(2, 3, 4)], {"to": TensorProto.FLOAT}, 6, id="to-float"),
    op("Cast", [(2, 3, 4)], {"to": TensorProto.FLOAT16}, 13, id="to-half", output_dtypes=[np.float16]),
    op("Cast", [(2, 3, 4)], {"to": TensorProto.INT32}, 13, id="to-int32", output_dtypes=[np.int32], low=-5, high=5),
]
CASES["CastLike"] = [
    op("CastLike", [(2, 3, 4), np.zeros(1, np.float64)], opset=15, id="like-double", output_dtypes=[np.float64]),
    op("CastLike", [(2, 3), np.zeros((), np.float32)], opset=19, id="like-float"),
]
CASES["Dropout"] = [
    op("Dropout", [(2, 3, 4)], {"ratio": 0.3}, 7, id="attr-ratio"),
    op("Dropout", [(2, 3, 4), f32(0.3)[0]], opset=12, id="ratio-input"),
    op("Dropout", [(2, 3, 4), f32(0.3)[0], np.array(False)], opset=13, id="training-false"),
    op("Dropout", [(2, 3, 4)], opset=13, id="with-mask", n_outputs=2, output_dtypes=[np.float32, np.bool_]),
]

# ---- binary arithmetic --------------------------------------------------------------------
for _op in ("Add", "Sub"):
    CASES[_op] = [
        op(_op, [(2, 3, 4), (2, 3, 4)], opset=14, id="two-activations"),
        op(_op, [(2, 3, 4), (2, 1, 4)], opset=14, id="broadcast-middle"),
        op(_op, [(2, 3, 4), w(4)], opset=14, id="const-vector"),
        op(_op, [w(3, 1), (2, 3, 4)], opset=7, id="const-first"),
        op(_op, [(2, 1), (2, 5)], opset=13, id="broadcast-activation"),
    ]
CASES["Sum"] = [
    op("Sum", [(2, 3)], opset=13, id="one"),
    op("Sum", [(2, 3, 4), (2, 3, 4)], opset=8, id="two"),
    op("Sum", [(2, 3, 4), (2, 1, 4), w(4)], opset=13, id="three-broadcast"),
]
CASES["Mul"] = [
    op("Mul", [(2, 3, 4), w(3, 1)], opset=14, id="const"),
    op("Mul", [w(4), (2, 3, 4)], opset=7, id="const-first"),
    op("Mul", [(2, 3, 4), (2, 3, 4)], opset=14, id="two-activations"),
    op("Mul", [(2, 3, 4), (2, 1, 4)], opset=14, id="activations-broadcast"),
]
CASES["Div"] = [
    op("Div", [(2, 3, 4), w(4) + 3], opset=14, id="const-vector"),
    op("Div", [(2, 3, 4), f32(0.25)[0]], opset=7, id="const-scalar"),
]
CASES["MatMul"] = [
    op("MatMul", [(2, 5), w(5, 3)], opset=13, id="2d-const"),
    op("MatMul", [(2, 4, 5), w(5, 3)], opset=13, id="3d-const"),
    op("MatMul", [(2, 4, 5), w(5)], opset=13, id="1d-const"),
    op("MatMul", [(2, 2, 4, 5), w(2, 5, 3)], opset=13, id="batched-const"),
    op("MatMul", [(2, 4, 5), (2, 5, 3)], opset=13, id="two-activations"),
    op("MatMul", [(2, 1, 4, 5), (2, 3, 5, 2)], opset=13, id="activations-broadcast"),
]
for _op in ("Max", "Min"):
    CASES[_op] = [
        op(_op, [(2, 3, 4), (2, 3, 4)], opset=13, id="two"),
        op(_op, [(2, 3, 4), (2, 3, 4), (2, 3, 4)], opset=13, id="three"),
        op(_op, [(2, 3, 4), (2, 1, 4), w(4)], opset=12, id="broadcast-const"),
        op(_op, [(2, 3)], opset=8, id="one"),
    ]

# ---- affine layers ------------------------------------------------------------------------
CASES["Gemm"] = [
    op("Gemm", [(2, 5), w(5, 3), w(3)], opset=13, id="bias"),
    op("Gemm", [(2, 5), w(3, 5), w(1, 3)], {"transB": 1}, 13, id="transB"),
    op("Gemm", [(2, 5), w(3, 5), w(3)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, 11, id="alpha-beta"),
    op("Gemm", [(2, 5), w(5, 3)], {"alpha": 1.5}, 11, id="no-bias"),
    op("Gemm", [(2, 5), w(5, 3), f32(0.7)[0]], {"beta": 0.5}, 13, id="scalar-bias"),
    op("Gemm", [(2, 5), w(5, 3), (2, 3)], {"beta": 0.5}, 13, id="activation-bias"),
]
CASES["BatchNormalization"] = [
    op("BatchNormalization", [(2, 3, 4, 5), w(3), w(3), w(3), np.abs(w(3)) + 0.5], opset=15, id="4d"),
    op("BatchNormalization", [(2, 3), w(3), w(3), w(3), np.abs(w(3)) + 0.5], {"epsilon": 1e-3}, 9, id="2d-eps"),
    op("BatchNormalization", [(2, 4, 6), w(4), w(4), w(4), np.abs(w(4)) + 0.5], opset=14, id="3d"),
]


def conv(kernel, c=3, m=4, group=1, spatial=None, bias=True, opset=11, id="", **attrs):
    spatial = spatial or tuple(6 + i for i in range(len(kernel)))
    inputs = [(2, c) + spatial, w(m, c // group, *kernel)] + ([w(m)] if bias else [])
    attrs = {"kernel_shape": list(kernel), **({"group": group} if group != 1 else {}), **attrs}
    return op("Conv", inputs, attrs, opset, id=id)


CASES["Conv"] = [
    conv((3,), pads=[1, 1], id="1d-pads"),
    conv((3,), strides=[2], dilations=[2], bias=False, id="1d-stride-dilation"),
    conv((3, 3), pads=[1, 0, 1, 2], strides=[2, 1], id="2d-asym-pads"),
    conv((3, 2), dilations=[2, 1], id="2d-dilation"),
    conv((3, 3), c=4, m=6, group=2, pads=[1, 1, 1, 1], id="2d-groups"),
    conv((3, 3), c=4, m=4, group=4, strides=[2, 2], id="2d-depthwise"),
    conv((3, 3), c=3, m=6, group=3, id="2d-depthwise-x2"),
    conv((3, 3), auto_pad="SAME_UPPER", strides=[2, 2], id="2d-same-upper"),
    conv((2, 2), auto_pad="SAME_LOWER", id="2d-same-lower"),
    conv((3, 3), auto_pad="VALID", strides=[2, 2], id="2d-valid"),
    conv((1, 1), id="2d-1x1", opset=1),
    conv((2, 3, 2), c=2, m=3, pads=[1, 0, 1, 0, 1, 0], strides=[1, 2, 1], id="3d"),
    conv((3, 3, 3), c=2, m=2, group=2, auto_pad="SAME_UPPER", id="3d-depthwise-same"),
]


def conv_t(kernel, c=3, m=4, group=1, spatial=None, bias=True, opset=11, id="", **attrs):
    spatial = spatial or tuple(4 + i for i in range(len(kernel)))
    inputs = [(2, c) + spatial, w(c, m // group, *kernel)] + ([w(m)] if bias else [])
    attrs = {"kernel_shape": list(kernel), **({"group": group} if group != 1 else {}), **attrs}
    return op("ConvTranspose", inputs, attrs, opset, id=id)


CASES["ConvTranspose"] = [
    conv_t((3,), id="1d"),
    conv_t((3,), strides=[2], output_padding=[1], id="1d-output-padding"),
    conv_t((3, 3), strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0], id="2d-pads-output-padding"),
    conv_t((3, 2), dilations=[2, 1], strides=[1, 2], bias=False, id="2d-dilation"),
    conv_t((3, 3), c=4, m=6, group=2, strides=[2, 1], id="2d-groups"),
    conv_t((3, 3), c=4, m=4, group=4, id="2d-depthwise"),
    conv_t((3, 3), strides=[2, 2], output_shape=[10, 11], id="2d-output-shape"),
    conv_t((3, 3), strides=[2, 2], output_shape=[9, 10], auto_pad="SAME_UPPER", id="2d-output-shape-same"),
    conv_t((3, 3), strides=[2, 2], auto_pad="SAME_UPPER", id="2d-same-upper"),
    conv_t((2, 2), strides=[2, 2], auto_pad="SAME_LOWER", id="2d-same-lower"),
    # output_shape up to stride - 1 past the natural (12, 15): the extra rows come at the end
    conv_t((3, 3), strides=[3, 3], output_shape=[14, 15], auto_pad="SAME_LOWER", id="2d-output-shape-grows"),
    conv_t((2, 2, 2), c=2, m=3, strides=[2, 1, 2], pads=[0, 1, 0, 0, 0, 1], id="3d"),
]


def pool(op_type, kernel, spatial=None, opset=19, id="", n_outputs=1, **attrs):
    spatial = spatial or tuple(7 + i for i in range(len(kernel)))
    dtypes = [np.float32, np.int64][:n_outputs]
    return op(op_type, [(2, 3) + spatial], {"kernel_shape": list(kernel), **attrs}, opset, id=id,
              n_outputs=n_outputs, output_dtypes=dtypes)


_POOL_COMMON = [
    ("1d", (3,), {}), ("1d-stride-pad", (3,), {"strides": [2], "pads": [1, 1]}),
    ("1d-ceil", (2,), {"strides": [2], "ceil_mode": 1}),
    ("1d-ceil-pad", (3,), {"strides": [2], "pads": [1, 1], "ceil_mode": 1}),
    ("2d-overlap", (3, 3), {"strides": [1, 1], "pads": [1, 1, 1, 1]}),
    ("2d-asym", (3, 2), {"strides": [2, 1], "pads": [1, 0, 0, 1]}),
    ("2d-dilation", (2, 2), {"dilations": [2, 2]}),
    ("2d-dilation-ceil", (2, 2), {"dilations": [2, 1], "strides": [2, 2], "ceil_mode": 1}),
    ("2d-same-upper", (3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("2d-same-lower", (2, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("2d-valid", (3, 3), {"strides": [2, 2], "auto_pad": "VALID"}),
    ("3d", (2, 2, 2), {"strides": [2, 1, 2], "pads": [0, 1, 1, 1, 0, 0]}),
    ("3d-ceil", (2, 3, 2), {"strides": [2, 2, 2], "ceil_mode": 1}),
]
CASES["MaxPool"] = [pool("MaxPool", k, id=i, **a) for i, k, a in _POOL_COMMON] + [
    pool("MaxPool", (2, 2), opset=8, strides=[2, 2], id="2d-indices", n_outputs=2),
    pool("MaxPool", (3, 3), opset=12, pads=[1, 1, 1, 1], id="2d-indices-pad", n_outputs=2),
    pool("MaxPool", (3,), opset=12, strides=[2], id="1d-indices", n_outputs=2),
    pool("MaxPool", (3, 3), opset=1, id="opset1"),
]
CASES["AveragePool"] = [pool("AveragePool", k, id=i, **a) for i, k, a in _POOL_COMMON] + [
    pool("AveragePool", k, id=i + "-count-pad", count_include_pad=1, **a) for i, k, a in _POOL_COMMON
    if "pad" in a or "ceil_mode" in a or "auto_pad" in a
] + [pool("AveragePool", (3, 3), opset=7, pads=[1, 1, 1, 1], id="opset7")]
CASES["GlobalAveragePool"] = [op("GlobalAveragePool", [s], opset=1, id=f"{len(s) - 2}d")
                              for s in [(2, 3, 5), (2, 3, 4, 5), (2, 2, 3, 4, 2)]]
CASES["GlobalMaxPool"] = [op("GlobalMaxPool", [s], opset=1, id=f"{len(s) - 2}d")
                          for s in [(2, 3, 5), (2, 3, 4, 5), (2, 2, 3, 4, 2)]]


def reduce_cases(op_type, axes_input_since, **kw):
    """Attribute axes before `axes_input_since`, an axes input from then on."""
    old, new = axes_input_since - 2, max(axes_input_since, 18)
    cases = [
        op(op_type, [(2, 3, 4)], {"axes": [1]}, old, id="attr-axis1", **kw),
        op(op_type, [(2, 3, 4)], {"axes": [-1], "keepdims": 0}, old, id="attr-neg-nokeep", **kw),
        op(op_type, [(2, 3, 4, 5)], {"axes": [1, 3]}, old, id="attr-two-axes", **kw),
        op(op_type, [(2, 3, 4), i64(2)], opset=new, id="input-axis", **kw),
        op(op_type, [(2, 3, 4, 5), i64(-1, 1)], {"keepdims": 0}, new, id="input-two-nokeep", **kw),
        op(op_type, [(2, 3, 4), i64()], {"noop_with_empty_axes": 1}, new, id="input-empty-noop", **kw),
        op(op_type, [(2, 3, 4)], {"noop_with_empty_axes": 1}, new, id="no-axes-noop", **kw),
    ]
    return cases


CASES["ReduceSum"] = reduce_cases("ReduceSum", 13)
CASES["ReduceMean"] = reduce_cases("ReduceMean", 18)
CASES["ReduceMax"] = reduce_cases("ReduceMax", 18)
for _op in ("ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceProd"):
    CASES[_op] = reduce_cases(_op, 18)
CASES["ReduceLogSumExp"].append(op("ReduceLogSumExp", [(2, 3, 4)], {"axes": [2]}, 13, id="large", low=60, high=90))
CASES["ReduceLogSum"] = reduce_cases("ReduceLogSum", 18, low=0.1, high=2.0)

# ---- normalization layers -------------------------------------------------------------------


def _group_norm(inputs, attrs, shape):
    """GroupNormalization: ONNX's shape inference cannot tell its output shape, so give it."""
    def build():
        m = op_model("GroupNormalization", inputs, attrs, 21, check=False)
        m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y0", TensorProto.FLOAT, ["N", *shape[1:]]))
        onnx.checker.check_model(m)
        return m
    return Case(f"{'-'.join(f'{k}={v}' for k, v in attrs.items())}-op21", build)


CASES["LayerNormalization"] = [
    op("LayerNormalization", [(2, 5), np.abs(w(5)) + 0.5, w(5)], opset=17, id="2d"),
    op("LayerNormalization", [(2, 3, 5), np.abs(w(5)) + 0.5, None], {"epsilon": 1e-2}, 17, id="3d-no-bias-eps"),
    op("LayerNormalization", [(2, 3, 4, 5), w(4, 5), w(4, 5)], {"axis": -2}, 17, id="last-two-axes"),
    op("LayerNormalization", [(2, 3, 4), w(3, 4), w(4)], {"axis": 1}, 18, id="axis1-broadcast-bias"),
    op("LayerNormalization", [(2, 3, 5), np.abs(w(5)) + 0.5, w(5)], opset=17, n_outputs=3, id="mean-invstd"),
]
CASES["InstanceNormalization"] = [
    op("InstanceNormalization", [(2, 3, 4, 5), w(3), w(3)], opset=6, id="2d"),
    op("InstanceNormalization", [(2, 3, 7), w(3), w(3)], {"epsilon": 1e-3}, 17, id="1d-eps"),
]
CASES["GroupNormalization"] = [
    _group_norm([(2, 6, 4), w(6), w(6)], {"num_groups": 3}, (2, 6, 4)),
    _group_norm([(2, 4, 3, 3), w(4), w(4)], {"num_groups": 1, "epsilon": 1e-3}, (2, 4, 3, 3)),
    _group_norm([(2, 4, 5), w(4), w(4)], {"num_groups": 4}, (2, 4, 5)),
]
CASES["RMSNormalization"] = [
    op("RMSNormalization", [(2, 3, 5), np.abs(w(5)) + 0.5], opset=23, id="last-axis"),
    op("RMSNormalization", [(2, 3, 5), w(3, 5)], {"axis": 1, "epsilon": 1e-3}, 23, id="axis1-eps"),
]

# ---- views and data movement ---------------------------------------------------------------
CASES["Pad"] = [
    op("Pad", [(2, 3, 4)], {"pads": [0, 1, 2, 0, 0, 1], "value": 1.5}, 2, id="attr-constant"),
    op("Pad", [(2, 3, 4)], {"pads": [0, 0, 1, 0, 0, 2], "mode": "reflect"}, 2, id="attr-reflect"),
    op("Pad", [(2, 3, 4), i64(0, 1, 2, 0, 2, 1)], opset=11, id="input-constant"),
    op("Pad", [(2, 3, 4), i64(0, 1, 2, 0, 2, 1), f32(-0.5)[0]], opset=13, id="input-constant-value"),
    op("Pad", [(2, 3, 4), i64(0, 2, 1, 0, 1, 3)], {"mode": "reflect"}, 13, id="reflect"),
    op("Pad", [(2, 3, 4), i64(0, 2, 3, 0, 1, 2)], {"mode": "edge"}, 13, id="edge"),
    op("Pad", [(2, 3, 4), i64(1, 2, 0, 3), None, i64(1, -1)], opset=18, id="axes"),
    op("Pad", [(2, 3, 4), i64(2, 1), f32(0.25)[0], i64(2)], {"mode": "edge"}, 18, id="axes-edge"),
    op("Pad", [(2, 3, 4), i64(0, 2, 3, 0, 1, 2)], {"mode": "wrap"}, 19, id="wrap"),
]
CASES["Reshape"] = [
    op("Reshape", [(2, 3, 4), i64(0, -1)], opset=13, id="zero-minus1"),
    op("Reshape", [(2, 3, 4), i64(-1, 2, 6)], opset=13, id="batch-minus1"),
    op("Reshape", [(2, 12), i64(0, 3, -1)], opset=5, id="split-axis"),
    op("Reshape", [(2, 3, 4), i64(2, 0, 2, 2)], opset=14, id="frozen-batch"),
    op("Reshape", [(2, 3, 4), i64(0, 4, 3)], {"allowzero": 0}, 14, id="allowzero0"),
    op("Reshape", [(2, 3, 1, 4), i64(0, 3, 4)], opset=14, id="drop-one"),
]
# axis >= 2 would merge samples unless the axes it merges into the batch are all of size 1
CASES["Flatten"] = [op("Flatten", [(2, 3, 4, 5)], {"axis": a} if a is not None else {}, 13, id=f"axis{a}")
                    for a in (None, 1, -3)] + [
    op("Flatten", [(2, 1, 1, 5)], {"axis": 3}, 13, id="axis3-unit-axes"),
    op("Flatten", [(2, 1, 4)], {"axis": -1}, 11, id="axis-1-unit-axis"),
    op("Flatten", [(2,)], {"axis": 1}, 13, id="rank1"),
]
CASES["Squeeze"] = [
    op("Squeeze", [(2, 1, 3, 1)], {"axes": [1]}, 11, id="attr"),
    op("Squeeze", [(2, 1, 3, 1)], {"axes": [-1, 1]}, 11, id="attr-neg"),
    op("Squeeze", [(2, 1, 3, 1), i64(3)], opset=13, id="input"),
    op("Squeeze", [(2, 1, 3, 1), i64(1, -1)], opset=13, id="input-two"),
    Case("all-ones-op13", lambda: model([helper.make_node("Squeeze", ["x"], ["y"])], {"x": (2, 1, 3, 1)},
                                        ["y"], opset=13, output_shapes={"y": ("N", 3)})),
]
CASES["Unsqueeze"] = [
    op("Unsqueeze", [(2, 3)], {"axes": [1]}, 11, id="attr"),
    op("Unsqueeze", [(2, 3)], {"axes": [-1, 1]}, 11, id="attr-neg"),
    op("Unsqueeze", [(2, 3, 4), i64(2, 4)], opset=13, id="input-two"),
    op("Unsqueeze", [(2, 3), i64(-1)], opset=13, id="input-neg"),
]
CASES["Transpose"] = [
    op("Transpose", [(2, 3, 4)], {"perm": [0, 2, 1]}, 13, id="3d"),
    op("Transpose", [(2, 3, 4, 5)], {"perm": [0, 2, 3, 1]}, 13, id="4d-channels-last"),
    op("Transpose", [(2, 3)], {"perm": [0, 1]}, 1, id="identity"),
]
CASES["Concat"] = [
    op("Concat", [(2, 3, 4), (2, 2, 4)], {"axis": 1}, 13, id="axis1"),
    op("Concat", [(2, 3, 4), (2, 3, 1), (2, 3, 2)], {"axis": -1}, 13, id="three-neg"),
    op("Concat", [(2, 3), w(2, 2)], {"axis": 1}, 4, id="with-const-batch2"),
]
CASES["Split"] = [
    op("Split", [(2, 6, 3)], {"axis": 1}, 11, id="equal", n_outputs=3),
    op("Split", [(2, 6, 3)], {"axis": 1, "split": [1, 5]}, 11, id="attr-split", n_outputs=2),
    op("Split", [(2, 3, 7), i64(2, 4, 1)], {"axis": -1}, 13, id="input-split", n_outputs=3),
    op("Split", [(2, 7, 3)], {"axis": 1, "num_outputs": 3}, 18, id="num-outputs-uneven", n_outputs=3),
    op("Split", [(2, 6), i64(3, 3)], {"axis": 1}, 18, id="input-split-18", n_outputs=2),
]
CASES["Slice"] = [
    op("Slice", [(2, 5, 6)], {"starts": [1, 0], "ends": [4, 10], "axes": [1, 2]}, 1, id="attrs"),
    op("Slice", [(2, 5, 6)], {"starts": [-3], "ends": [-1], "axes": [2]}, 1, id="attrs-neg"),
    op("Slice", [(2, 5, 6), i64(1), i64(4), i64(1)], opset=10, id="inputs"),
    op("Slice", [(2, 5, 6), i64(0, 1), i64(5, 6), i64(1, 2), i64(2, 3)], opset=13, id="steps"),
    op("Slice", [(2, 5, 6), i64(-1), i64(-10**10), i64(2), i64(-1)], opset=13, id="reverse"),
    op("Slice", [(2, 5, 6), i64(4, 5), i64(0, 1), i64(1, 2), i64(-2, -3)], opset=13, id="neg-steps"),
    op("Slice", [(2, 5, 6), i64(10, -2), i64(-10, 0), i64(-2, -1), i64(-2, -1)], opset=13,
       id="neg-steps-clamped"),
    op("Slice", [(2, 5, 6), i64(0, 2), i64(10**10, 10**10), i64(0, 1)], opset=13, id="full-batch-axis"),
    op("Slice", [(2, 5, 6), i64(3), i64(1), i64(-1), i64(1)], opset=13, id="empty"),
]
CASES["Gather"] = [
    op("Gather", [(2, 5, 3), i64(0, 4, 2, 2)], {"axis": 1}, 13, id="axis1"),
    op("Gather", [(2, 5, 3), i64(-1, 0)], {"axis": -1}, 13, id="neg-axis-neg-index"),
    op("Gather", [(2, 5, 3), np.array(3, np.int64)], {"axis": 1}, 13, id="scalar-index"),
    op("Gather", [(2, 5, 3), np.array([[0, 1], [4, 4], [2, -2]], np.int64)], {"axis": 1}, 11, id="2d-index"),
    op("Gather", [(2, 4, 5, 3), np.array([[1, 0, 1]], np.int32)], {"axis": 2}, 13, id="int32-axis2"),
]
CASES["ReverseSequence"] = [
    op("ReverseSequence", [(2, 4, 3), i64(3, 1)], {"batch_axis": 0, "time_axis": 1}, 10, id="per-sample"),
    op("ReverseSequence", [(2, 4, 3), i64(4, 4)], {"batch_axis": 0, "time_axis": 1}, 10, id="full"),
]
CASES["Expand"] = [
    op("Expand", [(2, 1, 4), i64(3, 1)], opset=13, id="broadcast"),
    op("Expand", [(2, 3, 1), i64(1, 1, 5)], opset=8, id="ones"),
    op("Expand", [(2, 3), i64(2, 3)], opset=13, id="same"),
]
CASES["Tile"] = [
    op("Tile", [(2, 3, 4), i64(1, 2, 3)], opset=13, id="3d"),
    op("Tile", [(2, 3), i64(1, 1)], opset=6, id="noop"),
]
CASES["DepthToSpace"] = [
    op("DepthToSpace", [(2, 8, 2, 3)], {"blocksize": 2}, 13, id="dcr"),
    op("DepthToSpace", [(2, 8, 2, 3)], {"blocksize": 2, "mode": "CRD"}, 13, id="crd"),
    op("DepthToSpace", [(2, 9, 2, 2)], {"blocksize": 3}, 1, id="block3"),
    op("DepthToSpace", [(2, 18, 2, 3)], {"blocksize": 3, "mode": "CRD"}, 28, id="crd-block3"),
]
CASES["SpaceToDepth"] = [
    op("SpaceToDepth", [(2, 2, 4, 6)], {"blocksize": 2}, 13, id="block2"),
    op("SpaceToDepth", [(2, 1, 6, 3)], {"blocksize": 3}, 1, id="block3"),
    op("SpaceToDepth", [(2, 2, 4, 6)], {"blocksize": 2, "mode": "DCR"}, 28, id="dcr"),
    op("SpaceToDepth", [(2, 2, 4, 6)], {"blocksize": 2, "mode": "CRD"}, 28, id="crd"),
]
CASES["Expand"].append(op("Expand", [(2, 1, 4), i64(2, 3, 4)], opset=13, id="frozen-batch"))


def _selected(op_type, attrs=None, second=True):
    """cond = op(...) read by Where, so the graph's output is a float (booleans read as 0/1)."""
    nodes, consts = [], {"k": f32(0.2)}
    if op_type in ("Not", "And", "Or", "Xor", "IsNaN", "IsInf"):
        nodes.append(helper.make_node("Greater", ["x0", "x1"], ["g"]))
        nodes.append(helper.make_node("Less", ["x0", "k"], ["l"]))
        nodes.append(helper.make_node("Sqrt", ["x0"], ["nan"]))  # NaN below 0 (inputs must be finite)
        nodes.append(helper.make_node("Mul", ["x0", "big"], ["x100"]))
        nodes.append(helper.make_node("Exp", ["x100"], ["inf"]))  # inf above 0.9
        nodes.append(helper.make_node("Sub", ["nan", "inf"], ["both"]))  # NaN, -inf
        consts["big"] = f32(100.0)
        ins = {"Not": ["g"], "IsNaN": ["both"], "IsInf": ["both"]}.get(op_type, ["g", "l"])
    else:
        ins = ["x0", "x1"]
    nodes += [helper.make_node(op_type, ins, ["c"], **(attrs or {})),
              helper.make_node("Where", ["c", "k", "x1"], ["y"])]
    return model(nodes, {"x0": (2, 3, 4), "x1": (2, 3, 4)}, ["y"], consts, opset=13)


for _op in ("Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor"):
    CASES[_op] = [Case("where-op13", lambda _op=_op: _selected(_op))]
CASES["Equal"].append(Case("ties-op13", lambda: _selected("Equal"),
                           feeds=lambda rng: {"x0": rng.integers(0, 2, (2, 3, 4)).astype(np.float32),
                                              "x1": rng.integers(0, 2, (2, 3, 4)).astype(np.float32)}))
CASES["IsNaN"] = [Case("non-finite-op13", lambda: _selected("IsNaN"))]
CASES["IsInf"] = [Case("non-finite-op13", lambda: _selected("IsInf")),
                  Case("positive-op13", lambda: _selected("IsInf", {"detect_negative": 0})),
                  Case("negative-op13", lambda: _selected("IsInf", {"detect_positive": 0}))]
CASES["Where"] = [Case("comparison-op13", lambda: _selected("Greater")),
                  op("Where", [np.array([[True, False, True]]), (2, 3), (2, 3)], opset=16, id="constant-cond")]


def _arg_gather(op_type, attrs):
    nodes = [helper.make_node(op_type, ["x0"], ["i"], **attrs),
             helper.make_node("GatherElements", ["x0", "i"], ["y"], axis=attrs["axis"])]
    return model(nodes, {"x0": (2, 3, 4)}, ["y"], opset=13)


CASES["ArgMax"] = [Case("gather-op13", lambda: _arg_gather("ArgMax", {"axis": 2, "keepdims": 1})),
                   Case("last-op13", lambda: _arg_gather("ArgMax", {"axis": 1, "keepdims": 1, "select_last_index": 1}),
                        feeds=lambda rng: {"x0": rng.integers(0, 2, (2, 3, 4)).astype(np.float32)})]
CASES["ArgMin"] = [Case("gather-op13", lambda: _arg_gather("ArgMin", {"axis": -1, "keepdims": 1}))]
CASES["GatherElements"] = [
    op("GatherElements", [(2, 3, 5), np.array([[[0, -1], [4, 4], [1, 2]]] * 2, np.int64)], {"axis": 2}, 13,
       id="axis2"),
    op("GatherElements", [(2, 4, 3), np.array([[[0, 3, 1]], [[2, 2, -4]]], np.int64)], {"axis": 1}, 13,
       id="fewer-rows")]
CASES["GatherND"] = [
    op("GatherND", [(2, 4, 5), np.array([[[1, 2], [3, -1]]] * 2, np.int64)], {"batch_dims": 1}, 13, id="batch-dims1"),
    op("GatherND", [(2, 4, 5), np.array([[[0, 1], [0, 3]], [[1, 2], [1, 0]]], np.int64)], opset=13,
       id="row-coordinate"),
    op("GatherND", [(2, 3, 4, 5), np.array([[[2]], [[0]]], np.int64)], {"batch_dims": 1}, 13, id="slices")]
CASES["ScatterElements"] = [
    op("ScatterElements", [(2, 5), np.array([[4, 0, 2], [1, 3, 0]], np.int64), (2, 3)], {"axis": 1}, 16, id="none"),
    op("ScatterElements", [(2, 5), np.array([[4, 4, -1], [1, 3, 1]], np.int64), (2, 3)], {"axis": 1,
       "reduction": "add"}, 16, id="add-repeats")]
CASES["ScatterND"] = [
    op("ScatterND", [(2, 4, 2), np.array([[[0, 3], [0, 1]], [[1, 0], [1, 2]]], np.int64), (2, 2, 2)], opset=16,
       id="none"),
    op("ScatterND", [(2, 4, 2), np.array([[[0, 3, 1]], [[1, 3, 1]]], np.int64), (2, 1)], {"reduction": "add"}, 16,
       id="add-elements")]
CASES["CumSum"] = [op("CumSum", [(2, 3, 4), np.array(1, np.int64)], opset=14, id="axis1"),
                   op("CumSum", [(2, 3, 4), np.array(-1, np.int32)], {"reverse": 1, "exclusive": 1}, 14,
                      id="reverse-exclusive")]
CASES["Einsum"] = [op("Einsum", [(2, 3, 4), w(4, 5)], {"equation": "nij,jk->nik"}, 12, id="constant"),
                   op("Einsum", [(2, 3, 4), (2, 4)], {"equation": "nij,nj->ni"}, 12, id="two-activations"),
                   op("Einsum", [(2, 3, 4), w(6)], {"equation": "nij,k->ni"}, 12, id="summed-alone")]
CASES["Resize"] = [
    op("Resize", [(2, 3, 4, 5), f32(), f32(1, 1, 2, 1.5)], {"mode": "linear"}, 13, id="linear"),
    op("Resize", [(2, 3, 4, 5), f32(), f32(1, 1, 0.6, 1.7)], {"mode": "cubic",
       "coordinate_transformation_mode": "align_corners"}, 13, id="cubic-align-corners"),
    op("Resize", [(2, 3, 4, 5), None, None, i64(2, 3, 7, 9)], {"mode": "nearest", "nearest_mode": "floor",
       "coordinate_transformation_mode": "asymmetric"}, 13, id="nearest-sizes"),
    op("Resize", [(2, 3, 4, 5), f32(), f32(1, 1, 1.5, 2)], {"mode": "nearest",
       "coordinate_transformation_mode": "pytorch_half_pixel", "nearest_mode": "ceil"}, 13, id="pytorch-ceil")]
CASES["Upsample"] = [op("Upsample", [(2, 3, 4, 5), f32(1, 1, 2, 3)], {"mode": "nearest"}, 9, id="nearest"),
                     op("Upsample", [(2, 3, 4, 5), f32(1, 1, 2, 1.5)], {"mode": "linear"}, 9, id="linear")]


def _recurrent(**kw):
    from test_recurrent import time_major_model  # noqa: PLC0415
    return time_major_model(**kw)[0]


CASES["LSTM"] = [Case("bi-peepholes-op14", lambda: _recurrent(op="LSTM", direction="bidirectional", peepholes=True)),
                 Case("reverse-clip-op14", lambda: _recurrent(op="LSTM", direction="reverse", attrs={"clip": 0.7}))]
CASES["GRU"] = [Case("bi-op14", lambda: _recurrent(op="GRU", direction="bidirectional")),
                Case("lbr-op14", lambda: _recurrent(op="GRU", attrs={"linear_before_reset": 1}))]
CASES["RNN"] = [Case("bi-op14", lambda: _recurrent(op="RNN", direction="bidirectional")),
                Case("relu-op14", lambda: _recurrent(op="RNN", attrs={"activations": ["Relu"]}))]
for _op in ("Softmax", "LogSoftmax"):
    CASES[_op] = [
        op(_op, [(2, 5)], opset=13, id="2d"),
        op(_op, [(2, 5)], {"axis": 1}, 11, id="2d-opset11"),
        op(_op, [(2, 3, 4)], {"axis": 1}, 13, id="3d-axis1"),
        op(_op, [(2, 3, 4)], {"axis": -1}, 11, id="3d-last-opset11"),
        op(_op, [(2, 3, 4)], opset=13, id="large", low=-80, high=80),
    ]


def _ml_scaler(offset, scale):
    """skl2onnx's Scaler (domain ai.onnx.ml), as a StandardScaler pipeline exports it."""
    node = helper.make_node("Scaler", ["x0"], ["y0"], domain="ai.onnx.ml", offset=offset, scale=scale)
    return model([node], {"x0": (2, 3)}, ["y0"], extra_opsets={"ai.onnx.ml": 1}, output_shapes={"y0": (None, 3)})


CASES["ai.onnx.ml::Scaler"] = [
    Case("per-feature-op17", lambda: _ml_scaler([0.5, -1.0, 2.0], [2.0, 0.5, -3.0])),
    Case("one-value-op17", lambda: _ml_scaler([0.25], [4.0])),
]


def _params():
    params = []
    for (domain, op_type) in liftir.registered_ops():
        cases = CASES.get(f"{domain}::{op_type}" if domain else op_type)
        if not cases:
            params.append(pytest.param(op_type, None, id=f"{domain}::{op_type}-NO-CASE"))
            continue
        params += [pytest.param(op_type, c, id=f"{op_type}-{c.id}") for c in cases]
    return params


def _check(case: Case):
    m = case.build()
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    feeds = case.feeds(rng) if case.feeds else random_feeds(m, rng, case.batch, case.low, case.high)
    expected = run_ort(m, feeds)
    names = [o.name for o in m.graph.output]
    inputs = [vi.name for vi in m.graph.input if vi.name in feeds]
    args = tuple(feeds[n] for n in inputs)
    ex = liftir.Explainer(m, method="saliency", output=names[0])
    for name, ref in zip(names, expected):
        got = ex.predict(args if len(args) > 1 else args[0], output=name)
        assert got.shape == ref.shape, f"{name}: shape {got.shape} != onnxruntime {ref.shape}"
        assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != onnxruntime {ref.dtype}"
        np.testing.assert_allclose(got, ref, rtol=case.rtol, atol=case.atol, err_msg=name)


@pytest.mark.parametrize("op_type, case", _params())
def test_forward_matches_onnxruntime(op_type, case):
    assert case is not None, (f"op {op_type!r} has a registered rule but no forward case: add one to "
                              f"CASES in tests/test_ops_forward.py")
    _check(case)


def test_every_case_names_a_registered_op():
    """A case keyed by a misspelt op would never run."""
    ops = {f"{domain}::{op}" if domain else op for domain, op in liftir.registered_ops()}
    assert set(CASES) <= ops, set(CASES) - ops


def test_multi_node_graph_with_shape_arithmetic():
    """Shape -> Gather -> Concat -> Reshape (what exporters emit) is static and needs no rule."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W"], ["y"]),
    ]
    consts = {"zero": np.array(0, np.int64), "ax0": i64(0), "minus1": i64(-1), "W": w(12, 3)}
    m = model(nodes, {"x": (2, 3, 4)}, ["y"], consts, opset=13)
    x = np.random.default_rng(0).standard_normal((3, 3, 4)).astype(np.float32)
    ex = liftir.Explainer(m, method="saliency")
    np.testing.assert_allclose(ex.predict(x), run_ort(m, {"x": x})[0], rtol=RTOL, atol=ATOL)
    # the static values are cached per input shape: a new batch size must not reuse them
    x5 = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(ex.predict(x5), run_ort(m, {"x": x5})[0], rtol=RTOL, atol=ATOL)

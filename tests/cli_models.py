"""Small ONNX models (onnx.helper, no torch) for the check and CLI tests: fast to build,
one of each input kind the CLI plots (tabular, image, one-hot sequence)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.rule import Elementwise


def _model(nodes, inputs, outputs, consts, opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test_model",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    onnx.checker.check_model(m)
    return m


def _w(rng, *shape):
    return rng.standard_normal(shape) / np.sqrt(shape[0] if len(shape) == 2 else np.prod(shape[1:]))


def mlp(n_in: int = 6, hidden: int = 16, n_out: int = 3, softmax: bool = True, seed: int = 0):
    """x (N, n_in) -> Gemm -> Relu 'relu1' -> Gemm -> [Softmax] -> (N, n_out)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"], name="fc2")]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=-1))
        out = "prob"
    consts = {"W1": _w(rng, n_in, hidden), "b1": 0.1 * rng.standard_normal(hidden),
              "W2": _w(rng, hidden, n_out), "b2": 0.1 * rng.standard_normal(n_out)}
    return _model(nodes, {"x": ["N", n_in]}, {out: ["N", n_out]}, consts)


def two_inputs(seed: int = 0):
    """a (N, 4), b (N, 4) -> Add -> Relu -> Gemm -> (N, 2); for .npz inputs by name."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "W", "c"], ["y"], name="fc")]
    consts = {"W": _w(rng, 4, 2), "c": 0.1 * rng.standard_normal(2)}
    return _model(nodes, {"a": ["N", 4], "b": ["N", 4]}, {"y": ["N", 2]}, consts)


def two_outputs(seed: int = 0):
    """x (N, 5) -> Gemm -> Tanh 'tanh' -> out1, and Relu 'relu1' -> out2."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "W", "c"], ["h"], name="fc"),
             helper.make_node("Tanh", ["h"], ["out1"], name="tanh"),
             helper.make_node("Relu", ["h"], ["out2"], name="relu1")]
    consts = {"W": _w(rng, 5, 3), "c": 0.1 * rng.standard_normal(3)}
    return _model(nodes, {"x": ["N", 5]}, {"out1": ["N", 3], "out2": ["N", 3]}, consts)


def small_cnn(channels: int = 3, size: int = 8, n_out: int = 4, seed: int = 0):
    """x (N, C, H, W) -> Conv -> Relu -> MaxPool -> Flatten -> Gemm -> (N, n_out)."""
    rng = np.random.default_rng(seed)
    k = 4
    flat = k * (size // 2) ** 2
    nodes = [helper.make_node("Conv", ["x", "K", "kb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W", "c2"], ["y"], name="fc")]
    consts = {"K": _w(rng, k, channels, 3, 3), "kb": 0.1 * rng.standard_normal(k),
              "W": _w(rng, flat, n_out), "c2": 0.1 * rng.standard_normal(n_out)}
    return _model(nodes, {"x": ["N", channels, size, size]}, {"y": ["N", n_out]}, consts)


def dna_cnn(length: int = 20, seed: int = 0):
    """One-hot DNA x (N, 4, L) -> Conv1d -> Relu -> MaxPool(4) -> Flatten -> Gemm -> (N, 1)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "K", "kb"], ["c"], name="conv", pads=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[4], strides=[4]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W", "c2"], ["y"], name="fc")]
    consts = {"K": _w(rng, 6, 4, 5), "kb": 0.1 * rng.standard_normal(6),
              "W": _w(rng, 6 * (length // 4), 1), "c2": np.zeros(1)}
    return _model(nodes, {"x": ["N", 4, length]}, {"y": ["N", 1]}, consts)


def onehot_dna(n: int, length: int = 20, seed: int = 0) -> np.ndarray:
    idx = np.random.default_rng(seed).integers(0, 4, (n, length))
    return np.eye(4, dtype=np.float32)[idx].transpose(0, 2, 1).copy()


def unknown_op(seed: int = 0):
    """A model with an op type liftir has no rule for (com.example::Mystery)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "W", "c"], ["h"], name="fc"),
             helper.make_node("Mystery", ["h"], ["y"], name="mystery1", domain="com.example")]
    consts = {"W": _w(rng, 3, 3), "c": np.zeros(3)}
    return _model(nodes, {"x": ["N", 3]}, {"y": ["N", 3]}, consts,
                  opsets=(("", 17), ("com.example", 1)))


def norm_over_batch(seed: int = 0):
    """x (N, 3) -> Gemm -> LayerNormalization over axis 0: every op type has a rule, but
    the LayerNormalization rule refuses to mix samples, which only running it shows, so
    ops, explain and check must all refuse the model."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "W", "c"], ["h"], name="fc"),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["y"], name="norm_over_batch", axis=0)]
    consts = {"W": _w(rng, 3, 2), "c": np.zeros(2), "g": np.ones(2), "b": np.zeros(2)}
    return _model(nodes, {"x": ["N", 3]}, {"y": ["N", 2]}, consts)


class UserRelu(Elementwise):
    """Relu written as a user would write it (a base for the test rules below)."""

    piecewise_linear = True

    def f(self, xp, x, ctx):
        return xp.maximum(x, 0)

    def df(self, xp, x, ctx):
        return (x > 0).astype(x.dtype)


class HalfRelu(UserRelu):
    """A deliberately broken DeepLIFT rule: the right forward, half the right multiplier."""

    def backward(self, ctx, g):
        (m,) = super().backward(ctx, g)
        return (0.5 * m,)


class LeakyForwardRelu(HalfRelu):
    """A broken forward (leaky where Relu is flat) with a self-consistent backward."""

    def f(self, xp, x, ctx):
        return xp.where(x > 0, x, 0.1 * x)

    def df(self, xp, x, ctx):
        return xp.where(x > 0, 1.0, 0.1).astype(x.dtype)

    def backward(self, ctx, g):
        return Elementwise.backward(self, ctx, g)


def register_broken_relu():
    """Register HalfRelu for Relu as a user rule (undo with liftir.unregister_rule('Relu'))."""
    liftir.register_rule("Relu", replace=True)(HalfRelu)

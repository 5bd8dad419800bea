"""The DeepLIFT paper's Figure 1: a ReLU that is off still carries information.

Shrikumar et al. (2016), Figure 1: inputs x1 and x2 have reference values 0. At
x1 = x2 = -1 the output is 0.1, the reference output is 0.5, and the ReLU y between them
is inactive (its reference activation is 2). The gradient with respect to x1 and x2 is
therefore 0, while DeepLIFT assigns (0.1 - 0.5) * 1/3 to x1 and (0.1 - 0.5) * 2/3 to x2.

The paper does not print the weights; this network reproduces every number it gives:

    h = 1 * x1 + 2 * x2 + 2        h(ref) =  2,  h(x) = -1
    y = relu(h)                    y(ref) =  2,  y(x) =  0
    o = 0.2 * y + 0.1              o(ref) = 0.5, o(x) = 0.1

DeepLIFT: m_{y h} = (0 - 2) / (-1 - 2) = 2/3, so C_{x1 o} = 0.2 * 2/3 * 1 * (-1) = -0.4/3
and C_{x2 o} = 0.2 * 2/3 * 2 * (-1) = -0.8/3: they sum to o(x) - o(ref) = -0.4.

The network is built with onnx.helper (no training framework) and explained with
liftir's DeepLIFT, saliency and gradient x input. Exits with status 1 if any number
differs from the paper's.

Usage: ``python examples/figure1/figure1.py [--out DIR]``
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

import liftir


def build_figure1_model() -> onnx.ModelProto:
    """Inputs x1, x2 of shape (N, 1); output o of shape (N, 1)."""
    x1 = helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["N", 1])
    x2 = helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 1])
    o = helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 1])
    inits = [
        helper.make_tensor("w1", TensorProto.FLOAT, [1, 1], [1.0]),
        helper.make_tensor("w2", TensorProto.FLOAT, [1, 1], [2.0]),
        helper.make_tensor("b_h", TensorProto.FLOAT, [1], [2.0]),
        helper.make_tensor("w_o", TensorProto.FLOAT, [1, 1], [0.2]),
        helper.make_tensor("b_o", TensorProto.FLOAT, [1], [0.1]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x1", "w1"], ["x1w"], name="x1_times_1"),
        helper.make_node("MatMul", ["x2", "w2"], ["x2w"], name="x2_times_2"),
        helper.make_node("Add", ["x1w", "x2w"], ["s"], name="sum"),
        helper.make_node("Add", ["s", "b_h"], ["h"], name="plus_bias"),
        helper.make_node("Relu", ["h"], ["y"], name="relu_y"),
        helper.make_node("Gemm", ["y", "w_o", "b_o"], ["o"], name="output_layer"),
    ]
    graph = helper.make_graph(nodes, "deeplift_figure1", [x1, x2], [o], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="liftir-examples")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _scalar(a) -> float:
    return float(np.asarray(a).ravel()[0]) + 0.0  # + 0.0 turns -0.0 into 0.0


def plot(got: dict, paper: dict, path: str) -> None:
    """Bar chart: each method's scores for x1 and x2 next to the paper's DeepLIFT values."""
    import matplotlib.figure  # noqa: PLC0415

    fig = matplotlib.figure.Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.add_subplot()
    groups = [("DeepLIFT (paper)", paper["DeepLIFT C_x1"], paper["DeepLIFT C_x2"]),
              ("DeepLIFT (liftir)", got["DeepLIFT C_x1"], got["DeepLIFT C_x2"]),
              ("saliency", got["saliency d o/d x1"], got["saliency d o/d x2"]),
              ("gradient x input", got["gradient*input x1"], got["gradient*input x2"])]
    xs = np.arange(len(groups))
    for k, (name, color) in enumerate((("x1", "#4393c3"), ("x2", "#d6604d"))):
        vals = [g[1 + k] for g in groups]
        bars = ax.bar(xs + (k - 0.5) * 0.38, vals, width=0.36, color=color, label=name)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], fontsize=8, padding=2)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(xs, [g[0] for g in groups])
    ax.set_ylabel("score for output o")
    ax.set_ylim(-0.33, 0.05)
    ax.set_title("Figure 1: x1 = x2 = -1, reference 0; o(x) - o(ref) = 0.1 - 0.5 = -0.4")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="folder for figure1.onnx and figure1_scores.png (default: examples/figure1/out)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)

    model = build_figure1_model()
    onnx.save(model, os.path.join(out, "figure1.onnx"))

    x = (np.array([[-1.0]], np.float32), np.array([[-1.0]], np.float32))
    ref = (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))

    dl = liftir.Explainer(model, method="deeplift")
    o_x = _scalar(dl.predict(x))
    o_ref = _scalar(dl.predict(ref))
    y_x = _scalar(dl.predict(x, output="y"))
    y_ref = _scalar(dl.predict(ref, output="y"))
    (c1, c2), delta = dl.attribute(x, baselines=ref, return_convergence_delta=True)
    (g1, g2) = liftir.Explainer(model, method="saliency").attribute(x)
    (gi1, gi2) = liftir.Explainer(model, method="input_x_gradient").attribute(x)

    paper = {"o(x)": 0.1, "o(ref)": 0.5, "y(x)": 0.0, "y(ref)": 2.0,
             "DeepLIFT C_x1": (0.1 - 0.5) / 3, "DeepLIFT C_x2": 2 * (0.1 - 0.5) / 3,
             "saliency d o/d x1": 0.0, "saliency d o/d x2": 0.0,
             "gradient*input x1": 0.0, "gradient*input x2": 0.0,
             "summation-to-delta residual": 0.0}
    got = {"o(x)": o_x, "o(ref)": o_ref, "y(x)": y_x, "y(ref)": y_ref,
           "DeepLIFT C_x1": _scalar(c1), "DeepLIFT C_x2": _scalar(c2),
           "saliency d o/d x1": _scalar(g1), "saliency d o/d x2": _scalar(g2),
           "gradient*input x1": _scalar(gi1), "gradient*input x2": _scalar(gi2),
           "summation-to-delta residual": _scalar(delta)}

    print("DeepLIFT paper, Figure 1: x1 = x2 = -1, reference x1 = x2 = 0")
    print(f"{'quantity':<30}{'paper':>12}{'liftir':>12}")
    failed = []
    for key, want in paper.items():
        ok = abs(got[key] - want) <= 1e-6
        failed += [] if ok else [key]
        print(f"{key:<30}{want:>12.6f}{round(got[key], 6) + 0.0:>12.6f}{'' if ok else '   <-- MISMATCH'}")
    print("DeepLIFT sees the inactive ReLU: contributions sum to o(x) - o(ref) = "
          f"{got['DeepLIFT C_x1'] + got['DeepLIFT C_x2']:.6f}; the gradient is 0 at x.")
    plot(got, paper, os.path.join(out, "figure1_scores.png"))
    print("wrote", os.path.join(out, "figure1_scores.png"))
    if failed:
        print("FAILED:", ", ".join(failed))
        return 1
    print("all numbers match the paper")
    return 0


if __name__ == "__main__":
    sys.exit(main())

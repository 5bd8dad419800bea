"""Nonlinear reductions (rules/reductions.py): forward == onnxruntime at opsets 13 (axes an
attribute) and 18 (an input), multipliers == a slow float64 composition of Rescale and the
sum, == liftir on the ONNX function body (opset 18), and summation-to-delta."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import liftir
from liftir.functions import expand_functions
from liftir.registry import lookup
from onnx_builders import op_model, run_ort

RNG = np.random.default_rng(18)
OPS = ("ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")


def _model(op, opset, axes, keepdims, dtype=np.float32):
    if opset >= 18:
        return op_model(op, [(2, 3, 4), np.array(axes, np.int64)], {"keepdims": keepdims}, opset, dtype=dtype)
    return op_model(op, [(2, 3, 4)], {"axes": axes, "keepdims": keepdims}, opset, dtype=dtype)


def _slow(op, x, x0, axes):
    """DeepLIFT of the chain f(x) -> sum (-> g), each Rescale as a plain divided difference."""
    f = {"ReduceSumSquare": np.square, "ReduceL1": np.abs, "ReduceL2": np.square, "ReduceLogSum": lambda t: t,
         "ReduceLogSumExp": np.exp}[op]
    m = (f(x) - f(x0)) / (x - x0)
    g = {"ReduceL2": np.sqrt, "ReduceLogSum": np.log, "ReduceLogSumExp": np.log}.get(op)
    if g is not None:
        s, s0 = f(x).sum(axes, keepdims=True), f(x0).sum(axes, keepdims=True)
        m = m * (g(s) - g(s0)) / (s - s0)
    return m


def _inputs(op, shape):
    x = RNG.standard_normal(shape)
    return abs(x) + 0.1 if op == "ReduceLogSum" else x


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("opset,axes,keepdims", [(13, [2], 1), (13, [1, 2], 0), (18, [1], 0), (18, [-1], 1)])
def test_forward_multipliers_and_conservation(op, opset, axes, keepdims):
    m32 = _model(op, opset, axes, keepdims)
    x = _inputs(op, (3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(liftir.Explainer(m32).predict(x), run_ort(m32, {"x0": x})[0], rtol=1e-5, atol=1e-6)
    m = _model(op, opset, axes, keepdims, np.float64)
    x, x0 = _inputs(op, (3, 3, 4)), _inputs(op, (1, 3, 4))
    ex = liftir.Explainer(m)
    y = ex.predict(x)
    for target in [(0,) * (y.ndim - 1), tuple(d - 1 for d in y.shape[1:])]:
        attr, delta = ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
        assert np.abs(delta).max() <= 1e-12 * max(1.0, np.abs(y).max())
        # the attribution of each input is m * dx on the inputs reduced into the target
        keep = np.zeros_like(x, bool)
        index = list(target)
        full = [slice(None)] * 2
        for ax in range(1, 3):
            if ax - 1 in [a % 3 - 1 for a in axes]:
                full[ax - 1] = slice(None)
                if keepdims:
                    index.pop(0)
            else:
                full[ax - 1] = index.pop(0)
        keep[(slice(None),) + tuple(full)] = True
        expected = np.where(keep, _slow(op, x, x0, tuple(a % 3 for a in axes)) * (x - x0), 0)
        np.testing.assert_allclose(attr, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("op", OPS)
def test_rule_equals_its_function_body(op):
    m = _model(op, 18, [1, 2], 0, np.float64)
    expanded = onnx.ModelProto()
    expanded.CopyFrom(onnx.shape_inference.infer_shapes(m))
    assert expand_functions(expanded, lambda o, d, v: o != op and lookup(o, d, v) is not None) == 1
    x, x0 = _inputs(op, (3, 3, 4)), _inputs(op, (1, 3, 4))
    a = liftir.Explainer(m).attribute(x, baselines=x0, target=None)
    b = liftir.Explainer(expanded, precision="float64").attribute(x, baselines=x0, target=None)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    g = liftir.Explainer(m, method="saliency").attribute(x, target=None)
    np.testing.assert_allclose(g, liftir.Explainer(expanded, method="saliency", precision="float64").attribute(
        x, target=None), rtol=1e-10, atol=1e-13)


def test_logsumexp_far_from_zero_neither_overflows_nor_cancels():
    m = _model("ReduceLogSumExp", 13, [2], 0, np.float64)
    x, x0 = 800 + RNG.standard_normal((2, 3, 4)), -800 + RNG.standard_normal((1, 3, 4))
    ex = liftir.Explainer(m)
    attr, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    assert np.all(np.isfinite(attr)) and np.abs(delta).max() <= 1e-12 * 1600
    # x0 is negligible beside x: each term is e^x / sum e^x of the 1600 difference, nearly
    np.testing.assert_allclose(attr[:, 1].sum(-1), ex.predict(x)[:, 1] - ex.predict(x0)[:, 1], rtol=1e-12)


def _tree_split(factors, references):
    """Hand-written float64 product rule on a balanced tree of pairs, one sample at a time:
    returns each factor's multiplier (the reference math for ReduceProd's vectorized rule)."""
    if len(factors) == 1:
        return [1.0]
    if len(factors) % 2:
        factors, references = factors + [1.0], references + [1.0]
    pairs = range(0, len(factors), 2)
    upper = _tree_split([factors[i] * factors[i + 1] for i in pairs],
                        [references[i] * references[i + 1] for i in pairs])
    m = []
    for k, i in enumerate(pairs):
        m += [upper[k] * (factors[i + 1] + references[i + 1]) / 2, upper[k] * (factors[i] + references[i]) / 2]
    return m[:len(factors)]


@pytest.mark.parametrize("opset,axes,keepdims", [(13, [2], 1), (13, [1, 2], 0), (18, [1], 0), (18, [-1], 1)])
def test_reduce_prod_is_the_product_rule_on_a_tree_of_pairs(opset, axes, keepdims):
    m32 = _model("ReduceProd", opset, axes, keepdims)
    x = RNG.standard_normal((3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(liftir.Explainer(m32).predict(x), run_ort(m32, {"x0": x})[0], rtol=1e-5, atol=1e-6)
    ex = liftir.Explainer(_model("ReduceProd", opset, axes, keepdims, np.float64))
    x, x0 = RNG.standard_normal((3, 3, 4)), RNG.standard_normal((1, 3, 4))
    y = ex.predict(x)
    target = tuple(d - 1 for d in y.shape[1:])
    attr, delta = ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-12 * max(1.0, np.abs(y).max())
    reduced = sorted(a % 3 for a in axes)
    kept = [a for a in (1, 2) if a not in reduced]
    expected = np.zeros_like(x)
    index = list(target)
    fixed = {}
    for ax in (1, 2):  # the kept axis' index in the target (when kept) picks the factors
        if ax in kept:
            fixed[ax] = index.pop(0)
        elif keepdims:
            index.pop(0)
    for n in range(3):
        cells = [c for c in np.ndindex(3, 4) if all(c[ax - 1] == i for ax, i in fixed.items())]
        m = _tree_split([x[n][c] for c in cells], [x0[0][c] for c in cells])
        for c, mc in zip(cells, m):
            expected[n][c] = mc * (x[n][c] - x0[0][c])
    np.testing.assert_allclose(attr, expected, rtol=1e-12, atol=1e-14)


def test_reduce_prod_saliency_equals_torch_autograd():
    torch = pytest.importorskip("torch")
    ex = liftir.Explainer(_model("ReduceProd", 13, [1, 2], 0, np.float64), method="saliency")
    x = RNG.standard_normal((3, 3, 4))
    t = torch.tensor(x, requires_grad=True)
    t.prod(dim=(1)).prod(dim=1).sum().backward()
    np.testing.assert_allclose(ex.attribute(x, target=None), t.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_reduce_prod_of_an_exported_torch_model_matches_autograd_and_conserves():
    """torch.prod exported by the TorchScript exporter (a ReduceProd node): saliency equals
    torch.autograd, and DeepLIFT conserves against onnxruntime."""
    torch = pytest.importorskip("torch")
    from onnx_builders import export_torch

    class ProdHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(5, 12)

        def forward(self, x):
            return torch.tanh(self.fc(x)).reshape(-1, 3, 4).prod(dim=-1) + 1

    module = ProdHead().eval()
    proto = export_torch(module, torch.randn(2, 5), 17)
    assert "ReduceProd" in {n.op_type for n in proto.graph.node}
    x = RNG.standard_normal((4, 5)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    module(xt)[:, 1].sum().backward()
    sal = liftir.Explainer(proto, "saliency").attribute(x, target=1)
    np.testing.assert_allclose(sal, xt.grad.numpy(), rtol=1e-4, atol=1e-6 * np.abs(xt.grad.numpy()).max())
    x0 = 0.3 * RNG.standard_normal((1, 5)).astype(np.float32)
    attr, delta = liftir.Explainer(proto).attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    diff = run_ort(proto, {proto.graph.input[0].name: x})[0][:, 1] - run_ort(proto, {proto.graph.input[0].name: x0})[0][0, 1]
    np.testing.assert_allclose(attr.sum(1), diff, rtol=1e-4, atol=1e-6)
    assert np.abs(delta).max() <= 1e-5 * max(1.0, np.abs(diff).max())

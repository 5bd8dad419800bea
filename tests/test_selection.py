"""Comparisons, boolean logic, Where, gathers and scatters (rules/selection.py), the
GatherElements constant folding, and the dynamo exporter's idioms that use them.

Anchors: onnxruntime forwards, torch.autograd, Captum's DeepLift in float64 (nn.Softplus is
a module Captum rescales as a whole, which is exactly the Rescale of the piecewise
Where(x > t, x, softplus(x)) the dynamo exporter writes), and the adjoint identity
<A x, y> = <x, A^T y> in float64 for the affine selections.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from onnx import helper

import liftir
from liftir.errors import InputError
from liftir import scheduler
from liftir.errors import RuleError
from onnx_builders import model, op_model, run_ort


def _dynamo(module, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (x,), dynamo=True, verbose=False,
                                 dynamic_shapes={"x": {0: torch.export.Dim("N")}}).model_proto


class SoftplusMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.act = torch.nn.Softplus(beta=1.0, threshold=2.0)

    def forward(self, x):
        return self.b(self.act(3 * self.a(x)))


class AdaptivePool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu = torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU()
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d((3, 2)), torch.nn.Linear(18, 2)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("module, shape", [(SoftplusMLP, (6, 4)), (AdaptivePool, (2, 2, 9, 7))])
def test_dynamo_idioms_equal_captum_and_autograd(module, shape):
    from captum.attr import DeepLift
    net = module().eval()
    proto = _dynamo(net, torch.randn(*shape))
    ops = {n.op_type for n in proto.graph.node}
    assert {"Where", "Greater"} <= ops or "GatherND" in ops
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 2
    x0 = rng.standard_normal((1,) + shape[1:])
    attr, delta = liftir.Explainer(proto, "deeplift", precision="float64").attribute(
        x, baselines=x0, target=1, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-9 * max(1.0, np.abs(attr).max())
    theirs = DeepLift(net.double()).attribute(torch.tensor(x), baselines=torch.tensor(x0), target=1).detach().numpy()
    np.testing.assert_allclose(attr, theirs, atol=1e-9 * np.abs(theirs).max())
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    net.float()(xt)[:, 1].sum().backward()
    sal = liftir.Explainer(proto, "saliency").attribute(x.astype(np.float32), target=1)
    assert np.abs(sal - xt.grad.numpy()).max() <= 1e-4 * np.abs(xt.grad.numpy()).max()


def test_where_of_one_tensor_is_the_rescale_of_the_piecewise_function():
    t = 1.5
    nodes = [helper.make_node("Greater", ["x", "t"], ["c"]), helper.make_node("Softplus", ["x"], ["s"]),
             helper.make_node("Where", ["c", "x", "s"], ["y"]), helper.make_node("ReduceSum", ["y", "ax"], ["o"],
                                                                            keepdims=0)]
    m = model(nodes, {"x": (1, 6)}, {"o": np.float64}, {"t": np.array(t), "ax": np.array([1])},
              input_dtypes={"x": np.float64})
    x = np.array([[2.5, 0.3, 1.6, -1.0, 1.4, 3.0]])
    x0 = np.array([[0.2, 2.0, 1.4, -0.5, 1.6, 3.0 + 1e-7]])
    attr, delta = liftir.Explainer(m, "deeplift").attribute(x, baselines=x0, target=None,
                                                            return_convergence_delta=True)

    def g(v):
        return np.where(v > t, v, np.log1p(np.exp(v)))
    np.testing.assert_allclose(attr, (g(x) - g(x0)), rtol=1e-12, atol=1e-15)  # m dx = dg: the Rescale
    assert abs(delta).max() < 1e-13


def _boolean_graph():
    nodes = [helper.make_node("Greater", ["u", "v"], ["c1"]), helper.make_node("Less", ["u", "k"], ["c2"]),
             helper.make_node("Not", ["c2"], ["n2"]), helper.make_node("And", ["c1", "n2"], ["a"]),
             helper.make_node("Xor", ["c1", "c2"], ["x"]), helper.make_node("Or", ["a", "x"], ["c"]),
             helper.make_node("Equal", ["u", "u"], ["e"]), helper.make_node("And", ["c", "e"], ["ce"]),
             helper.make_node("Mul", ["u", "two"], ["a2"]), helper.make_node("Tanh", ["v"], ["tv"]),
             helper.make_node("Where", ["ce", "a2", "tv"], ["y"])]
    return model(nodes, {"u": (1, 5), "v": (1, 5)}, {"y": np.float64},
                 {"k": np.array(0.3), "two": np.array(2.0)}, input_dtypes={"u": np.float64, "v": np.float64})


def _where_reference(u, v, u0, v0):
    """Hand-written float64 DeepLIFT of y = where(c, 2u, tanh v), c = u > v xor-and-or ... = u > v or u < k."""
    def cond(a, b):
        c1, c2 = a > b, a < 0.3
        return ((c1 & ~c2) | (c1 ^ c2)).astype(float)
    c, c0 = cond(u, v), cond(u0, v0)
    cm = (c + c0) / 2
    a, a0, b, b0 = 2 * u, 2 * u0, np.tanh(v), np.tanh(v0)
    return cm * 2 * (u - u0), (1 - cm) * (b - b0), (c - c0) * ((a + a0) / 2 - (b + b0) / 2)


def test_where_and_boolean_logic_conserve_and_match_the_shapley_split():
    m = _boolean_graph()
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal((40, 5)), rng.standard_normal((40, 5))
    u0, v0 = rng.standard_normal((1, 5)), rng.standard_normal((1, 5))
    np.testing.assert_allclose(liftir.Explainer(m, "saliency").predict((u, v)),
                               run_ort(m, {"u": u, "v": v})[0], rtol=1e-12)
    for t in range(5):
        (au, av), delta = liftir.Explainer(m, "deeplift").attribute(
            (u, v), baselines=(u0, v0), target=t, return_convergence_delta=True)
        assert np.abs(delta).max() < 1e-12
        through_a, through_b, switch = (part[:, t] for part in _where_reference(u, v, u0, v0))
        np.testing.assert_allclose(au[:, t] + av[:, t], through_a + through_b + switch, rtol=1e-12, atol=1e-14)
        # Where's own multipliers, read at its branch inputs: c' and 1 - c'
        for layer, expected in (("a2", through_a), ("tv", through_b)):
            got = liftir.Explainer(m, "deeplift").attribute((u, v), baselines=(u0, v0), target=t, layer=layer)
            np.testing.assert_allclose(got[:, t], expected, rtol=1e-12, atol=1e-15)
    # saliency: the condition carries no gradient (torch.where)
    ut, vt = torch.tensor(u, requires_grad=True), torch.tensor(v, requires_grad=True)
    c = ((ut > vt) & ~(ut < 0.3)) | ((ut > vt) ^ (ut < 0.3))
    torch.where(c, 2 * ut, torch.tanh(vt))[:, 2].sum().backward()
    gu, gv = liftir.Explainer(m, "saliency").attribute((u, v), target=2)
    np.testing.assert_allclose(gu, ut.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(gv, vt.grad.numpy(), rtol=1e-12)


def _adjoint_check(m, shape, rng):
    """<A x, y> = <x, A^T y> in float64, with A^T y from the scheduler's backward."""
    ex = liftir.Explainer(m, "saliency", final_activation="keep")
    x = rng.standard_normal(shape)
    run = scheduler.forward(ex.plan, np, {"x0": x}, shape[0], 0, (ex.output,), "gradient", ex.options,
                            engine="rules")
    y = run.actual(ex.output)
    seed = rng.standard_normal((1,) + y.shape)
    back = scheduler.backward(run, {ex.output: seed}, ("x0",), (ex.output,))["x0"][0]
    assert abs((y * seed[0]).sum() - (x * back).sum()) < 1e-12 * max(1.0, np.abs(y).sum())
    return x, y


SELECTIONS = {
    "gather-elements": ("GatherElements", [(3, 4, 5), np.array([[[0, -1, 2], [4, 4, 1]]])], {"axis": 2}),
    "gather-nd-batch-dims": ("GatherND", [(3, 4, 5), np.array([[[1, 2], [3, -1], [1, 2]]])],
                             {"batch_dims": 1}),
    "gather-nd-shared": ("GatherND", [(3, 4, 5), np.array([[[0, 1], [0, 3]]])], {}),
    "scatter-elements-add": ("ScatterElements", [(3, 4), np.array([[1, 1, 3]]), (3, 3)],
                             {"axis": 1, "reduction": "add"}),
    "scatter-elements": ("ScatterElements", [(3, 4), np.array([[2, 0]]), (3, 2)], {"axis": 1}),
    "scatter-nd": ("ScatterND", [(3, 4, 2), np.array([[[0, 3], [0, 1]]]), (3, 2, 2)], {}),
    "gather-scalar-index": ("Gather", [(3, 4, 5), np.array(-2)], {"axis": 1}),
    "gather-unique-indices": ("Gather", [(3, 4, 5), np.array([[3, 0], [-1, 1]])], {"axis": 2}),
    "gather-repeated-indices": ("Gather", [(3, 4, 5), np.array([1, -3, 2, 1])], {"axis": 1}),
}


@pytest.mark.parametrize("case", list(SELECTIONS))
def test_selections_forward_and_adjoint(case):
    op, inputs, attrs = SELECTIONS[case]
    rng = np.random.default_rng(4)
    shapes = [s for s in inputs if isinstance(s, tuple)]
    inputs = [np.asarray(s, np.int64) if isinstance(s, np.ndarray) else s for s in inputs]
    m = op_model(op, inputs, attrs, opset=18, dtype=np.float64)
    if len(shapes) == 1:
        x, y = _adjoint_check(m, (1,) + shapes[0][1:], rng)  # indices of a batch-1 export
        np.testing.assert_allclose(y, run_ort(m, {"x0": x})[0], rtol=1e-15)
    feeds = {f"x{i}": rng.standard_normal((1,) + s[1:]) for i, s in enumerate(inputs) if isinstance(s, tuple)}
    ex = liftir.Explainer(m, "deeplift")
    ex.plan.use_onnxruntime = False
    np.testing.assert_allclose(ex.predict(tuple(feeds.values())), run_ort(m, feeds)[0], rtol=1e-15)
    batch = {k: rng.standard_normal((4,) + v.shape[1:]) for k, v in feeds.items()}
    refs = {k: rng.standard_normal((1,) + v.shape[1:]) for k, v in feeds.items()}
    _, delta = ex.attribute(tuple(batch.values()), baselines=tuple(refs.values()), target=(0,) * (
        len(ex.predict(tuple(batch.values())).shape) - 1), return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-12


def test_data_dependent_indices():
    nodes = [helper.make_node("ArgMax", ["s"], ["i"], axis=1, keepdims=1),
             helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)]
    m = model(nodes, {"x": (1, 4), "s": (1, 4)}, {"y": np.float64}, input_dtypes={"x": np.float64, "s": np.float64})
    x, s = np.array([[1.0, 2, 3, 4]]), np.array([[0.0, 5, 1, 2]])
    ex = liftir.Explainer(m, "deeplift")
    (ax, _), delta = ex.attribute((x, s), baselines=(np.zeros((1, 4)), s), target=0, return_convergence_delta=True)
    np.testing.assert_allclose(ax, [[0, 2, 0, 0]])
    with pytest.raises(RuleError, match="differ between the actual input and the reference"):
        ex.attribute((x, s), baselines=(np.zeros((1, 4)), s[:, ::-1]), target=0)
    gx, _ = liftir.Explainer(m, "saliency").attribute((x, s), target=0)
    np.testing.assert_allclose(gx, [[0, 1, 0, 0]])


def test_gather_elements_folds_a_long_constant():
    """Every dynamo export of an HF BERT gathers its position ids from a 512-long buffer."""
    buffer = np.arange(600, dtype=np.int64)[None] * 3
    nodes = [helper.make_node("GatherElements", ["buf", "idx"], ["pos"], axis=1),
             helper.make_node("Cast", ["pos"], ["posf"], to=11),
             helper.make_node("Add", ["x", "posf"], ["y"])]
    m = model(nodes, {"x": (1, 7)}, {"y": np.float64}, {"buf": buffer, "idx": np.array([[5, 599, -1, 0, 9, 9, 2]])},
              input_dtypes={"x": np.float64})
    x = np.zeros((2, 7))
    np.testing.assert_array_equal(liftir.Explainer(m, "saliency").predict(x), run_ort(m, {"x": x})[0])


def test_expand_with_a_batch_size_frozen_into_its_shape():
    """An export traced at batch 2 expands (N, 1, 3) to the constant shape (2, 4, 3): the 2 is
    read as the batch for calls of 2 samples (each stacked row keeps its own sample), and a
    call of another size is refused by node name, as onnxruntime cannot run it either."""
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"]), helper.make_node("Tanh", ["e"], ["y"])]
    m = model(nodes, {"x": (1, 1, 3)}, {"y": np.float64}, {"shape": np.array([2, 4, 3])},
              input_dtypes={"x": np.float64}, output_shapes={"y": ["N", 4, 3]})
    x, x0 = np.random.default_rng(5).standard_normal((2, 1, 3)), np.zeros((1, 1, 3))
    ex = liftir.Explainer(m, "deeplift")
    np.testing.assert_allclose(ex.predict(x), np.tanh(np.broadcast_to(x, (2, 4, 3))))
    attr, delta = ex.attribute(x, baselines=x0, target=(2, 1), return_convergence_delta=True)
    np.testing.assert_allclose(attr[:, 0, 1], np.tanh(x[:, 0, 1]), rtol=1e-12)
    assert np.abs(delta).max() < 1e-13
    five = np.random.default_rng(6).standard_normal((5, 1, 3))
    with pytest.raises(InputError, match="Expand node .* batch size baked into the model"):
        ex.attribute(five, baselines=x0, target=(2, 1))


def test_cupy_subset_backend():
    """The rules call only functions CuPy also has (see tests/test_array_api_subset.py)."""
    from test_array_api_subset import subset_module
    rng = np.random.default_rng(9)
    u, v = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    refs = (rng.standard_normal((1, 5)), rng.standard_normal((1, 5)))
    for m, xs, bs in ((_boolean_graph(), (u, v), refs),
                      (op_model("GatherND", [(3, 4, 5), np.array([[[1, 2], [3, -1]]])], {"batch_dims": 1},
                                dtype=np.float64), (rng.standard_normal((2, 4, 5)),), (np.zeros((1, 4, 5)),)),
                      (op_model("ScatterElements", [(3, 4), np.array([[1, 1, 3]]), (3, 3)],
                                {"axis": 1, "reduction": "add"}, opset=18, dtype=np.float64),
                       (rng.standard_normal((2, 4)), rng.standard_normal((2, 3))), (np.zeros((1, 4)), np.zeros((1, 3))))):
        want = liftir.Explainer(m, "deeplift").attribute(xs, baselines=bs, target=1)
        ex = liftir.Explainer(m, "deeplift")
        ex.xp = subset_module()
        got = ex.attribute(xs, baselines=bs, target=1)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_revealcancel_conserves_through_booleans_and_where():
    rng = np.random.default_rng(10)
    u, v = rng.standard_normal((8, 5)), rng.standard_normal((8, 5))
    ex = liftir.Explainer(_boolean_graph(), "deeplift_revealcancel")
    _, delta = ex.attribute((u, v), baselines=(rng.standard_normal((1, 5)), rng.standard_normal((1, 5))), target=3,
                            return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-12

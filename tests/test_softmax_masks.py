"""The inner Softmax rule on masked scores (attention masks: -inf or finfo.min added).

Anchors: a float64 hand-written implementation of the rule's math on the unmasked
positions only (a masked position is one whose probability is 0 in both passes: the
softmax is flat in it), onnxruntime's forward for summation-to-delta on a graph.
"""
from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.errors import RuleError
from liftir.rule import difference
from liftir.rules.softmax import Softmax

F32_MIN = float(np.finfo(np.float32).min)


class _Node:
    name, opset = "attention_softmax", 17

    def __init__(self, op_type):
        self.op_type = op_type


class _Ctx:
    """What Softmax.backward reads: the actual and reference rows of its one input and of its
    output (the rule's own forward, as the interpreter's forward without onnxruntime)."""

    xp, mode = np, "deeplift"

    def __init__(self, x, x0, op_type="Softmax"):
        self.node, self._x, self._x0 = _Node(op_type), x, x0

    def attr(self, name, default=None):
        return default

    def x(self, index=0):
        return self._x

    def x0(self, index=0):
        return self._x0

    def y(self, index=0):
        with np.errstate(invalid="ignore", divide="ignore"):
            return Softmax().forward(self, self._x)

    def y0(self, index=0):
        with np.errstate(invalid="ignore", divide="ignore"):
            return Softmax().forward(self, self._x0)


def _hand_multipliers(x, x0, log=False):
    """M[i, j] = r_i (delta_ij - w_j) for one row, float64: the rule's math written out
    (exp-Rescale r, trapezoid weights p' plus the correction of least chi-square norm,
    p' dx lambda)."""
    x, x0 = np.asarray(x, np.float64), np.asarray(x0, np.float64)
    lse, lse0 = (v.max() + np.log(np.exp(v - v.max()).sum()) for v in (x, x0))
    p, p0 = np.exp(x - lse), np.exp(x0 - lse0)
    dx = x - x0
    mid = (p + p0) / 2
    w = mid + (lse - lse0 - mid @ dx) * mid * dx / (mid @ (dx * dx))
    dz = dx - (lse - lse0)
    r = np.ones_like(p) if log else (p - p0) / dz
    return r[:, None] * (np.eye(len(x)) - w[None, :])


def _rule_multipliers(x, x0, op_type="Softmax"):
    """The rule's M for each row: output multipliers e_i, one target per output position."""
    x, x0 = np.asarray(x), np.asarray(x0)
    n = x.shape[-1]
    g = np.ascontiguousarray(np.broadcast_to(np.eye(n, dtype=x.dtype)[:, None, :], (n,) + x.shape))
    (m,) = Softmax().backward(_Ctx(x, x0, op_type), g)  # m[i, row, j] = M_row[i, j]
    return np.moveaxis(m, 0, 1)  # (rows, i, j)


SCORES = np.array([[0.7, -1.3, 0.2, 1.9, -0.4, 0.5], [1.1, 0.3, -0.8, 0.0, 2.2, -1.5]])
SCORES0 = np.array([[0.1, 0.4, -0.2, 0.6, 0.3, -0.1], [-0.5, 0.9, 0.2, -0.3, 0.7, 0.4]])
LIVE = np.array([[1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 0, 0]], bool)


@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("mask_value", [-np.inf, F32_MIN])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_masked_positions_get_no_multiplier_and_the_rest_is_the_unmasked_rule(op_type, mask_value, dtype):
    mask = np.where(LIVE, 0.0, mask_value)
    x, x0 = (SCORES + mask).astype(dtype), (SCORES0 + mask).astype(dtype)
    got = _rule_multipliers(x, x0, op_type)
    assert np.isfinite(got).all()
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for row in range(len(x)):
        live = LIVE[row]
        want = _hand_multipliers(SCORES[row, live], SCORES0[row, live], log=op_type == "LogSoftmax")
        block = got[row][np.ix_(live, live)]
        assert np.abs(block - want).max() <= tol * np.abs(want).max()
        assert not got[row][:, ~live].any() and not got[row][~live].any()  # masked: exactly 0
        # summation-to-delta on every live output: sum_j M_ij dx_j = dy_i
        z = SCORES[row, live] - np.log(np.exp(SCORES[row, live]).sum())
        z0 = SCORES0[row, live] - np.log(np.exp(SCORES0[row, live]).sum())
        dy = (z - z0) if op_type == "LogSoftmax" else np.exp(z) - np.exp(z0)
        assert np.abs(block.astype(np.float64) @ (SCORES[row, live] - SCORES0[row, live]) - dy).max() <= tol


def test_an_all_masked_row_gives_zeros_not_nan():
    x = np.array([[-np.inf] * 4, [0.3, -np.inf, 1.0, 0.2]])
    x0 = np.array([[-np.inf] * 4, [0.1, -np.inf, 0.5, 0.9]])
    got = _rule_multipliers(x, x0)
    assert np.isfinite(got).all() and not got[0].any()


@pytest.mark.parametrize("mask_value", [-np.inf, F32_MIN])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_mask_that_differs_between_the_passes_is_refused_by_node_name(mask_value, dtype):
    x = np.array([[0.3, mask_value, 1.0]], dtype)
    x0 = np.array([[0.1, 0.4, 0.5]], dtype)
    with pytest.raises(RuleError, match="attention_softmax.*attention mask that differs"):
        _rule_multipliers(x, x0)


def test_large_unmasked_steps_are_not_mistaken_for_masks():
    """Steps of 50 keep the rule; so does a uniform shift of 1e5 (dLSE is as large: the
    softmax does not change, and the multipliers carry no difference)."""
    x0 = np.array([[0.1, 0.4, 0.5, -0.2]])
    x = x0 + np.array([[50.0, -50.0, 3.0, 0.0]])
    want = _hand_multipliers(x[0], x0[0])
    assert np.isfinite(want).all()
    assert np.abs(_rule_multipliers(x, x0)[0] - want).max() <= 1e-9 * np.abs(want).max()
    shifted = _rule_multipliers(x0 + 1e5, x0)
    assert np.isfinite(shifted).all() and np.abs(shifted[0] @ np.full(4, 1e5)).max() <= 1e-9


def test_small_steps_keep_float32_accuracy():
    """Scores moved by a few 1e-3: the quotient (p - p0) / (z - z0) of rounded float32
    values is eps / |dz| ~ 1e-4 off there, just beyond where the derivative would serve;
    the rule's exp Rescale, written from dz = dx - dLSE, has no cancellation: within 2e-5
    of the float64 hand formula, as everywhere else."""
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((8, 12)).astype(np.float32)
    step = rng.uniform(1.5e-3, 3e-3, x0.shape) * rng.choice([-1, 1], x0.shape)
    x = (x0 + step).astype(np.float32)
    got = _rule_multipliers(x, x0)
    for row in range(len(x)):
        want = _hand_multipliers(x[row].astype(np.float64), x0[row].astype(np.float64))
        assert np.abs(got[row] - want).max() <= 2e-5 * np.abs(want).max()


def test_positions_far_below_the_row_maximum_take_no_part_in_float32_or_float64():
    """Swin's shifted windows add -100 to some scores: there p ~ e^-104, which float32
    rounds to 0 (so the rule sees a masked position) and float64 does not. The softmax is
    flat there either way, and the LSE correction is weighted by p, so the multipliers
    agree: the float32 contributions m dx equal the float64 ones to float32 rounding, and
    the float64 multipliers at those positions are of the order of p. (The Euclidean
    least-norm correction along dx gave them a share of the row's correction by dx alone:
    4% of the largest contribution in float64, none in float32.)"""
    rng = np.random.default_rng(11)
    scores = rng.standard_normal((6, 10)) * 2
    scores0 = rng.standard_normal((6, 10)) * 0.5
    far = np.zeros((6, 10), bool)
    far[:, 5:] = True
    x, x0 = scores - 104.0 * far, scores0 - 104.0 * far
    m64 = _rule_multipliers(x, x0)
    m32 = _rule_multipliers(x.astype(np.float32), x0.astype(np.float32))
    dx = x - x0
    c64, c32 = m64 * dx[:, None, :], m32.astype(np.float64) * dx[:, None, :]
    assert np.abs(c32 - c64).max() <= 2e-6 * np.abs(c64).max()
    assert np.abs(m64[np.broadcast_to(far[:, None, :], m64.shape)]).max() <= 1e-40
    softmax = lambda v: np.exp(v - v.max(-1, keepdims=True)) / np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True)
    change = softmax(x) - softmax(x0)  # summation-to-delta, output by output
    assert np.abs(c64.sum(-1) - change).max() <= 1e-12
    assert np.abs(c32.sum(-1) - change).max() <= 1e-6


def test_subnormal_probabilities_on_the_masked_path_change_nothing_visible():
    """Scores 95 below the row's maximum give float32 probabilities ~e^-95, subnormal; with
    a position masked (-inf) in the row the rule takes its masked path, which flushes such
    weights to 0 (a product of a subnormal is ~13x slower on x86). The float32 contributions
    still equal the float64 rule's to float32 rounding, conserve output by output, and the
    flushed positions get no multiplier."""
    rng = np.random.default_rng(12)
    scores = rng.standard_normal((6, 10)) * 2
    scores0 = rng.standard_normal((6, 10)) * 0.5
    far = np.zeros((6, 10), bool)
    far[:, 4:8] = True
    x, x0 = scores - 95.0 * far, scores0 - 95.0 * far
    x[:, 9] = x0[:, 9] = -np.inf  # masked in both passes: the masked path
    p32 = np.exp((x - x.max(-1, keepdims=True)).astype(np.float32))
    assert ((p32[far] > 0) & (p32[far] < np.finfo(np.float32).tiny)).all()  # subnormal, not 0
    m64 = _rule_multipliers(x, x0)
    m32 = _rule_multipliers(x.astype(np.float32), x0.astype(np.float32))
    live = np.isfinite(x)
    dx = np.where(live, x - x0, 0.0)
    c64, c32 = m64 * dx[:, None, :], m32.astype(np.float64) * dx[:, None, :]
    assert np.isfinite(c32).all() and np.abs(c32 - c64).max() <= 2e-6 * np.abs(c64).max()
    assert not m32[np.broadcast_to(far[:, None, :], m32.shape)].any()
    softmax = lambda v: np.exp(v - v.max(-1, keepdims=True)) / np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True)
    change = softmax(x) - softmax(x0)
    assert np.abs(c32.sum(-1) - change).max() <= 1e-6


@pytest.mark.parametrize("dtype, far", [(np.float32, 120.0), (np.float64, 800.0)])
def test_log_softmax_scores_far_below_the_maximum_keep_their_own_change(dtype, far):
    """A LogSoftmax score so far below its row's maximum that p rounds to 0 in both passes
    (e^-124 in float32, e^-804 in float64) is not masked: its output z = x - LSE still moves
    by dx - dLSE. Every output's contributions add up to its change as the forward computed
    it, that one's included (before 2026-12-05 its multipliers were 0)."""
    x = np.array([[0.7, -1.3, 0.2 - far, 1.9], [0.3, 2.0, -far, -0.5]], dtype)
    x0 = np.array([[0.1, 0.4, -0.2 - far, 0.6], [0.3, -0.4, -far, 0.8]], dtype)
    ctx = _Ctx(x, x0, "LogSoftmax")
    assert not np.exp(ctx.y())[:, 2].any() and not np.exp(ctx.y0())[:, 2].any()  # p = p0 = 0 there
    got = _rule_multipliers(x, x0, "LogSoftmax").astype(np.float64)
    dz = ctx.y().astype(np.float64) - ctx.y0().astype(np.float64)
    sums = np.einsum("rij,rj->ri", got, (x - x0).astype(np.float64))
    eps = np.finfo(dtype).eps
    assert np.abs(sums - dz).max() <= 8 * eps * np.abs(ctx.y()).max()
    assert np.abs(dz[:, 2]).min() > 0.1  # the far outputs did move, and their contributions say so


def test_difference_of_equal_infinities_is_zero():
    a = np.array([-np.inf, np.inf, 2.0, -np.inf, F32_MIN], np.float32)
    b = np.array([-np.inf, np.inf, 0.5, 1.0, F32_MIN], np.float32)
    np.testing.assert_array_equal(difference(np, a, b), [0, 0, 1.5, -np.inf, 0])


def _masked_attention_graph(mask_value):
    """x (N, 4, 6) -> scores + a constant causal-and-padding mask -> softmax -> @ v -> head."""
    rng = np.random.default_rng(0)
    live = np.tril(np.ones((4, 6), bool), k=2)
    live[:, 5] = False  # a padded key
    mask = np.where(live, 0.0, mask_value).astype(np.float32)
    inits = [numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), "wv"),
             numpy_helper.from_array(rng.standard_normal((24, 3)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([-1, 24], np.int64), "flat")]
    nodes = [helper.make_node("Add", ["x", "mask"], ["s"]),
             helper.make_node("Softmax", ["s"], ["a"], axis=-1),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Mul", ["a", "v"], ["av"]),
             helper.make_node("Reshape", ["av", "flat"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["y"])]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _assert_conserves_against_onnxruntime(model, seed):
    """DeepLIFT's contributions add up to onnxruntime's f(x) - f(x0), finite, in float32
    (1e-4) and float64 (1e-9), for inputs and a reference drawn from `seed`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    x0 = 0.2 * rng.standard_normal((1, 4, 6)).astype(np.float32)
    sess = onnxruntime.InferenceSession(model.SerializeToString())
    diff = sess.run(None, {"x": x})[0][:, 1] - sess.run(None, {"x": x0})[0][0, 1]
    attr, delta = liftir.Explainer(model).attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    assert np.isfinite(attr).all()
    assert np.abs(attr.reshape(3, -1).sum(1) - diff).max() <= 1e-4 * np.abs(diff).max()
    attr64, delta64 = liftir.Explainer(model, precision="float64").attribute(
        x.astype(np.float64), baselines=x0.astype(np.float64), target=1, return_convergence_delta=True)
    assert np.isfinite(attr64).all() and np.abs(delta64).max() <= 1e-9 * np.abs(diff).max()


@pytest.mark.parametrize("mask_value", [-np.inf, F32_MIN])
def test_deeplift_conserves_through_a_masked_softmax_against_onnxruntime(mask_value):
    _assert_conserves_against_onnxruntime(_masked_attention_graph(mask_value), seed=1)


def _decomposed_softmax_graph(mask_value):
    """softmax written out, as custom attention code exports it: exp(s - max s) / sum, with
    the mask added first; -inf (or finfo.min) then flows through ReduceMax, Sub and Exp."""
    rng = np.random.default_rng(2)
    live = np.tril(np.ones((4, 6), bool), k=2)
    live[:, 5] = False
    inits = [numpy_helper.from_array(np.where(live, 0.0, mask_value).astype(np.float32), "mask"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(rng.standard_normal((24, 3)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([-1, 24], np.int64), "flat")]
    nodes = [helper.make_node("Add", ["x", "mask"], ["s"]),
             helper.make_node("ReduceMax", ["s", "last"], ["top"], keepdims=1),
             helper.make_node("Sub", ["s", "top"], ["shifted"]),
             helper.make_node("Exp", ["shifted"], ["e"]),
             helper.make_node("ReduceSum", ["e", "last"], ["total"], keepdims=1),
             helper.make_node("Div", ["e", "total"], ["a"]),
             helper.make_node("Mul", ["a", "x"], ["ax"]),
             helper.make_node("Reshape", ["ax", "flat"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["y"])]
    graph = helper.make_graph(nodes, "decomposed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("mask_value", [-np.inf, F32_MIN])
def test_deeplift_conserves_through_a_written_out_masked_softmax(mask_value):
    """Rescale (Exp), the max rule and Div see -inf in both passes: dx = 0 there, not NaN."""
    _assert_conserves_against_onnxruntime(_decomposed_softmax_graph(mask_value), seed=3)


def test_rescale_of_an_input_at_minus_inf_in_both_passes_is_finite():
    """Exp, Sigmoid, Tanh at x = x0 = -inf (or finfo.min): the multiplier is the slope there,
    0, never NaN; elsewhere the divided difference (float64 by hand)."""
    from liftir.registry import lookup
    x = np.array([[-np.inf, 0.3, F32_MIN, -2.0]])
    x0 = np.array([[-np.inf, -0.4, F32_MIN, 1.0]])
    for op, f in (("Exp", np.exp), ("Sigmoid", lambda v: 1 / (1 + np.exp(-v))), ("Tanh", np.tanh)):
        with np.errstate(over="ignore"):
            m = lookup(op).divided_difference(np, x, x0, _Ctx(x, x0))
        assert np.isfinite(m).all(), op
        live = [1, 3]
        want = (f(x[0, live]) - f(x0[0, live])) / (x[0, live] - x0[0, live])
        np.testing.assert_allclose(m[0, live], want, rtol=1e-12)
        assert not m[0, [0, 2]].any()  # each slope vanishes at -inf (and at finfo.min)


def test_masked_softmax_on_the_cupy_side_code_path():
    """The same masked graph through a stand-in array module with CuPy's functions only
    (tests/test_array_api_subset.py): equal to NumPy's result, no NumPy-only call."""
    from test_array_api_subset import subset_module
    model = _masked_attention_graph(-np.inf)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    x0 = 0.2 * rng.standard_normal((1, 4, 6)).astype(np.float32)
    want = liftir.Explainer(model).attribute(x, baselines=x0, target=0)
    ex = liftir.Explainer(model)
    ex.xp = subset_module()
    got, delta = ex.attribute(x, baselines=x0, target=0, return_convergence_delta=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.abs(delta).max() <= 1e-5


# ---- masks that differ between the actual and the reference pass ---------------------------

def _switched_mask_graph(mask_value, source, downstream="softmax"):
    """x (N, 4, 6) plus a mask over the 6 keys, then the written-out softmax of
    `_decomposed_softmax_graph`. The mask differs between the passes, as it does when it is
    computed from the inputs: `source` "ids" (Where(ids == PAD, mask_value, 0), ids an
    integer input whose reference is all PAD in part), "x" (Where(x[:, 0] < -0.5, ...), from
    the float input itself) or "input" (an additive float mask input, reference zeros).
    `downstream` "relu": the masked scores only pass Relu(s - 5), flat at both -inf and the
    reference's score, and times x: a mask change nothing downstream reads."""
    rng = np.random.default_rng(2)
    inits = {"last": np.array([-1], np.int64), "ax1": np.array([1], np.int64), "neg": np.array(mask_value, np.float32),
             "zero": np.array(0.0, np.float32), "pad": np.array(0, np.int64), "thr": np.array(-0.5, np.float32),
             "row": np.array(0, np.int64), "five": np.array(5.0, np.float32),
             "head": rng.standard_normal((24, 3)).astype(np.float32), "flat": np.array([-1, 24], np.int64)}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])]
    if source == "ids":
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6]))
        nodes = [helper.make_node("Equal", ["ids", "pad"], ["c"], name="is_pad")]
    elif source == "x":
        nodes = [helper.make_node("Gather", ["x", "row"], ["first"], axis=1, name="first_row"),
                 helper.make_node("Less", ["first", "thr"], ["c"], name="below")]
    if source == "input":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, 6]))
        nodes = []
    else:
        nodes += [helper.make_node("Where", ["c", "neg", "zero"], ["m2"], name="mask_where"),
                  helper.make_node("Unsqueeze", ["m2", "ax1"], ["mask"], name="mask_unsqueeze")]
    nodes.append(helper.make_node("Add", ["x", "mask"], ["s"], name="add_mask"))
    if downstream == "softmax":
        nodes += [helper.make_node("ReduceMax", ["s", "last"], ["top"], keepdims=1, name="top"),
                  helper.make_node("Sub", ["s", "top"], ["shifted"], name="shift"),
                  helper.make_node("Exp", ["shifted"], ["e"], name="softmax_exp"),
                  helper.make_node("ReduceSum", ["e", "last"], ["total"], keepdims=1, name="total"),
                  helper.make_node("Div", ["e", "total"], ["a"], name="normalize")]
    else:
        nodes += [helper.make_node("Sub", ["s", "five"], ["low"], name="low"),
                  helper.make_node("Relu", ["low"], ["a"], name="flat_relu")]
    nodes += [helper.make_node("Mul", ["a", "x"], ["ax"], name="weigh"),
              helper.make_node("Reshape", ["ax", "flat"], ["h"], name="flatten"),
              helper.make_node("MatMul", ["h", "head"], ["y"], name="head_matmul")]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "switched", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items() if k in used])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _switched_feeds(source, mask_value):
    """Inputs and references whose masks differ: in sample 0 keys 4, 5 are masked for the
    input only, keys 2, 3 for the reference only (sample 2 masks nothing, its reference 2..5)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    x0 = 0.2 * rng.standard_normal((1, 4, 6)).astype(np.float32)
    if source == "ids":
        ids = np.array([[5, 3, 2, 7, 0, 0], [1, 2, 3, 4, 5, 0], [4, 4, 4, 4, 4, 4]])
        return {"x": x, "ids": ids}, {"x": x0, "ids": np.array([[5, 3, 0, 0, 0, 0]])}
    if source == "x":
        x[:, 0, :] = np.where(np.arange(6) >= 4, -1.5, 0.5)  # keys 4, 5 below -0.5 for the input
        x0[:, 0, :] = np.where((np.arange(6) >= 2) & (np.arange(6) < 4), -1.5, 0.5)
        x0[0, 0, 1] = 2.5  # the reference's largest score is a key the input masks: the max rule's jump
        return {"x": x}, {"x": x0}
    mask = np.zeros((3, 1, 6), np.float32)
    mask[:, :, 4:] = mask_value
    return {"x": x, "mask": mask}, {"x": x0, "mask": np.zeros((1, 1, 6), np.float32)}


def _ort_difference(model, feeds, refs):
    sess = onnxruntime.InferenceSession(model.SerializeToString())
    refs = {k: np.broadcast_to(v, (3,) + v.shape[1:]) for k, v in refs.items()}
    return sess.run(None, feeds)[0][:, 1] - sess.run(None, refs)[0][:, 1]


def _as(feeds, dtype):
    return {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}


@pytest.mark.parametrize("source", ["ids", "x", "input"])
def test_written_out_softmax_conserves_a_finite_mask_that_differs_between_the_passes(source):
    """finfo.min is just a big number: a key masked in one pass only moves its score by
    ~3.4e38, Exp's Rescale multiplier is dy/dx ~ 1e-38 and the pieces of the written-out
    softmax keep apart what the fused rule's LSE split would cancel. DeepLIFT conserves
    against onnxruntime's f(x) - f(x0): 1e-5 in float32, 1e-9 (delta) in float64."""
    model = _switched_mask_graph(F32_MIN, source)
    feeds, refs = _switched_feeds(source, F32_MIN)
    diff = _ort_difference(model, feeds, refs)
    assert np.abs(diff).min() > 1e-3
    attr, delta = liftir.Explainer(model).attribute(feeds, baselines=refs, target=1, return_convergence_delta=True)
    assert all(np.isfinite(a).all() for a in attr.values())
    total = sum(a.reshape(3, -1).astype(np.float64).sum(1) for a in attr.values())
    assert np.abs(total - diff).max() <= 1e-5 * np.abs(diff).max()
    attr64, delta64 = liftir.Explainer(model, precision="float64").attribute(
        _as(feeds, np.float64), baselines=_as(refs, np.float64), target=1, return_convergence_delta=True)
    assert all(np.isfinite(a).all() for a in attr64.values())
    assert np.abs(delta64).max() <= 1e-9 * np.abs(diff).max()
    total64 = sum(a.reshape(3, -1).sum(1) for a in attr64.values())
    assert np.abs(total64 - diff).max() <= 1e-5 * np.abs(diff).max()  # onnxruntime computes in float32


@pytest.mark.parametrize("source", ["ids", "x"])
@pytest.mark.parametrize("precision", ["model", "float64"])
def test_written_out_softmax_refuses_a_minus_inf_mask_that_differs_between_the_passes(source, precision):
    """-inf in one pass only: Exp's input changes by an infinite amount and its output by a
    finite one, which no multiplier carries (m = 0, and 0 * inf was a silent NaN): the Exp
    node is named, with the reason."""
    model = _switched_mask_graph(-np.inf, source)
    feeds, refs = _switched_feeds(source, -np.inf)
    dtype = np.float64 if precision == "float64" else np.float32
    ex = liftir.Explainer(model, precision=precision)
    with pytest.raises(RuleError, match="Exp node 'softmax_exp'.*infinite.*No finite multiplier"):
        ex.attribute(_as(feeds, dtype), baselines=_as(refs, dtype), target=1)
    # the same model with the reference's own mask conserves (held ids left out; x masks alike)
    same = {k: v for k, v in refs.items() if k != "ids"}
    if source == "x":  # the reference keeps the input's first row, which the mask is computed from
        same = {"x": feeds["x"] * np.array([1.0, 0.3, 0.3, 0.3], np.float32)[:, None]}
    diff = _ort_difference(model, feeds, {"x": same["x"], **({"ids": feeds["ids"]} if source == "ids" else {})})
    attr, delta = ex.attribute(_as(feeds, dtype), baselines=_as(same, dtype), target=1, return_convergence_delta=True)
    assert all(np.isfinite(a).all() for a in (attr.values() if isinstance(attr, dict) else [attr]))
    assert np.abs(delta).max() <= (1e-9 if precision == "float64" else 1e-5) * np.abs(diff).max()


@pytest.mark.parametrize("source", ["ids", "x"])
def test_a_minus_inf_mask_change_nothing_reads_gives_zeros_not_nan(source):
    """Where the mask's -inf meets only a flat Relu (0 at -inf and at the reference's score),
    the change is read by nothing: the mask's tensor (from ids) and the Where's condition
    (from x) carry 0, not 0 * inf = NaN, and DeepLIFT conserves."""
    model = _switched_mask_graph(-np.inf, source, downstream="relu")
    feeds, refs = _switched_feeds(source, -np.inf)
    diff = _ort_difference(model, feeds, refs)
    ex = liftir.Explainer(model, precision="float64")
    attr, delta = ex.attribute(_as(feeds, np.float64), baselines=_as(refs, np.float64), target=1,
                               return_convergence_delta=True)
    values = list(attr.values()) if isinstance(attr, dict) else [attr]
    assert all(np.isfinite(a).all() for a in values)
    assert np.abs(delta).max() <= 1e-9 * max(1.0, np.abs(diff).max())
    assert np.abs(sum(a.reshape(3, -1).sum(1) for a in values) - diff).max() <= 1e-5 * max(1.0, np.abs(diff).max())


def test_the_compiled_engine_warns_where_the_interpreter_refuses():
    """A compiled pass is recorded without values, so it cannot refuse: it carries the
    infinite change as 0 (finite attributions, never NaN) and the ConvergenceWarning quotes
    the interpreter's refusal of the Exp node."""
    from liftir.diagnostics import ConvergenceWarning
    model = _switched_mask_graph(-np.inf, "x")
    feeds, refs = _switched_feeds("x", -np.inf)
    ex = liftir.Explainer(model, engine="compiled")
    with pytest.warns(ConvergenceWarning, match="softmax_exp.*infinite in one pass"):
        attr, delta = ex.attribute(feeds, baselines=refs, target=1, return_convergence_delta=True)
    assert ex._compiled.passes and all(p is not None for p in ex._compiled.passes.values())  # it did compile
    assert np.isfinite(attr["x"]).all() and np.isfinite(delta).all()

"""ONNX function expansion (liftir/functions.py): ops with a function body in `onnx.defs`
and no rule of their own are inlined when the graph is read.

Registry-driven: every standard op whose schema in the installed onnx has a function body
is either built here as a one-node model (`SPECS`) or listed in `NO_SPEC` with the reason.
Each built op is expanded even where liftir has a dedicated rule (so the bodies of Gelu,
HardSwish, Mish, ... are exercised too): the forward after expansion must equal
onnxruntime on the original model, and DeepLIFT must conserve. Where a body uses an op
liftir has no rule for, the node must stay whole and be reported under its own name.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.defs
import pytest
from onnx.reference import ReferenceEvaluator

import liftir
from liftir.errors import UnsupportedOpError
from liftir.functions import expand_functions, function_body
from liftir.registry import lookup
from onnx_builders import op_model, run_ort, value_info

RNG = np.random.default_rng(9)
X = (3, 4, 6)  # an (N, C, L) activation


def c(*values, dtype=np.float32):
    return np.array(values, dtype)


def positive(*shape):
    return RNG.uniform(0.5, 1.5, shape).astype(np.float32)


# op -> (inputs as for onnx_builders.op_model, attributes, opset[, output shape where ONNX's
# shape inference cannot tell it])
SPECS = {
    "Celu": ([X], {"alpha": 0.7}, 12),
    "Clip": ([X, c(-0.5), c(0.8)], {}, 13),
    "Elu": ([X], {"alpha": 0.9}, 18),
    "Gelu": ([X], {}, 20),
    "Gelu_tanh": ([X], {"approximate": "tanh"}, 20),
    "HardSigmoid": ([X], {"alpha": 0.3, "beta": 0.4}, 18),
    "HardSwish": ([X], {}, 14),
    "LeakyRelu": ([X], {"alpha": 0.2}, 16),
    "Mish": ([X], {}, 18),
    "PRelu": ([X, positive(4, 1) * 0.3], {}, 16),
    "Relu": ([X], {}, 18),
    "Selu": ([X], {}, 18),
    "Softplus": ([X], {}, 18),
    "Softsign": ([X], {}, 18),
    "ThresholdedRelu": ([X], {"alpha": 0.3}, 18),
    "Shrink": ([X], {"lambd": 0.3, "bias": 0.1}, 18),
    "Swish": ([X], {"alpha": 1.5}, 24),
    "Softmax": ([X], {"axis": -1}, 18),
    "LogSoftmax": ([X], {"axis": 1}, 18),
    "ReduceL1": ([X, c(2, dtype=np.int64)], {"keepdims": 1}, 18),
    "ReduceL2": ([X, c(1, 2, dtype=np.int64)], {"keepdims": 0}, 18),
    "ReduceLogSum": ([X, c(2, dtype=np.int64)], {}, 18),  # inputs made positive below
    "ReduceLogSumExp": ([X, c(2, dtype=np.int64)], {}, 18),
    "ReduceSumSquare": ([X, c(1, dtype=np.int64)], {}, 18),
    "MeanVarianceNormalization": ([X], {"axes": [2]}, 13),
    # the body flattens to 2-D: with the batch axis alone in front, rows stay samples
    "LayerNormalization": ([(3, 6), positive(6), c(*RNG.standard_normal(6))], {"axis": -1}, 17),
    "LayerNormalization_axis1": ([X, positive(4, 6), None], {"axis": 1, "epsilon": 1e-3}, 18),
    "GroupNormalization": ([(3, 4, 5), positive(4), c(*RNG.standard_normal(4))], {"num_groups": 2}, 21,
                           (3, 4, 5)),
    "RMSNormalization": ([X, positive(6)], {"axis": -1}, 23),
    "CastLike": ([X, c(0.0)], {}, 21),
    "DepthToSpace": ([(3, 8, 2, 3)], {"blocksize": 2}, 28),
    "SpaceToDepth": ([(3, 2, 4, 6)], {"blocksize": 2}, 28),
    "SwiGLU": ([(3, 4, 6), (3, 4, 6)], {"alpha": 1.2}, 28, (3, 4, 6)),
    "CenterCropPad": ([(3, 4, 6), c(3, 8, dtype=np.int64)], {"axes": [1, 2]}, 18),
    "AffineGrid": ([(3, 2, 3), c(3, 1, 4, 5, dtype=np.int64)], {}, 20),
    # scaled dot-product attention, Q K V of (N, heads, L, d); causal; an additive -inf mask
    # with a padded key and a fully masked query row (the body's Where(RowAllMasked, 0, softmax))
    "Attention": ([(3, 2, 4, 5), (3, 2, 4, 5), (3, 2, 4, 5)], {}, 23, (3, 2, 4, 5)),
    "Attention_causal": ([(3, 2, 4, 5), (3, 2, 4, 5), (3, 2, 4, 5)], {"is_causal": 1}, 23, (3, 2, 4, 5)),
    "Attention_mask": ([(3, 2, 4, 5), (3, 2, 4, 5), (3, 2, 4, 5),
                        np.where([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], 0, -np.inf)
                        .astype(np.float32)], {}, 23, (3, 2, 4, 5)),
}
NO_SPEC = {
    "Bernoulli": "random: no attribution",
    "BlackmanWindow": "a constant window from an integer size: nothing to attribute",
    "HammingWindow": "a constant window from an integer size: nothing to attribute",
    "HannWindow": "a constant window from an integer size: nothing to attribute",
    "Range": "integer arithmetic on scalars",
    "DynamicQuantizeLinear": "integer output",
    "GreaterOrEqual": "boolean output",
    "LessOrEqual": "boolean output",
    "NegativeLogLikelihoodLoss": "a training loss over integer labels",
    "SoftmaxCrossEntropyLoss": "a training loss over integer labels",
    "SequenceMap": "sequence types",
    "RotaryEmbedding": "its position ids or 3-D caches carry the batch size: no variable batch",
    "CausalConvWithState": "stateful streaming op (opset 27), not run by onnxruntime",
    "LinearAttention": "stateful streaming op (opset 27), not run by onnxruntime",
}


def _function_ops():
    ops = set()
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain in ("", "ai.onnx") and (schema.has_function or schema.has_context_dependent_function):
            ops.add(schema.name)
    return ops


def test_every_op_with_a_function_body_is_tested_or_explained():
    specified = {name.split("_")[0] for name in SPECS}
    assert _function_ops() - specified - set(NO_SPEC) == set()


def _case(name):
    inputs, attrs, opset, *out_shape = SPECS[name]
    m = op_model(name.split("_")[0], inputs, attrs, opset=opset) if not out_shape else None
    if m is None:  # op_model's checker needs the output shape: give it
        m = op_model(name.split("_")[0], inputs, attrs, opset=opset, check=False)
        m.graph.output[0].CopyFrom(value_info("y0", out_shape[0]))
        onnx.checker.check_model(m)
    return m


def _expanded(m, op):
    """A copy of `m` with `op` expanded even if liftir has a rule for it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(onnx.shape_inference.infer_shapes(m))
    n = expand_functions(copy, lambda o, d, v: o != op and lookup(o, d, v) is not None)
    return copy, n


def _feeds(m, name):
    feeds = {}
    for vi in m.graph.input:
        shape = tuple(d.dim_value or 3 for d in vi.type.tensor_type.shape.dim)
        x = RNG.standard_normal(shape).astype(np.float32)
        feeds[vi.name] = abs(x) + 0.1 if name == "ReduceLogSum" else x
    return feeds


def _reference(m, feeds):
    try:
        return run_ort(m, feeds)[0]
    except Exception:  # an opset onnxruntime does not run yet: ONNX's own evaluator
        return ReferenceEvaluator(m).run(None, feeds)[0]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_expanded_body_runs_like_onnxruntime_and_conserves(name):
    op = name.split("_")[0]
    m = _case(name)
    expanded, n = _expanded(m, op)
    feeds = _feeds(m, name)
    body_ops = {node.op_type for node in expanded.graph.node}
    if n == 0:
        # refused: the body must need an op liftir has no rule for
        assert op in body_ops
        node = m.graph.node[0]
        types = {vi.name: vi.type for vi in m.graph.input}
        types.update({i.name: onnx.helper.make_tensor_type_proto(i.data_type, i.dims) for i in m.graph.initializer})
        body = function_body(node, m.opset_import[0].version, [types.get(t) for t in node.input])
        assert body is not None and any(lookup(b.op_type) is None for b in body.node
                                        if b.op_type not in ("Constant", "Shape", "Size")), op
        with pytest.raises(UnsupportedOpError, match=op):
            liftir.Explainer(expanded, rules={op: None}) if lookup(op) else liftir.Explainer(expanded)
        return
    assert op not in body_ops
    assert all(node.name.startswith(f"{op.lower()}_node (expanded {op})/") for node in expanded.graph.node)
    ex = liftir.Explainer(expanded, final_activation="keep")
    xs = tuple(feeds.values())
    x = xs if len(xs) > 1 else xs[0]
    np.testing.assert_allclose(ex.predict(x), _reference(m, feeds), rtol=1e-5, atol=1e-5)
    x0 = tuple(_feeds(m, name).values())
    x0 = x0 if len(x0) > 1 else x0[0]
    y = ex.predict(x)
    target = (0,) * (y.ndim - 1) if y.ndim > 1 else None
    _, delta = ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
    scale = max(1.0, float(np.abs(y).max()))
    assert np.abs(delta).max() <= 1e-5 * scale, delta


def test_dedicated_rules_win_and_rule_less_ops_expand_by_default():
    """MeanVarianceNormalization has no liftir rule: the Explainer expands it. A rule given to
    the Explainer (or registered) serves it whole instead; the caller's model is untouched."""
    m = _case("MeanVarianceNormalization")
    before = m.SerializeToString()
    ex = liftir.Explainer(m)
    assert "MeanVarianceNormalization" not in {n.op_type for n in ex.graph.nodes.values()}
    assert any(name.startswith("meanvariancenormalization_node (expanded MeanVarianceNormalization)/")
               for name in ex.graph.nodes)
    assert m.SerializeToString() == before

    class Whole(liftir.rule.Rule):
        """Stands in for a user's rule: only its binding is checked."""

    kept = liftir.Explainer(m, rules={"MeanVarianceNormalization": Whole})
    assert [n.op_type for n in kept.graph.nodes.values()] == ["MeanVarianceNormalization"]
    assert isinstance(kept.plan.rules["meanvariancenormalization_node"], Whole)

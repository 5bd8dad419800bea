"""Shapes the rules cannot serve get a clear liftir error naming the node, not a raw NumPy
error from deep inside a kernel; and the Explainer stays usable afterwards. Where the op
can be served correctly instead (Expand with the export's batch size baked in, when the
call's batch matches), it is, checked against onnxruntime and summation-to-delta.
"""
from __future__ import annotations

import numpy as np
import pytest

import liftir
from liftir.errors import InputError, LiftirError, ModelLoadError, RuleError
from onnx_builders import helper, model, op_model, rules_only, run_ort

RNG = np.random.default_rng(0)


POOLS = [("MaxPool", {"kernel_shape": [5, 5]}), ("AveragePool", {"kernel_shape": [4, 4]}),
         ("MaxPool", {"kernel_shape": [2, 2], "dilations": [3, 3]})]


def _pool_model(op, attrs, spatial=(3, 3)):
    return model([helper.make_node(op, ["x"], ["y"], name="pool", **attrs)], {"x": (1, 1) + spatial}, ["y"],
                 output_shapes={"y": ("N", 1, 1, 1)}, opset=13, check=False)


@pytest.mark.parametrize("op, attrs", POOLS)
def test_pooling_window_larger_than_its_declared_input_is_refused_at_build(op, attrs):
    with pytest.raises(ModelLoadError, match=r"node 'pool'.*larger than its input's spatial size \(3, 3\)"):
        liftir.Explainer(_pool_model(op, attrs))


@pytest.mark.parametrize("engine", ["default", "rules"])
@pytest.mark.parametrize("op, attrs", POOLS)
def test_pooling_window_larger_than_a_symbolic_input_is_refused_at_attribute(op, attrs, engine):
    ex = liftir.Explainer(_pool_model(op, attrs, spatial=("H", "W")))
    if engine == "rules":
        rules_only(ex)
    x = RNG.standard_normal((2, 1, 3, 3)).astype(np.float32)
    with pytest.raises(InputError, match=r"node 'pool'.*larger than its input's spatial size \(3, 3\)"):
        ex.attribute(x, target=(0, 0, 0))
    bigger = RNG.standard_normal((2, 1, 9, 9)).astype(np.float32)  # still usable
    attr, delta = ex.attribute(bigger, target=(0, 0, 0), return_convergence_delta=True)
    np.testing.assert_allclose(delta, 0, atol=1e-5)


@pytest.mark.parametrize("inputs, which", [
    ([(4,), np.ones((4, 3), np.float32)], "first operand is a 1-D activation"),
    ([np.ones((3, 4), np.float32), (4,)], "second operand is a 1-D activation"),
    ([(2, 4), (4, 3)], "second operand is a 2-D activation"),
])
def test_matmul_that_contracts_the_batch_axis(inputs, which, monkeypatch):
    m = op_model("MatMul", inputs, opset=13)
    with pytest.raises(RuleError, match=f"'matmul_node'.*{which}.*batch axis"):
        liftir.Explainer(m)  # at build: the declared ranks already tell
    # where the ranks are unknown until the call, the forward refuses it at attribute time
    monkeypatch.setattr(type(liftir.registry.lookup("MatMul")), "check_shapes", lambda *a: None)
    ex = rules_only(liftir.Explainer(m))
    feeds = [RNG.standard_normal((4,) + tuple(s[1:])).astype(np.float32)
             for s in inputs if not isinstance(s, np.ndarray)]
    with pytest.raises(InputError, match="MatMul node 'matmul_node': operands of shapes .* do not multiply"):
        ex.attribute(tuple(feeds) if len(feeds) > 1 else feeds[0], target=0)


def test_matmul_of_mismatched_operands_names_the_node():
    ex = liftir.Explainer(model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                                {"x": (1, 2, 4)}, ["y"], {"w": np.ones((3, 4, 2), np.float32)},
                                output_shapes={"y": ("N", 3, 2, 2)}, opset=13, check=False))
    x = RNG.standard_normal((5, 2, 4)).astype(np.float32)
    with pytest.raises(InputError, match="MatMul node 'mm': operands of shapes"):
        rules_only(ex).attribute(x, target=(0, 0))


def _expand_model(batch: int = 8):
    """x (N, 1) -> Expand to (batch, 4), the batch size traced into the shape -> * w."""
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"], name="expand"),
             helper.make_node("Mul", ["e", "w"], ["y"], name="scale")]
    return model(nodes, {"x": (1, 1)}, ["y"],
                 {"shape": np.array([batch, 4], np.int64), "w": np.arange(1, 5, dtype=np.float32)},
                 output_shapes={"y": ("N", 4)}, opset=13, check=False)


def test_expand_with_the_batch_size_baked_in_is_supported_when_the_batch_matches():
    m = _expand_model(8)
    x = RNG.standard_normal((8, 1)).astype(np.float32)
    x0 = RNG.standard_normal((1, 1)).astype(np.float32)
    (want,) = run_ort(m, {"x": x})
    for ex in (liftir.Explainer(m), rules_only(liftir.Explainer(m))):
        np.testing.assert_allclose(ex.predict(x), want, rtol=1e-6)
        attr, delta = ex.attribute(x, baselines=x0, target=2, return_convergence_delta=True)
        np.testing.assert_allclose(attr, 3 * (x - x0), rtol=1e-5)  # y_2 = 3 x: exact
        np.testing.assert_allclose(delta, 0, atol=1e-5)


def test_expand_with_a_baked_batch_size_that_does_not_match_names_the_node():
    ex = liftir.Explainer(_expand_model(8))
    with pytest.raises(InputError, match=r"Expand node 'expand' expands axis 0 to 8.*this call has 5"):
        ex.attribute(np.ones((5, 1), np.float32), target=2)
    attr = ex.attribute(np.ones((8, 1), np.float32), target=2)  # still usable
    np.testing.assert_allclose(attr, 3.0)


def test_expand_to_an_incompatible_shape_names_the_node():
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")]
    m = model(nodes, {"x": (1, 3)}, ["y"], {"shape": np.array([1, 4], np.int64)},
              output_shapes={"y": ("N", 4)}, opset=13, check=False)
    with pytest.raises(InputError, match=r"Expand node 'expand' cannot broadcast .*axis 1: 3 vs 4"):
        rules_only(liftir.Explainer(m)).attribute(np.ones((2, 3), np.float32), target=0)


def test_reduce_max_over_an_empty_axis():
    def reduce_max(shape):
        return model([helper.make_node("ReduceMax", ["x"], ["y"], name="rmax", axes=[1], keepdims=0)],
                     {"x": shape}, ["y"], output_shapes={"y": ("N", 3)}, opset=13, check=False)

    with pytest.raises(ModelLoadError, match=r"ReduceMax node 'rmax' takes the max over axis 1 .*empty"):
        liftir.Explainer(reduce_max((1, 0, 3)))  # declared: refused at build
    ex = rules_only(liftir.Explainer(reduce_max((1, "K", 3))))  # symbolic: refused at the call
    with pytest.raises(InputError, match=r"ReduceMax node 'rmax' takes the max over axis 1 .*empty"):
        ex.attribute(np.ones((2, 0, 3), np.float32), target=0)
    attr, delta = ex.attribute(RNG.standard_normal((2, 5, 3)).astype(np.float32), target=0,
                               return_convergence_delta=True)  # still usable
    np.testing.assert_allclose(delta, 0, atol=1e-5)


def test_every_error_here_is_a_liftir_error():
    assert issubclass(InputError, LiftirError) and issubclass(RuleError, LiftirError)

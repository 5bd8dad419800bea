"""Constant folding is bounded: a tiny model cannot make `Explainer(...)` or `liftir check`
run unbounded loops or allocate giant constants. Each is refused, naming the node, before
the work is done; ordinary folding (shape arithmetic, a big weight transposed) still runs.
"""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir import budget
from liftir.errors import FoldingLimitError
from liftir.cli import main
from liftir.errors import ModelLoadError


def _model(nodes, consts, out="y", out_shape=("N", 4), opset=17, check=True):
    """x (N, 4) + (folded constant c) -> y."""
    nodes = list(nodes) + [helper.make_node("Add", ["x", "c"], [out], name="add")]
    graph = helper.make_graph(
        nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if check:
        onnx.checker.check_model(m)
    return m


def loop_model(trips: int | None, cond_forever: bool = False) -> onnx.ModelProto:
    """A constant Loop adding 1 to a (4,) accumulator `trips` times (or while cond holds)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "one")])
    inputs = ["" if trips is None else "M", "cond", "acc0"]
    consts = {"cond": np.array(True), "acc0": np.zeros(4, np.float32)}
    if trips is not None:
        consts["M"] = np.array(trips, np.int64)
    return _model([helper.make_node("Loop", inputs, ["c"], body=body, name="bomb_loop")], consts)


def test_a_constant_loop_of_a_billion_iterations_is_refused_at_once():
    m = loop_model(10**9)
    assert len(m.SerializeToString()) < 1500  # the ~1 KB model of the issue
    start = time.monotonic()
    with pytest.raises(FoldingLimitError, match=r"'bomb_loop'.*Loop of 1e\+09 iterations"):
        liftir.Explainer(m)
    assert time.monotonic() - start < 20  # refused before running, not after a timeout


def test_liftir_check_refuses_the_loop_bomb(tmp_path, capsys):
    path = tmp_path / "bomb.onnx"
    onnx.save(loop_model(10**9), path)
    assert main(["check", str(path)]) == 2
    assert "bomb_loop" in capsys.readouterr().err


def test_a_loop_without_trip_count_is_stopped_by_the_iteration_budget(monkeypatch):
    monkeypatch.setitem(budget.LIMITS, "max_iterations", 500)
    with pytest.raises(FoldingLimitError, match="more than 500 Loop iterations"):
        liftir.Explainer(loop_model(None))


def test_a_loop_is_stopped_by_the_time_budget(monkeypatch):
    monkeypatch.setitem(budget.LIMITS, "seconds", 0.2)
    start = time.monotonic()
    with pytest.raises(FoldingLimitError, match="more than 0.2 s"):
        liftir.Explainer(loop_model(None))
    assert time.monotonic() - start < 30


def test_a_small_constant_loop_still_folds():
    ex = liftir.Explainer(loop_model(3))
    x = np.zeros((2, 4), np.float32)
    np.testing.assert_array_equal(ex.predict(x), np.full((2, 4), 3, np.float32))


def _i64(*v):
    return np.array(v, np.int64)


@pytest.mark.parametrize("nodes, consts", [
    ([helper.make_node("ConstantOfShape", ["s"], ["c"], name="bomb")], {"s": _i64(10**6, 10**6, 4)}),
    ([helper.make_node("Expand", ["v"], ["c"], name="bomb")] and
     [helper.make_node("Expand", ["v", "s"], ["c"], name="bomb")],
     {"v": np.ones(4, np.float32), "s": _i64(10**7, 10**6, 4)}),
    ([helper.make_node("Tile", ["v", "r"], ["c"], name="bomb")],
     {"v": np.ones((1, 4), np.float32), "r": _i64(10**12, 1)}),
    ([helper.make_node("Range", ["a", "b", "d"], ["r"], name="bomb"),
      helper.make_node("Cast", ["r"], ["c"], to=TensorProto.FLOAT)],
     {"a": np.array(0, np.int64), "b": np.array(10**13, np.int64), "d": np.array(1, np.int64)}),
    ([helper.make_node("Mul", ["u", "v"], ["c"], name="bomb")],
     {"u": np.ones((10**5, 1, 1), np.float32), "v": np.ones((1, 10**5, 4), np.float32)}),
    ([helper.make_node("Pad", ["v", "p"], ["c"], name="bomb")],
     {"v": np.ones((1, 4), np.float32), "p": _i64(10**12, 0, 0, 0)}),
], ids=["ConstantOfShape", "Expand", "Tile", "Range", "broadcast-Mul", "Pad"])
def test_giant_constant_outputs_are_refused_before_allocating(nodes, consts):
    m = _model(nodes, consts, check=False)
    start = time.monotonic()
    with pytest.raises(FoldingLimitError, match=r"'bomb'.*elements"):
        liftir.Explainer(m)
    assert time.monotonic() - start < 20


def test_the_error_is_a_model_load_error_and_names_the_limits():
    with pytest.raises(ModelLoadError, match=r"liftir.budget.LIMITS"):
        liftir.Explainer(_model([helper.make_node("ConstantOfShape", ["s"], ["c"], name="bomb")],
                                {"s": _i64(10**6, 10**6, 4)}, check=False))


def test_moving_a_constant_larger_than_the_element_limit_is_allowed(monkeypatch):
    """Transposing a weight does not amplify anything: bounded by its input, not refused."""
    monkeypatch.setitem(budget.LIMITS, "max_elements", 10)
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    nodes = [helper.make_node("Transpose", ["w"], ["c"], perm=[1, 0])]
    ex = liftir.Explainer(_model(nodes, {"w": w}))
    x = np.zeros((4, 4), np.float32)
    np.testing.assert_array_equal(ex.predict(x), w.T)
    with pytest.raises(FoldingLimitError, match="Tile output of 32 elements"):
        liftir.Explainer(_model([helper.make_node("Tile", ["w", "r"], ["t"], name="bomb"),
                                 helper.make_node("Slice", ["t", "st", "en"], ["c"])],
                                {"w": w, "r": _i64(2, 1), "st": _i64(0), "en": _i64(4)}))

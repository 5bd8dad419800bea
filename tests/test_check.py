"""`liftir.check` and `liftir.testing`: conservation holds node by node on good models, and a
broken rule is caught and named (node, op type, residual), as is a wrong forward."""
from __future__ import annotations

import numpy as np
import pytest

import cli_models as cm
import liftir
from liftir.check import check_model, compare_with_onnxruntime, generate_inputs
from liftir.errors import InputError
from liftir.testing import assert_matches_onnxruntime, assert_summation_to_delta


@pytest.fixture
def broken_relu():
    """HalfRelu registered as the user rule for Relu, removed afterwards."""
    cm.register_broken_relu()
    yield
    liftir.unregister_rule("Relu")


@pytest.mark.parametrize("build", [cm.mlp, cm.small_cnn, cm.dna_cnn, cm.two_inputs])
def test_check_passes_on_good_models(build):
    report = check_model(build(), samples=6)
    assert report.ok, str(report)
    assert report.failures == []
    assert report.forward.status == "ok"
    assert report.summation.relative.shape == (6,)
    ops = {n.op_type for n in report.nodes}
    assert "Relu" in ops and all(n.relative < 1e-5 for n in report.nodes)
    text = str(report)
    assert "OK: every node conserves" in text and "relu1" in text


def test_check_keeps_final_softmax_and_strip_seeds_logits():
    keep = check_model(cm.mlp(), samples=4)
    assert keep.ok and "softmax" in [n.name for n in keep.nodes] and keep.explained == ["prob"]
    strip = check_model(cm.mlp(), samples=4, final_activation="strip")
    assert strip.ok and "softmax" not in [n.name for n in strip.nodes] and strip.explained == ["logits"]


def test_check_seeds_every_output_of_a_two_output_model():
    report = check_model(cm.two_outputs(), samples=3)
    assert report.ok, str(report)
    assert sorted(report.explained) == ["out1", "out2"]
    assert {n.name for n in report.nodes} == {"fc", "tanh", "relu1"}
    only = check_model(cm.two_outputs(), samples=3, output="out1")
    assert {n.name for n in only.nodes} == {"fc", "tanh"}


def test_broken_user_rule_is_named_with_op_type_and_residual(broken_relu):
    report = check_model(cm.small_cnn(), samples=4)
    assert not report.ok
    [bad] = report.failed_nodes
    assert (bad.name, bad.op_type) == ("relu1", "Relu")
    assert abs(bad.residual) > 0 and bad.relative > 1e-2
    assert any("'relu1' (Relu) loses conservation" in f and "residual" in f for f in report.failures)
    text = str(report)
    assert "FAIL" in text and "relu1" in text and f"{bad.residual:.3e}" in text
    # the nodes downstream of the bad one still conserve locally
    assert all(n.passed for n in report.nodes if n.name != "relu1")
    assert not report.summation.passed  # and the output sees it too


def test_broken_rule_passed_to_one_explainer():
    report = check_model(cm.mlp(), samples=4, rules={"Relu": cm.HalfRelu})
    assert [n.name for n in report.failed_nodes] == ["relu1"]
    assert check_model(cm.mlp(), samples=4).ok  # the override did not leak


def test_wrong_forward_is_caught_by_onnxruntime_comparison():
    report = check_model(cm.mlp(softmax=False), samples=8, rules={"Relu": cm.LeakyForwardRelu})
    assert not report.failed_nodes  # the rule is self-consistent...
    assert report.forward.status == "mismatch"  # ...but computes the wrong function
    assert not report.ok
    assert any("onnxruntime" in f for f in report.failures)
    result = compare_with_onnxruntime(cm.mlp(), generate_inputs(liftir.Explainer(cm.mlp()), 4))
    assert result.status == "ok" and result.max_abs < 1e-5


def test_given_inputs_baselines_and_fixed_tolerances():
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    report = check_model(cm.mlp(), inputs=x, baselines=np.full((1, 6), 0.3, np.float32), rtol=1e-6)
    assert report.ok, str(report)
    assert report.samples == 5 and not report.notes


def test_unknown_non_batch_dim_asks_for_inputs():
    m = cm.mlp()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"
    with pytest.raises(InputError, match=r"unknown size 'F' at axis 1.*--input"):
        check_model(m)
    assert check_model(m, inputs=np.ones((2, 6), np.float32)).ok


def test_bad_arguments():
    with pytest.raises(InputError, match="samples"):
        check_model(cm.mlp(), samples=0)
    with pytest.raises(InputError, match="max_rule"):
        check_model(cm.mlp(), max_rule="nope")


def test_assert_summation_to_delta_passes_and_fails_clearly(broken_relu):
    liftir.unregister_rule("Relu")
    assert_summation_to_delta(cm.mlp())
    assert_summation_to_delta(cm.mlp(), target=1)
    assert_summation_to_delta(cm.small_cnn(), np.ones((2, 3, 8, 8), np.float32), target=0)
    cm.register_broken_relu()
    for target in (None, 2):
        with pytest.raises(AssertionError) as err:
            assert_summation_to_delta(cm.mlp(), target=target)
        msg = str(err.value)
        assert "summation-to-delta fails" in msg and "sample" in msg
        assert "'relu1' (Relu)" in msg and "residual" in msg
    with pytest.raises(ValueError, match="deeplift"):
        assert_summation_to_delta(cm.mlp(), method="saliency")


def test_assert_matches_onnxruntime():
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    assert_matches_onnxruntime(cm.mlp(), x)
    liftir.register_rule("Relu", replace=True)(cm.LeakyForwardRelu)
    try:
        with pytest.raises(AssertionError, match="differs from onnxruntime"):
            assert_matches_onnxruntime(cm.mlp(), x)
    finally:
        liftir.unregister_rule("Relu")
    with pytest.raises(AssertionError, match="custom domain"):
        assert_matches_onnxruntime(cm.unknown_op(), np.ones((1, 3), np.float32))

"""The one run API: `Explainer.batch`, `forward` and `backward`.

`liftir check`, the CLI and `liftir.testing` go through it: nothing outside the Explainer
stacks inputs or runs the scheduler, and the CLI validates its files once. The passes are
checked against torch (forward, autograd) and onnxruntime, and by summation-to-delta.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import attr_refs as R
import cli_models as cm
import liftir
import liftir.explainer
import liftir.scheduler
from liftir.check import check_model, compare_with_onnxruntime, exercise_rules
from liftir.cli import main
from liftir.inputs import Batch
from liftir.testing import assert_matches_onnxruntime, assert_summation_to_delta

N = 3
TARGET = [5, 1, 3]


def _x():
    return R.inputs("convpool", N, 1), R.inputs("convpool", N, 2)


def _one_hot(k: int = 6) -> np.ndarray:
    seed = np.zeros((1, N, k), np.float32)
    seed[0, np.arange(N), TARGET] = 1
    return seed


@pytest.mark.parametrize("onnxruntime", [True, False])
def test_forward_matches_torch_and_onnxruntime(onnxruntime):
    ex = R.explainer("convpool")
    x, x0 = _x()
    run = ex.forward(x, x0, onnxruntime=onnxruntime)
    assert (run.n_actual, run.n_ref) == (N, N)
    theirs = ort.InferenceSession(R.proto("convpool").SerializeToString(), providers=["CPUExecutionProvider"])
    for rows, actual in ((x, run.actual(ex.output)), (x0, run.reference(ex.output))):
        R.assert_close(actual, R.forward64("convpool", rows), "forward vs torch float64")
        R.assert_close(actual, theirs.run(None, {ex.input_names[0]: rows})[0], "forward vs onnxruntime")
    alone = ex.forward(x, reference=False)
    assert alone.n_ref == 0 and alone.reference(ex.output) is None


def test_backward_of_saliency_is_autograd():
    ex = R.explainer("convpool", method="saliency")
    x, _ = _x()
    run = ex.forward(x)
    assert run.n_ref == 0
    m = ex.backward(run, {ex.output: _one_hot()})[ex.input_names[0]]
    xt = R.t64(x).requires_grad_()
    R.model64("convpool")(xt)[np.arange(N), TARGET].sum().backward()
    R.assert_close(m[0], xt.grad.numpy(), "saliency backward vs torch.autograd")


def test_backward_multipliers_conserve_and_are_what_attribute_returns():
    ex = R.explainer("convpool")
    x, x0 = _x()
    run = ex.forward(x, x0)
    m = ex.backward(run, {ex.output: _one_hot()}, ex.input_names[0])[ex.input_names[0]][0]
    contributions = m.astype(np.float64) * (x - x0)
    difference = (R.forward64("convpool", x) - R.forward64("convpool", x0))[np.arange(N), TARGET]
    np.testing.assert_allclose(contributions.reshape(N, -1).sum(axis=1), difference, rtol=1e-4, atol=1e-5)
    R.assert_close(ex.attribute(x, x0, target=TARGET), contributions, "backward x (x - x0) vs attribute")
    R.assert_close(ex.attribute(x, x0, target=TARGET, multiply_by_inputs=False), m, "backward vs multipliers")


def test_a_batch_is_taken_as_it_is_by_every_call(monkeypatch):
    ex = R.explainer("convpool")
    x, x0 = _x()
    expected, delta = ex.attribute(x, x0, target=TARGET, return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-4
    calls = []
    real = liftir.explainer.prepare
    monkeypatch.setattr(liftir.explainer, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = ex.batch(x, x0)
    assert isinstance(batch, Batch) and batch.n == N and len(calls) == 1
    got, again = ex.attribute(batch, target=TARGET, return_convergence_delta=True)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(again, delta)
    np.testing.assert_allclose(ex.predict(batch), ex.forward(batch, reference=False).actual(ex.output),
                               rtol=1e-5, atol=1e-6)
    ex.forward(batch)
    assert len(calls) == 1  # validated once, by batch()
    with pytest.raises(liftir.InputError, match="a Batch holds its baselines"):
        ex.attribute(batch, x0, target=TARGET)
    with pytest.raises(liftir.InputError, match="'deeplift' needs reference rows"):
        ex.attribute(batch.actual(), target=TARGET)


def test_forward_names_an_unknown_output():
    with pytest.raises(liftir.InputError, match="no tensor named 'nope'"):
        R.explainer("convpool").forward(_x()[0], outputs="nope")


@pytest.fixture
def scheduler_callers(monkeypatch):
    """The modules that call the scheduler's forward and backward (the spies pass through)."""
    callers = set()

    def spy(real):
        def call(*args, **kwargs):
            callers.add(sys._getframe(1).f_globals["__name__"])
            return real(*args, **kwargs)
        return call

    for name in ("forward", "backward"):
        monkeypatch.setattr(liftir.scheduler, name, spy(getattr(liftir.scheduler, name)))
    return callers


#: the Explainer (its calls, and their pass loops: liftir/pass_loops.py) and its engine: the
#: compiler traces a pass over the scheduler (for the compiled engine, and for which forward
#: tensors the interpreter's pass reads); the scheduler's own forward locates the batch of a
#: one-row run from a two-row one
ENGINE = {"liftir.explainer", "liftir.pass_loops", "liftir.compile.compiler", "liftir.scheduler"}


def test_check_and_testing_run_through_the_explainer(scheduler_callers):
    model = cm.small_cnn()
    report = check_model(model, samples=4)
    assert report.ok, str(report)
    assert compare_with_onnxruntime(model, np.random.default_rng(0).standard_normal((2, 3, 8, 8))
                                    .astype(np.float32)).passed
    ex = liftir.Explainer(model, method="guided_backprop")
    assert exercise_rules(ex) == [ex.output]
    assert_summation_to_delta(model)
    assert_summation_to_delta(model, target=1)
    assert_matches_onnxruntime(model, np.ones((2, 3, 8, 8), np.float32))
    assert "liftir.explainer" in scheduler_callers and scheduler_callers <= ENGINE


def test_the_cli_runs_through_the_explainer_and_validates_once(tmp_path, capsys, monkeypatch,
                                                                scheduler_callers):
    onnx.save(cm.mlp(), tmp_path / "mlp.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32))
    calls = []
    real = liftir.explainer.prepare
    monkeypatch.setattr(liftir.explainer, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = [str(tmp_path / "mlp.onnx"), "--input", str(tmp_path / "x.npy")]
    assert main(["explain", *args, "--target", "1", "--out", str(tmp_path / "a.npz")]) == 0
    assert len(calls) == 1
    with np.load(tmp_path / "a.npz") as d:  # DeepLIFT: summation-to-delta
        assert d["delta"].shape == (10,) and np.abs(d["delta"]).max() < 1e-4
    assert main(["check", *args]) == 0
    assert main(["ops", *args]) == 0
    capsys.readouterr()
    assert "liftir.explainer" in scheduler_callers and scheduler_callers <= ENGINE


def test_the_cli_reports_bad_inputs_as_the_explainer_does(tmp_path, capsys):
    onnx.save(cm.mlp(), tmp_path / "mlp.onnx")
    for name, value, message in [("empty", np.zeros((0, 6), np.float32), "inputs have an empty batch"),
                                 ("scalar", np.float32(1), "must have a batch axis"),
                                 ("nan", np.full((2, 6), np.nan, np.float32), "NaN/Inf")]:
        np.save(tmp_path / f"{name}.npy", value)
        code = main(["explain", str(tmp_path / "mlp.onnx"), "-i", str(tmp_path / f"{name}.npy"),
                     "-t", "0", "-o", str(tmp_path / "out.npz")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        with pytest.raises(liftir.InputError, match=message.replace("/", ".")):
            liftir.Explainer(cm.mlp()).attribute(value, target=0)


"""The progress bar counts samples (integrated gradients: sample-steps), appears only for
runs that last, and only on a terminal."""
from __future__ import annotations

import io

import numpy as np
import pytest

import cli_models as cm
import liftir
from liftir import pass_loops, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def recorded(monkeypatch):
    """Every bar the Explainer opens, as (total, unit, enabled, [updates])."""
    bars = []

    class Recording(progress.Progress):
        def __init__(self, total, desc, unit="sample", enabled=True, **kwargs):
            bars.append((total, unit, enabled, []))
            super().__init__(total, desc, unit, enabled=False)

        def update(self, k):
            bars[-1][3].append(k)

    monkeypatch.setattr(pass_loops, "Progress", Recording)
    return bars


def test_explainer_counts_samples_in_every_batch(recorded):
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    ex = liftir.Explainer(cm.mlp())
    attr, delta = ex.attribute(x, target=1, batch_size=3, progress=True, return_convergence_delta=True)
    assert recorded == [(10, "sample", True, [3, 3, 3, 1])]
    np.testing.assert_allclose(attr, ex.attribute(x, target=1), rtol=1e-6, atol=1e-7)
    assert np.abs(delta).max() < 1e-5  # summation-to-delta


def test_integrated_gradients_counts_sample_steps_as_they_are_done(recorded):
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    ex = liftir.Explainer(cm.mlp(), method="integrated_gradients")
    ex.attribute(x, target=0, n_steps=10, internal_batch_size=8, progress=True)  # 2 steps per pass
    assert recorded == [(40, "step", True, [8] * 5)]


def test_no_bar_unless_asked(recorded):
    liftir.Explainer(cm.mlp()).attribute(np.ones((5, 6), np.float32), target=0)
    assert recorded[0][2] is False


def test_bar_on_a_terminal_counts_samples():
    tty = FakeTerminal()
    with progress.Progress(10, "liftir deeplift", delay=0, file=tty) as bar:
        bar.update(3)
        bar.update(7)
    text = tty.getvalue()
    assert "liftir deeplift" in text and "10/10" in text and "sample" in text


def test_quiet_when_not_a_terminal_or_short():
    piped = io.StringIO()
    with progress.Progress(10, "x", delay=0, file=piped) as bar:
        bar.update(10)
    assert piped.getvalue() == ""
    tty = FakeTerminal()
    with progress.Progress(10, "x", file=tty) as bar:  # default delay: a second
        bar.update(10)
    assert tty.getvalue() == ""
    with progress.Progress(10, "x", enabled=False, delay=0, file=tty) as bar:
        bar.update(10)
    assert tty.getvalue() == ""


def test_cli_explain_is_quiet_on_a_pipe(tmp_path, capsys):
    import onnx

    from liftir.cli import main

    onnx.save(cm.mlp(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((300, 6), np.float32))
    assert main(["explain", str(tmp_path / "m.onnx"), "-i", str(tmp_path / "x.npy"), "-t", "0",
                 "-o", str(tmp_path / "a.npz")]) == 0
    assert capsys.readouterr().err == ""

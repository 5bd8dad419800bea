"""examples/custom_rule: a rule for a custom-domain op (com.example::Swish) shipped as a
package through the `liftir.rules` entry point group. Loaded here through a temporary
dist-info on sys.path (fast, no state left behind), and once through a real
`pip install --target` in a subprocess."""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import liftir
from liftir import registry
from liftir.check import check_model
from liftir.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_rule"


def _make_model():
    spec = importlib.util.spec_from_file_location("liftir_swish_make_model", EXAMPLE / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_model()


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "swish_mlp.onnx"
    onnx.save(_make_model(), path)
    return str(path)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The example's entry point, visible to importlib.metadata for this test only."""
    site = tmp_path / "site"
    dist = site / "liftir_swish-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: liftir-swish\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[liftir.rules]\nswish = liftir_swish:Swish\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    importlib.invalidate_caches()
    registry._ensure_loaded()
    monkeypatch.setitem(registry._loaded, "plugins", False)  # rescan entry points now
    yield
    liftir.unregister_rule("Swish", domain="com.example")
    sys.modules.pop("liftir_swish", None)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_without_the_plugin_the_op_is_reported_uncovered(model_path, capsys):
    code, out, _ = _run(capsys, "ops", model_path)
    assert code == 2 and "com.example::Swish" in out and "'swish1'" in out  # as check and explain
    code, _, err = _run(capsys, "check", model_path)
    assert code == 2 and "swish1" in err


def test_plugin_rule_is_listed_checked_and_used(plugin, model_path, capsys, tmp_path):
    assert registry.rule_origin("com.example", "Swish") == "plugin"
    code, out, _ = _run(capsys, "ops")
    line = next(x for x in out.splitlines() if "com.example::Swish" in x)
    assert code == 0 and "plugin" in line and "liftir-swish" in line
    code, out, _ = _run(capsys, "ops", model_path)
    assert code == 0 and "OK: every op type" in out

    code, out, err = _run(capsys, "check", model_path)
    assert code == 0, out + err
    assert "skipped" in out and "custom domain" in out and "'com.example'" in out
    assert "swish1" in out and "OK: every node conserves" in out
    report = check_model(model_path, samples=16, rtol=1e-6)
    assert report.ok and report.forward.status == "skipped"
    assert [n.qualified_op for n in report.nodes] == ["Gemm", "com.example::Swish", "Gemm"]

    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = _run(capsys, "explain", model_path, "-i", tmp_path / "x.npy", "-t", 0,
                          "-o", tmp_path / "a.npz", "--no-progress")
    assert code == 0, err
    # the rule is the textbook Rescale rule: compare with a direct evaluation of the model
    with np.load(tmp_path / "a.npz") as f:
        assert np.abs(f["delta"]).max() < 1e-5
        attr = f["x"]
    ex = liftir.Explainer(model_path)
    np.testing.assert_allclose(attr.sum(axis=1), ex.predict(x)[:, 0] - ex.predict(np.zeros_like(x))[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_swish_gradient_matches_finite_differences(plugin):
    ex = liftir.Explainer(_make_model(), method="saliency")
    x = np.random.default_rng(1).standard_normal((3, 8))
    g = ex.attribute(x.astype(np.float32), target=1).astype(np.float64)
    eps = 1e-3
    for j in range(8):
        e = np.zeros(8)
        e[j] = eps
        fd = (ex.predict((x + e).astype(np.float32))[:, 1] - ex.predict((x - e).astype(np.float32))[:, 1]) / (2 * eps)
        np.testing.assert_allclose(g[:, j], fd, rtol=2e-2, atol=2e-3)


def test_real_pip_install_registers_the_entry_point(tmp_path, model_path):
    """pip install --target, then run the CLI in a fresh interpreter on that path."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "*.onnx"))
    target = tmp_path / "target"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "-q", "--target", str(target), str(src)],
            capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("pip install of the example took over 60 s here")
    if proc.returncode != 0:
        pytest.skip(f"pip cannot build the example offline here: {proc.stderr.strip()[-300:]}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    ops = subprocess.run([sys.executable, "-m", "liftir", "ops", model_path], capture_output=True,
                         text=True, env=env, timeout=60)
    assert ops.returncode == 0, ops.stdout + ops.stderr
    assert "com.example::Swish" in ops.stdout and "plugin" in ops.stdout
    check = subprocess.run([sys.executable, "-m", "liftir", "check", model_path], capture_output=True,
                           text=True, env=env, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "custom domain" in check.stdout

"""The examples run end to end (small sizes) and their key numbers hold.

Each example is a script run in a subprocess, as a user would, writing into a temporary
folder; the checks read its printed output and results JSON. They check liftir's numbers
against an anchor (Captum in float64, onnxruntime, the torch module, summation-to-delta),
never a training outcome (an accuracy, an auROC), which depends on the machine's BLAS
kernels and thread count. The whole file takes well
under two minutes on two CPU cores (most of it is importing torch five times).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def run_example(script: str, *args: str, timeout: int = 240) -> str:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def pngs_ok(folder: Path, names) -> None:
    for name in names:
        path = folder / name
        assert path.is_file(), f"{name} was not written"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5_000, f"{name} looks empty"


def test_figure1_matches_the_paper(tmp_path):
    out = run_example("figure1/figure1.py", "--out", str(tmp_path))
    assert "all numbers match the paper" in out
    assert "MISMATCH" not in out
    pngs_ok(tmp_path, ["figure1_scores.png"])


def test_genomics_quick(tmp_path):
    out = run_example("genomics/train_and_explain.py", "--quick", "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["max_abs_diff_onnx_vs_normalized"] < 1e-5  # 2.6 normalization keeps outputs
    assert res["max_abs_diff_torch_vs_onnx"] < 1e-5
    assert res["deeplift_max_abs_delta"] < 1e-4  # summation to delta
    assert res["deeplift_shap_max_abs_delta"] < 1e-4
    assert res["deeplift_shap_vs_tiled_deeplift_max_abs_diff"] < 1e-5
    rows = res["motif_auroc"]
    assert set(next(iter(rows.values()))["abs"]) == {"GATA", "TAL1"}
    assert "motif recovery" in out
    pngs_ok(tmp_path, ["logo_0.png", "logo_0_zoom.png"])


def test_all_conv_digits(tmp_path):
    """On the shipped trained weights (no training: its outcome depends on the machine's
    kernels), liftir's four methods equal Captum's in float64 on the same torch module."""
    out = run_example("all_conv/all_conv_digits.py", "--maxpool", "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["weights"] == "shipped" and "train_seconds" not in res
    assert "epoch" not in out
    assert res["max_abs_diff_torch_vs_onnx"] < 1e-4  # the export is the torch module
    assert res["deeplift_max_abs_delta"] < 1e-4  # summation to delta on all 450 test digits
    rel = res["captum_max_rel_diff"]
    assert set(rel) == {"saliency", "deconvnet", "guided backprop", "deeplift",
                        "deeplift, liftir in float64"}
    # liftir in float32 against Captum in float64: float32 round-off only
    assert max(v for k, v in rel.items() if "float64" not in k) < 1e-5
    assert rel["deeplift, liftir in float64"] < 1e-10  # both in float64: the same rule
    assert res["neuron_deconvnet_relative_spread"] < 1e-5  # no switches: image-independent
    assert max(res["maxpool_captum_max_rel_diff"].values()) < 1e-5  # deconvnet via switches
    pngs_ok(tmp_path, ["methods.png", "neuron.png", "maxpool_deconvnet.png"])


def test_sklearn_mlp(tmp_path):
    out = run_example("frameworks/sklearn_mlp.py", "--out", str(tmp_path))
    res = json.loads((tmp_path / "sklearn_results.json").read_text())
    bc = res["breast_cancer"]  # (its test accuracy is a training outcome: not tested)
    assert bc["max_abs_diff_predict_proba_vs_onnx"] < 1e-5
    assert bc["deeplift_max_abs_delta"] < 1e-4 and bc["deeplift_logit_max_abs_delta"] < 1e-4
    assert "ai.onnx.ml::Scaler" in bc["ops"]
    iris = res["iris"]
    assert iris["probabilities_max_abs_delta"] < 1e-4
    assert iris["softmax_stripped_max_abs_delta"] < 1e-4
    assert iris["probabilities_mean_total"] == pytest.approx(iris["mean_probability_change"],
                                                             abs=1e-4)
    assert "top features" in out
    pngs_ok(tmp_path, ["sklearn_breast_cancer_bars.png"])


def test_pytorch_exporters(tmp_path):
    run_example("frameworks/pytorch_exporters.py", "--epochs", "50", "--out", str(tmp_path))
    res = json.loads((tmp_path / "pytorch_results.json").read_text())
    for kind in ("keep", "strip", "saliency"):
        assert res[f"exporters_max_abs_diff_{kind}"] < 1e-5
    assert res["cnn"]["exporters_max_rel_diff"] < 1e-4
    assert max(res["captum_rel_diff"].values()) < 1e-4
    pngs_ok(tmp_path, ["pytorch_breast_cancer.png"])


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None
                    or importlib.util.find_spec("tf2onnx") is None,
                    reason="tensorflow and tf2onnx are not installed")
def test_keras_tf2onnx(tmp_path):
    run_example("frameworks/keras_tf2onnx.py", "--epochs", "30", "--out", str(tmp_path))
    res = json.loads((tmp_path / "keras_results.json").read_text())
    assert res["max_abs_diff_vs_keras"] < 1e-5
    assert res["deeplift_keep_max_abs_delta"] < 1e-4
    assert max(res["captum_rel_diff"].values()) < 1e-4


def test_text_classifier_from_token_ids(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("text_classifier/explain_text.py", "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["saliency_vs_torch_max_rel_diff"] < 1e-4
    if "deeplift_max_abs_delta" in res:  # once liftir has a LayerNormalization rule
        assert res["deeplift_max_abs_delta"] < 1e-4
        assert res["deeplift_sum_vs_f_ids_minus_f_ref"] < 1e-4
    assert "[CLS]" in out and len(res["per_token"]) == 4

"""The CuPy backend gives the NumPy backend's results; without a usable GPU the GPU tests
skip (with the reason), backend="auto" falls back to NumPy and backend="cupy" fails
with liftir.BackendError saying what to do.
"""
from __future__ import annotations

import numpy as np
import pytest

import attr_refs as R
import liftir
from liftir.backend import _cupy_usable

CUPY = _cupy_usable()  # the module when CuPy imports and a CUDA device runs a kernel, else None
gpu = pytest.mark.skipif(CUPY is None, reason="needs CuPy and a usable CUDA GPU (pip install liftir[gpu])")
pytestmark = pytest.mark.filterwarnings("ignore")

N = 3
# (method, model key): a representative subset of test_captum / test_methods
GPU_CASES = [("deeplift", "mlp"), ("deeplift", "convpool"), ("deeplift", "vgg"), ("deeplift", "resnet"),
             ("saliency", "mlp"), ("saliency", "convpool"), ("guided_backprop", "convpool"),
             ("deconvnet", "convpool"), ("integrated_gradients", "convpool"), ("deeplift_shap", "convpool")]


def _call(ex, key, method, **kw):
    x, x0 = R.inputs(key, N, 1), R.inputs(key, N, 2)
    base = {"deeplift": x0, "integrated_gradients": x0, "deeplift_shap": R.inputs(key, 4, 5)}.get(method)
    if method == "integrated_gradients":
        kw.setdefault("n_steps", 10)
    return ex.attribute(x, base, target=[0, 1, 2], return_convergence_delta=True, **kw)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method,key", GPU_CASES, ids=[f"{m}-{k}" for m, k in GPU_CASES])
def test_cupy_matches_numpy(method, key):
    """Same rules, other array module: equal to float32 accuracy, NumPy results back."""
    proto = R.proto(key)
    a, d = _call(liftir.Explainer(proto, method=method), key, method)
    g, gd = _call(liftir.Explainer(proto, method=method, backend="cupy"), key, method)
    assert isinstance(g, np.ndarray) and g.dtype == a.dtype and g.shape == a.shape
    R.assert_close(g, a, f"cupy-vs-numpy {method} {key}")
    if d is None:
        assert gd is None
    else:
        assert isinstance(gd, np.ndarray)
        np.testing.assert_allclose(gd, d, rtol=0, atol=1e-5 * max(1.0, float(np.abs(d).max())))


@pytest.mark.gpu
@gpu
def test_cupy_multi_target_layer_and_paper_rule():
    """Multi-target seeds, layer attribution and the paper max rule on the GPU."""
    proto = R.proto("convpool")
    x, x0 = R.inputs("convpool", N, 1), R.inputs("convpool", N, 2)
    layer = R.tensor_of(proto, "MaxPool", 0)
    for kw in ({"target": "all"}, {"target": 2, "layer": layer}):
        a = liftir.Explainer(proto).attribute(x, x0, **kw)
        g = liftir.Explainer(proto, backend="cupy").attribute(x, x0, **kw)
        R.assert_close(g, a, f"cupy-vs-numpy {kw}")
    proto = R.proto("pool_first")  # the paper rule is well conditioned here (see test_captum)
    x, x0 = R.inputs("pool_first", N, 1), R.inputs("pool_first", N, 2)
    a = liftir.Explainer(proto, max_rule="paper").attribute(x, x0, target=1)
    g = liftir.Explainer(proto, max_rule="paper", backend="cupy").attribute(x, x0, target=1)
    R.assert_close(g, a, "cupy-vs-numpy paper rule")


@pytest.mark.gpu
@gpu
def test_cupy_arrays_as_inputs():
    """CuPy arrays are accepted as inputs and baselines (copied to the host for checks)."""
    proto = R.proto("mlp")
    x, x0 = R.inputs("mlp", N, 1), R.inputs("mlp", N, 2)
    ex = liftir.Explainer(proto, backend="cupy")
    a = ex.attribute(CUPY.asarray(x), CUPY.asarray(x0), target=1)
    R.assert_close(a, liftir.Explainer(proto).attribute(x, x0, target=1), "cupy inputs")


def test_auto_falls_back_to_numpy_without_gpu():
    """backend="auto" uses CuPy when usable, NumPy otherwise, with identical results."""
    ex = R.explainer("convpool", backend="auto")
    if CUPY is None:
        assert ex.xp is np
        x, x0 = R.inputs("convpool", N, 1), R.inputs("convpool", N, 2)
        np.testing.assert_array_equal(ex.attribute(x, x0, target=1),
                                      R.explainer("convpool").attribute(x, x0, target=1))
    else:
        assert ex.xp is CUPY


@pytest.mark.skipif(CUPY is not None, reason="a usable GPU is present: backend='cupy' works here")
def test_cupy_without_gpu_raises_backend_error():
    with pytest.raises(liftir.BackendError, match="CuPy and a usable CUDA GPU.*backend='numpy'"):
        liftir.Explainer(R.proto("mlp"), backend="cupy")


def test_unknown_backend():
    with pytest.raises(liftir.BackendError, match="unknown backend 'torch'"):
        liftir.Explainer(R.proto("mlp"), backend="torch")
    assert issubclass(liftir.BackendError, liftir.LiftirError)

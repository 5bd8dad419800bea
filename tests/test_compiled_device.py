"""The compiled engine on a device: IO binding (liftir/compile/device.py).

The binding code is the same on the CPU and on a GPU (only the device name and the array
module differ), so it is checked here on the CPU, bit for bit against `session.run`; the
CUDA provider with CuPy arrays is checked against the NumPy pass where a GPU is present
(skipped cleanly otherwise).
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import liftir
from liftir.backend import _cupy_usable
from liftir.compile import device
from liftir.compile.compiler import SEED

CUPY = _cupy_usable()
CUDA = device.CUDA in device.providers()
gpu = pytest.mark.skipif(CUPY is None or not CUDA, reason="needs CuPy, a usable CUDA GPU and onnxruntime-gpu "
                                                          "(see the README, GPU)")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One pass per call (no row groups): these tests compare one session's runs."""
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def vgg():
    zoo = pytest.importorskip("zoo")
    net = zoo.build("vgg_maxpool", relu_before_pool=True)
    proto = zoo.export(net, zoo.make_input("vgg_maxpool", 2), None, dynamo=False)
    x = zoo.make_input("vgg_maxpool", 3, seed=1).numpy()
    x0 = (np.random.default_rng(7).standard_normal(x.shape[1:]) * 0.1).astype(np.float32)
    return proto, x, x0


def _one_pass(proto, x, x0, method="deeplift"):
    """The Explainer's compiled pass and the feeds it was called with."""
    ex = liftir.Explainer(proto, method, engine="compiled")
    ex.attribute(x, baselines=x0, target=1)
    (cp,) = ex._compiled.passes.values()
    return ex, cp, ex._feeds([x], [x0[None]] if ex.method.uses_reference else None)


@pytest.mark.parametrize("method", ["deeplift", "saliency"])
def test_io_binding_on_the_cpu_equals_session_run_bit_for_bit(vgg, method):
    proto, x, x0 = vgg
    ex, cp, feeds = _one_pass(proto, x, x0, method)
    seed = np.zeros(cp.seed_shape, cp.seed_dtype)
    seed[..., 1] = 1
    inputs = dict(feeds)
    inputs[SEED] = seed
    names = [o.name for o in cp.model.graph.output]
    plain = cp.session.run(names, inputs)
    bound = device.BoundRunner(cp.session, cp.model, np, "cpu")(names, inputs)
    assert [b.shape for b in bound] == [p.shape for p in plain]
    for p, b in zip(plain, bound):
        np.testing.assert_array_equal(p, b)


def test_a_bound_pass_gives_the_attributions_of_a_plain_one(vgg):
    """The whole CompiledPass call through the runner: multipliers and forward values."""
    proto, x, x0 = vgg
    ex, cp, feeds = _one_pass(proto, x, x0)
    seed = np.zeros(cp.seed_shape, cp.seed_dtype)
    seed[..., 1] = 1
    grads, values = cp(feeds, seed)
    cp.runner = device.BoundRunner(cp.session, cp.model, np, "cpu")
    try:
        grads_b, values_b = cp(feeds, seed)
    finally:
        cp.runner = None
    for w in grads:
        np.testing.assert_array_equal(grads[w], grads_b[w])
    for v in values:
        np.testing.assert_array_equal(values[v], values_b[v])


@pytest.mark.parametrize("method", ["deeplift", "saliency", "deeplift_shap", "integrated_gradients"])
def test_a_non_numpy_array_module_runs_the_compiled_pass_through_io_binding(method):
    """End to end on the tests' NumPy stand-in that is not NumPy (tests/test_array_api_subset.py,
    the functions CuPy has): the Explainer's arrays stay that module's, every pass is
    compiled and bound (on the CPU here, on the GPU with CuPy), and the attributions equal
    the NumPy engine's bit for bit."""
    from test_array_api_subset import _net, subset_module
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 10, 10)).astype(np.float32)
    x0 = rng.standard_normal((4 if method == "deeplift_shap" else 1, 2, 10, 10)).astype(np.float32) * 0.1
    kw = {"n_steps": 6} if method == "integrated_gradients" else {}
    if method.startswith("deeplift"):
        kw["return_convergence_delta"] = True
    want = liftir.Explainer(_net(), method, engine="compiled").attribute(x, baselines=x0, target=2, **kw)
    ex = liftir.Explainer(_net(), method, engine="compiled")
    ex.xp = subset_module()
    got = ex.attribute(x, baselines=x0, target=2, **kw)
    assert ex._compiled.passes and all(p is not None and p.runner is not None for p in ex._compiled.passes.values())
    if method.startswith("deeplift"):
        (got, delta), (want, _) = got, want
        assert np.abs(delta).max() <= 1e-5 * max(1.0, float(np.abs(got).sum(axis=(1, 2, 3)).max()))
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(CUDA, reason="this onnxruntime has a CUDA provider")
def test_cupy_without_a_cuda_onnxruntime_says_why_and_uses_the_interpreter():
    reason = device.why_not_on(types.SimpleNamespace(__name__="cupy"))
    assert "onnxruntime-gpu" in reason and "CUDA provider" in reason
    assert device.why_not_on(np) is None
    assert device.providers_for(np) == [device.CPU]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method", ["deeplift", "saliency", "integrated_gradients"])
def test_compiled_on_the_gpu_equals_the_compiled_cpu_pass(vgg, method):
    proto, x, x0 = vgg
    cpu = liftir.Explainer(proto, method, engine="compiled")
    gpu_ex = liftir.Explainer(proto, method, engine="compiled", backend="cupy")
    kw = {"n_steps": 8} if method == "integrated_gradients" else {}
    a = cpu.attribute(x, baselines=x0, target=1, **kw)
    b = gpu_ex.attribute(x, baselines=x0, target=1, **kw)
    assert all(p is not None for p in gpu_ex._compiled.passes.values()), gpu_ex._compiled.reasons
    assert all(p.runner is not None for p in gpu_ex._compiled.passes.values())
    b = liftir.backend.to_host(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.abs(a).max()))
    if method == "deeplift":
        _, delta = gpu_ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
        delta = liftir.backend.to_host(delta)
        scale = max(1.0, float(np.abs(cpu.predict(x)).max()))
        assert np.abs(delta).max() <= 1e-4 * scale


def test_a_gpu_session_that_onnxruntime_opened_on_the_cpu_is_refused():
    """onnxruntime-gpu lists its CUDA provider even where the CUDA libraries do not load,
    and then opens the session on the CPU: binding GPU pointers to it must not be tried
    (the engine catches the refusal and runs the interpreter)."""
    cupy_like = types.SimpleNamespace(__name__="cupy")
    on_cpu = types.SimpleNamespace(get_providers=lambda: [device.CPU])
    with pytest.raises(RuntimeError, match="could not start its CUDA provider"):
        device.require_providers(on_cpu, cupy_like)
    device.require_providers(types.SimpleNamespace(get_providers=lambda: [device.CUDA, device.CPU]), cupy_like)
    device.require_providers(on_cpu, np)

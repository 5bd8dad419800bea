"""CumSum, Resize/Upsample and Einsum (rules/linear_maps.py).

Forwards against onnxruntime; backward against the adjoint identity <A x, y> = <x, A^T y>
in float64; Einsum of two activations against a hand-written float64 product rule; and
PyTorch models (F.interpolate, torch.einsum, torch.cumsum) exported with both exporters
against torch.autograd and Captum's DeepLift in float64.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

import liftir
from liftir import scheduler
from onnx_builders import export_torch, op_model, run_ort

F32 = np.float32
CASES = {
    "cumsum": ("CumSum", [(2, 3, 5), np.array(2)], {}, np.float64),
    "cumsum-reverse-exclusive": ("CumSum", [(2, 3, 5), np.array(-1)], {"reverse": 1, "exclusive": 1}, np.float64),
    "resize-nearest": ("Resize", [(2, 3, 4, 5), np.array([], F32), np.array([1, 1, 2, 1.5], F32)],
                       {"mode": "nearest"}, F32),
    "resize-linear": ("Resize", [(2, 3, 4, 5), np.array([], F32), np.array([1, 1, 2, 1.5], F32)],
                      {"mode": "linear"}, F32),
    "resize-cubic-align-corners": ("Resize", [(2, 3, 4, 5), np.array([], F32), np.array([1, 1, 0.6, 1.7], F32)],
                                   {"mode": "cubic", "coordinate_transformation_mode": "align_corners"}, F32),
    "resize-linear-antialias-sizes": ("Resize", [(2, 3, 4, 5), None, None, np.array([2, 3, 7, 3], np.int64)],
                                      {"mode": "linear", "antialias": 1}, F32),
    "resize-nearest-floor-asymmetric": ("Resize", [(2, 3, 4, 5), None, None, np.array([2, 3, 7, 9], np.int64)],
                                        {"mode": "nearest", "nearest_mode": "floor",
                                         "coordinate_transformation_mode": "asymmetric"}, F32),
    "einsum-constant": ("Einsum", [(2, 3, 4), np.random.default_rng(0).standard_normal((4, 5))],
                        {"equation": "bij,jk->bik"}, np.float64),
    "einsum-summed-alone": ("Einsum", [(2, 3, 4), np.random.default_rng(0).standard_normal(6)],
                            {"equation": "bij,k->bi"}, np.float64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_adjoint_and_conservation(case):
    op, inputs, attrs, dtype = CASES[case]
    inputs = [i.astype(dtype) if isinstance(i, np.ndarray) and i.dtype.kind == "f" and op == "Einsum" else i
              for i in inputs]
    m = op_model(op, inputs, attrs, opset=19, dtype=dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(inputs[0]).astype(dtype)
    ex = liftir.Explainer(m, "deeplift")
    ex.plan.use_onnxruntime = False
    np.testing.assert_allclose(ex.predict(x), run_ort(m, {"x0": x})[0], rtol=1e-5 if dtype == F32 else 1e-13,
                               atol=1e-6 if dtype == F32 else 1e-14)
    # adjoint, float64 (onnxruntime runs no float64 Resize; the rules do)
    m64 = op_model(op, [i.astype(np.float64) if isinstance(i, np.ndarray) and i.dtype.kind == "f" and op == "Einsum"
                        else i for i in inputs], attrs, opset=19, dtype=np.float64)
    sal = liftir.Explainer(m64, "saliency")
    x64 = rng.standard_normal(inputs[0])
    run = scheduler.forward(sal.plan, np, {"x0": x64}, len(x64), 0, (sal.output,), "gradient", sal.options,
                            engine="rules")
    y = run.actual(sal.output)
    seed = rng.standard_normal((1,) + y.shape)
    back = scheduler.backward(run, {sal.output: seed}, ("x0",), (sal.output,))["x0"][0]
    assert abs((y * seed[0]).sum() - (x64 * back).sum()) < 1e-12 * np.abs(y * seed[0]).sum()
    x0 = rng.standard_normal((1,) + inputs[0][1:])
    _, delta = liftir.Explainer(m64, "deeplift").attribute(x64, baselines=x0, target=(0,) * (y.ndim - 1),
                                                           return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-12


def test_einsum_of_two_activations_is_the_product_rule():
    m = op_model("Einsum", [(2, 3, 4), (2, 4, 5)], {"equation": "bij,bjk->bik"}, dtype=np.float64)
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 3, 4)), rng.standard_normal((3, 4, 5))
    a0, b0 = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 4, 5))
    (ga, gb), delta = liftir.Explainer(m, "deeplift").attribute((a, b), baselines=(a0, b0), target=(1, 2),
                                                                return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-13
    bm, am = (b + b0) / 2, (a + a0) / 2  # hand-written: dy_12 = sum_j da_1j b'_j2 + a'_1j db_j2
    want_a = np.zeros_like(a)
    want_a[:, 1, :] = (a - a0)[:, 1, :] * bm[:, :, 2]
    want_b = np.zeros_like(b)
    want_b[:, :, 2] = am[:, 1, :] * (b - b0)[:, :, 2]
    np.testing.assert_allclose(ga, want_a, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gb, want_b, rtol=1e-13, atol=1e-15)


class Resampler(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu, self.mode = torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), mode
        self.mix = torch.nn.Parameter(torch.randn(3, 4))
        self.fc = torch.nn.Linear(4 * 10 * 6, 2)

    def forward(self, x):
        h = self.relu(self.conv(x))                          # (N, 3, 5, 3)
        h = torch.nn.functional.interpolate(h, scale_factor=2, mode=self.mode,
                                            **({"align_corners": False} if self.mode != "nearest" else {}))
        h = torch.einsum("nchw,cd->ndhw", h, self.mix)       # (N, 4, 10, 6)
        return self.fc(torch.cumsum(h, dim=3).flatten(1))


@pytest.mark.parametrize("mode, exporter", [("bilinear", 14), ("nearest", 17), ("bilinear", "dynamo")])
def test_torch_resample_einsum_cumsum(mode, exporter):
    from captum.attr import DeepLift
    net = Resampler(mode).eval()
    proto = export_torch(net, torch.randn(2, 2, 7, 5), exporter)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 7, 5))
    x0 = rng.standard_normal((1, 2, 7, 5)) * 0.3
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    net(xt)[:, 1].sum().backward()
    sal = liftir.Explainer(proto, "saliency").attribute(x.astype(np.float32), target=1)
    assert np.abs(sal - xt.grad.numpy()).max() <= 1e-4 * np.abs(xt.grad.numpy()).max()
    attr, delta = liftir.Explainer(proto, "deeplift", precision="float64").attribute(
        x, baselines=x0, target=1, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-9 * max(1.0, np.abs(attr).max())
    theirs = DeepLift(net.double()).attribute(torch.tensor(x), baselines=torch.tensor(x0), target=1).detach().numpy()
    np.testing.assert_allclose(attr, theirs, atol=1e-9 * np.abs(theirs).max())

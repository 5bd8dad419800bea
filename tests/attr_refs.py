"""Shared by test_captum.py, test_methods.py and test_backends.py: small zoo models, their
ONNX exports (each built once per session: the dynamo exporter takes seconds), float64
references (Captum on ``model.double()``, torch autograd) and a loop implementation of
DeepLIFT for sequential nets, the reference where Captum 0.9 is known to be wrong.

Exactness anchor: liftir's float32 result on the float32 export against a float64
reference, ``max|a - c| <= TOL * max|c|``. Captum itself in float32 is ~1e-5..1e-6 away
from float64 (the Rescale quotient cancels), so float32 Captum is no anchor.
"""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
from torch import nn

import liftir
import zoo

TOL = 1e-5  # max|liftir - reference| / max|reference|

# key -> (zoo name, builder kwargs); small widths keep the suite fast
ZOO_CASES = {
    "mlp": ("mlp_relu_sigmoid_tanh", {}),
    "allconv": ("all_conv", {"width": 8}),
    "resnet": ("residual_bn", {"widths": (8, 16, 16)}),
    "vgg": ("vgg_maxpool", {"widths": (8, 16), "n_classes": 10}),
    "adjacent": ("maxpool_relu_adjacent", {}),
}


def _overlap(seed: int = 0) -> nn.Module:
    """Overlapping MaxPool(3, 2, 1) between two convs (no hooked module next to it), so
    only Captum's overwriting max-unpool is at fault."""
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.MaxPool2d(3, 2, 1),       # 16 -> 8
                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    return zoo._init_(m, seed)


def _pool_first(seed: int = 0) -> nn.Module:
    """MaxPool on the input itself: a baseline below x everywhere makes y >= y0 in every
    window, where the paper rule and cross_max must coincide."""
    m = nn.Sequential(nn.MaxPool2d(2, 2), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    return zoo._init_(m, seed)


def _convpool(seed: int = 0) -> nn.Module:
    """vgg_maxpool in miniature on 3x16x16 (conv-ReLU-conv-MaxPool(2, 2) blocks, no
    nonlinear module next to a pool): the conv net of the method tests."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2, 2),
                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.MaxPool2d(2, 2),
                      nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 6))
    return zoo._init_(m, seed)


LOCAL_CASES = {"overlap": (_overlap, (3, 16, 16)), "pool_first": (_pool_first, (3, 16, 16)),
               "convpool": (_convpool, (3, 16, 16))}


def build(key: str) -> nn.Module:
    """A fresh float32 module (deterministic weights)."""
    if key in LOCAL_CASES:
        return LOCAL_CASES[key][0]()
    name, kw = ZOO_CASES[key]
    return zoo.build(name, **kw)


@functools.lru_cache(maxsize=None)
def model(key: str) -> nn.Module:
    return build(key)


@functools.lru_cache(maxsize=None)
def model64(key: str) -> nn.Module:
    """The same function in float64 (the reference side)."""
    return build(key).double()


def inputs(key: str, n: int, seed: int) -> np.ndarray:
    if key in LOCAL_CASES:
        g = torch.Generator().manual_seed(10_000 + seed)
        return torch.randn((n, *LOCAL_CASES[key][1]), generator=g).numpy()
    return zoo.make_input(ZOO_CASES[key][0], n, seed=seed).numpy()


@functools.lru_cache(maxsize=None)
def proto(key: str, dynamo: bool = False, optimize: bool = True):
    """The float32 ONNX export, once per (model, exporter) per session. optimize=False
    keeps BatchNormalization nodes (see zoo.export)."""
    x = torch.from_numpy(inputs(key, 2, 0))
    return zoo.export(model(key), x, None, dynamo=dynamo, optimize=optimize)


@functools.lru_cache(maxsize=None)
def proto64(key: str):
    """A float64 export (TorchScript exporter) for liftir-in-float64 checks."""
    x = torch.from_numpy(inputs(key, 2, 0)).double()
    return zoo.export(model64(key), x, None, dynamo=False)


def tensor_of(proto_, op_type: str, k: int = 0) -> str:
    """Output name of the k-th node of `op_type` (both exporters emit one node per module
    for these nets, in module order)."""
    outs = [n.output[0] for n in proto_.graph.node if n.op_type == op_type]
    return outs[k]


def rel(a, c) -> float:
    a = np.asarray(a, np.float64)
    c = np.asarray(c, np.float64)
    assert a.shape == c.shape, (a.shape, c.shape)
    return float(np.abs(a - c).max() / max(np.abs(c).max(), 1e-300))


def assert_close(a, c, label: str, tol: float = TOL) -> float:
    """max|a - c| <= tol * max|c|; logs the measured ratio when LIFTIR_REL_LOG names a file."""
    r = rel(a, c)
    log = os.environ.get("LIFTIR_REL_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{label}\t{r:.3e}\n")
    assert r <= tol, f"{label}: max|a - c| / max|c| = {r:.3e} > {tol:g}"
    return r


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float64))


def captum(cls, key: str, *ctor_args, call=None, **kw) -> np.ndarray | tuple:
    """Run a Captum attribution class on the float64 module with float64 tensors.

    `ctor_args` may name sub-modules by index into the Sequential (int) or attribute
    path (str); `call` is the positional args of `.attribute` (tensors converted).
    """
    m = model64(key)
    resolved = [_submodule(m, a) for a in ctor_args]
    algo = cls(m, *resolved)
    args = [t64(a) if isinstance(a, np.ndarray) else a for a in (call or ())]
    kw = {k: (t64(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = algo.attribute(*args, **kw)
    if isinstance(out, tuple):
        return tuple(o.detach().numpy() if torch.is_tensor(o) else o for o in out)
    return out.detach().numpy()


def _submodule(m: nn.Module, ref):
    if isinstance(ref, int):
        return m[ref]
    if isinstance(ref, str):
        for part in ref.split("."):
            m = m[int(part)] if part.isdigit() else getattr(m, part)
        return m
    return ref


def forward64(key: str, x) -> np.ndarray:
    with torch.no_grad():
        return model64(key)(t64(x)).numpy()


# --------------------------------------------------------------------------- loop DeepLIFT


def _pool_windows(h: int, w: int, k: int, s: int, p: int):
    """(oh, ow, [(i, j), ...]) for every output of a 2-D max pool (padding cells dropped)."""
    oh_n = (h + 2 * p - k) // s + 1
    ow_n = (w + 2 * p - k) // s + 1
    for oh in range(oh_n):
        for ow in range(ow_n):
            cells = [(i, j) for i in range(oh * s - p, oh * s - p + k) for j in range(ow * s - p, ow * s - p + k)
                     if 0 <= i < h and 0 <= j < w]
            yield oh, ow, cells


def loop_max_multipliers(x, x0, g, k: int, s: int, p: int, rule: str) -> np.ndarray:
    """DeepLIFT multipliers of a 2-D max pool by an explicit loop over windows.

    cross_max: with M = max(y, y0), the actual argmax gets g (M - y0), the reference argmax
    g (y - M); paper: the actual argmax gets g (y - y0). Contributions of all windows are
    added per input cell, then divided by that cell's dx (the gradient where dx == 0).
    """
    n, c, h, w = x.shape
    contrib = np.zeros_like(x)
    grad = np.zeros_like(x)
    rows = np.arange(n)[:, None]
    chans = np.arange(c)[None, :]
    for oh, ow, cells in _pool_windows(h, w, k, s, p):
        ii = np.array([a for a, _ in cells])
        jj = np.array([b for _, b in cells])
        va, vr = x[:, :, ii, jj], x0[:, :, ii, jj]               # (N, C, cells)
        ia, ir = va.argmax(-1), vr.argmax(-1)
        ya, yr = va.max(-1), vr.max(-1)
        gg = g[:, :, oh, ow]
        np.add.at(grad, (rows, chans, ii[ia], jj[ia]), gg)
        if rule == "paper":
            np.add.at(contrib, (rows, chans, ii[ia], jj[ia]), gg * (ya - yr))
        else:
            top = np.maximum(ya, yr)
            np.add.at(contrib, (rows, chans, ii[ia], jj[ia]), gg * (top - yr))
            np.add.at(contrib, (rows, chans, ii[ir], jj[ir]), gg * (ya - top))
    dx = x - x0
    return np.where(dx != 0, contrib / np.where(dx != 0, dx, 1), grad)


_SMOOTH_SLOPE = {
    nn.ReLU: lambda a: (a > 0).astype(a.dtype),
    nn.Sigmoid: lambda a: 1 / (1 + np.exp(-a)) * (1 - 1 / (1 + np.exp(-a))),
    nn.Tanh: lambda a: 1 - np.tanh(a) ** 2,
}


def loop_deeplift(seq: nn.Sequential, x, x0, target: int, rule: str = "cross_max") -> tuple[np.ndarray, np.ndarray]:
    """float64 DeepLIFT of a Sequential, rule by rule by hand: affine modules by their
    transposed map (torch vjp), ReLU/Sigmoid/Tanh by the Rescale quotient, MaxPool2d by
    `loop_max_multipliers`. Returns (attributions, f(x)_t - f(x0)_t)."""
    x = np.asarray(x, np.float64)
    x0 = np.broadcast_to(np.asarray(x0, np.float64), x.shape).copy()
    acts, acts0 = [x], [x0]
    with torch.no_grad():
        for mod in seq:
            acts.append(mod(t64(acts[-1])).numpy())
            acts0.append(mod(t64(acts0[-1])).numpy())
    m = np.zeros_like(acts[-1])
    m[:, target] = 1.0
    for i in reversed(range(len(seq))):
        mod, a, a0, b, b0 = seq[i], acts[i], acts0[i], acts[i + 1], acts0[i + 1]
        if type(mod) in _SMOOTH_SLOPE:
            dx = a - a0
            m = m * np.where(dx != 0, (b - b0) / np.where(dx != 0, dx, 1), _SMOOTH_SLOPE[type(mod)](a))
        elif isinstance(mod, nn.MaxPool2d):
            k, s, p = (mod.kernel_size, mod.stride, mod.padding)
            assert all(isinstance(v, int) for v in (k, s, p)) and mod.dilation == 1 and not mod.ceil_mode
            m = loop_max_multipliers(a, a0, m, k, s, p, rule)
        else:  # affine: the multiplier map is the transposed linear map
            t = t64(a).requires_grad_(True)
            m = torch.autograd.grad(mod(t), t, t64(m))[0].numpy()
    return m * (x - x0), acts[-1][:, target] - acts0[-1][:, target]


@functools.lru_cache(maxsize=None)
def _explainer(key, dynamo, optimize, items):
    return liftir.Explainer(proto(key, dynamo, optimize), **dict(items))


def explainer(key: str, dynamo: bool = False, optimize: bool = True, **kw) -> liftir.Explainer:
    """An Explainer of the cached export, itself cached per options (they are reusable)."""
    return _explainer(key, dynamo, optimize, tuple(sorted(kw.items())))

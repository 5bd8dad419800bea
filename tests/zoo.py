"""Model zoo shared by the tests and the benchmarks.

Every builder returns a PyTorch module in eval mode with deterministic random weights, so
that liftir (which runs the ONNX export) and Captum (which runs the torch module) see the
same function. The models only use what Captum's DeepLift can hook: nonlinearities are
module instances (never ``F.relu``) and no module instance is called twice in a forward,
because Captum keeps per-module state between its forward and backward hooks.

Captum 0.9's DeepLift is not a valid reference everywhere; ``captum_caveat`` says where:

* two hooked nonlinear modules directly adjacent (MaxPool -> ReLU, but also ReLU ->
  MaxPool or ReLU -> Sigmoid): the upstream hook sees the downstream module's plain
  autograd gradient instead of its DeepLIFT multiplier (captum issue #1104, fixed only
  after 0.9 by PR #1843), so the downstream rule is silently replaced by the gradient;
* overlapping pooling windows: Captum's MaxUnpool-based rule overwrites instead of
  accumulating where windows share an argmax;
* ``nn.PReLU`` is not in Captum's rule table, so Captum treats it as linear (gradient).

So ``vgg_maxpool``'s blocks are conv-ReLU-conv-MaxPool(2, 2) (no nonlinearity touches a
pool), ``resnet18(captum_exact=True)`` moves the stem pool between conv and BN, and
``maxpool_relu_adjacent`` keeps the bad pattern on purpose.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

__all__ = [
    "MODELS",
    "captum_caveat",
    "ModelSpec",
    "export",
    "make_input",
    "build",
    "run_ort",
    "mlp_relu_sigmoid_tanh",
    "all_conv",
    "vgg_maxpool",
    "residual_bn",
    "resnet18",
    "wide_mlp",
    "maxpool_relu_adjacent",
    "conv1d_genomics",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"


# --------------------------------------------------------------------------- weights


def _init_(model: nn.Module, seed: int, calib_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Deterministic He-normal weights, non-zero biases, non-trivial BatchNorm.

    He scaling keeps activations O(1) through deep ReLU stacks (PyTorch's default init
    shrinks them layer by layer, which makes relative-tolerance checks meaningless);
    non-zero biases move ReLU kinks away from the origin so that DeepLIFT and the gradient
    really differ. BatchNorm running statistics are calibrated by one train-mode pass on
    random data (so they are far from the 0/1 defaults yet keep activations well scaled)
    and the affine parameters are random.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.3 + 0.05)
        if calib_shape is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model.train()
            model(torch.randn(calib_shape, generator=g))
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    # shift the calibrated stats a little so they are not the exact
                    # batch statistics of anything the tests feed in
                    m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
                    m.momentum = 0.1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------- builders


def mlp_relu_sigmoid_tanh(seed: int = 0) -> nn.Module:
    """20 -> 32 ReLU -> 32 Sigmoid -> 16 Tanh -> 5: one of each smooth/piecewise nonlinearity."""
    m = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.Sigmoid(),
        nn.Linear(32, 16), nn.Tanh(),
        nn.Linear(16, 5),
    )
    return _init_(m, seed)


def all_conv(seed: int = 0, width: int = 32, n_classes: int = 10) -> nn.Module:
    """All-CNN-C (Springenberg et al. 2015) on 3x32x32: 3x3 convs, stride-2 convs instead
    of pooling, ReLU, 1x1 conv to classes, global average pooling.

    ``width`` replaces the paper's 96 (and 2*width its 192); the default 32 keeps tests
    fast, the benchmark uses width=96 (the paper's net, ~1.4 M parameters). Unlike the
    paper there is no ReLU after the class conv, so the outputs are signed logits.
    """
    w1, w2 = width, 2 * width

    def conv(cin, cout, k=3, s=1, p=1):
        return [nn.Conv2d(cin, cout, k, stride=s, padding=p), nn.ReLU()]

    layers = (
        conv(3, w1) + conv(w1, w1) + conv(w1, w1, s=2)            # 32 -> 16
        + conv(w1, w2) + conv(w2, w2) + conv(w2, w2, s=2)         # 16 -> 8
        + conv(w2, w2, p=0)                                       # 8 -> 6
        + conv(w2, w2, k=1, p=0)
        + [nn.Conv2d(w2, n_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    )
    return _init_(nn.Sequential(*layers), seed)


def vgg_maxpool(seed: int = 0, widths: tuple[int, ...] = (32, 64, 128, 256), n_classes: int = 200,
                relu_before_pool: bool = False) -> nn.Module:
    """VGG-style net on 3x64x64 (Tiny-ImageNet-sized, 200 classes).

    Each block is conv-ReLU-conv-MaxPool(2, 2) and the pool's output goes to the next
    conv (or Flatten-Linear) before any ReLU. Pools do not overlap (kernel == stride) and
    touch no other nonlinear module: Captum's DeepLift silently replaces the rule of a
    hooked nonlinearity that directly consumes another's output by its plain gradient
    (ReLU -> MaxPool included), so the classic conv-ReLU-MaxPool order is not compared
    exactly by Captum. ``relu_before_pool=True`` gives that classic order.
    """
    layers: list[nn.Module] = []
    cin = 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1)]
        if relu_before_pool:
            layers.append(nn.ReLU())
        layers.append(nn.MaxPool2d(2, 2))
        cin = w
    side = 64 // 2 ** len(widths)
    layers += [nn.Flatten(), nn.Linear(cin * side * side, 512), nn.ReLU(), nn.Linear(512, n_classes)]
    return _init_(nn.Sequential(*layers), seed)


class BasicBlock(nn.Module):
    """ResNet basic block with its own ReLU instances (torchvision reuses one, which
    Captum's DeepLift rejects)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class _ResNet(nn.Module):
    def __init__(self, stem: nn.Module, stages: list[nn.Module], width: int, n_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


def residual_bn(seed: int = 0, widths: tuple[int, ...] = (16, 32, 64), n_classes: int = 10) -> nn.Module:
    """Small ResNet on 3x32x32: conv-BN-ReLU stem, one basic block per stage (stride 2
    with a 1x1 conv+BN projection from the second stage on), global average pooling."""
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
    stages, cin = [], widths[0]
    for i, w in enumerate(widths):
        stages.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
        cin = w
    return _init_(_ResNet(stem, stages, cin, n_classes), seed, calib_shape=(16, 3, 32, 32))


def resnet18(seed: int = 0, n_classes: int = 1000, captum_exact: bool = False) -> nn.Module:
    """ResNet-18 (He et al. 2016) for 3x224x224, written out by hand (no torchvision).

    The standard stem conv-BN-ReLU-MaxPool(3, 2, 1) has an overlapping pool fed directly
    by a ReLU; Captum's DeepLift gets both wrong (see module docstring).
    ``captum_exact=True`` uses conv-MaxPool(2, 2)-BN-ReLU instead: same 64x56x56 output,
    the pool between two linear ops, so Captum is a valid reference for it.
    """
    if captum_exact:
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(2, 2),
                             nn.BatchNorm2d(64), nn.ReLU())
    else:
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.MaxPool2d(3, stride=2, padding=1))
    stages, cin = [], 64
    for i, w in enumerate((64, 128, 256, 512)):
        stages += [BasicBlock(cin, w, stride=1 if i == 0 else 2), BasicBlock(w, w)]
        cin = w
    return _init_(_ResNet(stem, stages, cin, n_classes), seed, calib_shape=(4, 3, 224, 224))


def wide_mlp(seed: int = 0, sizes: tuple[int, ...] = (512, 2048, 2048, 10)) -> nn.Module:
    """512 -> 2048 ReLU -> 2048 ReLU -> 10: GEMM-bound, the benchmark runs it at batch 4096."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return _init_(nn.Sequential(*layers), seed)


def maxpool_relu_adjacent(seed: int = 0, n_classes: int = 5) -> nn.Module:
    """Conv -> MaxPool -> ReLU twice on 3x16x16: the pattern Captum's DeepLift gets wrong
    (a MaxPool feeding another nonlinear module), kept to show liftir does not."""
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2, 2), nn.ReLU(),     # 16 -> 8
        nn.Conv2d(8, 16, 3, padding=1), nn.MaxPool2d(2, 2), nn.ReLU(),    # 8 -> 4
        nn.Flatten(), nn.Linear(16 * 4 * 4, n_classes),
    )
    return _init_(m, seed)


def conv1d_genomics(seed: int = 0, activation: str = "prelu") -> nn.Module:
    """DeepLIFT-paper-style genomics net on one-hot DNA (N, 4, 200).

    Conv1d(4, 20, 15, padding=7) -> act -> MaxPool1d(50, 50) -> Linear(80, 200) -> act ->
    Linear(200, 200) -> act -> Linear(200, 1). 'same' padding keeps all 200 positions
    inside the four pooling windows. ``activation="prelu"`` (per-channel slopes) is the
    default; Captum treats PReLU as linear, and with ``"leaky_relu"`` or ``"relu"`` the
    activation feeds the pool directly, so Captum is exact for no variant (see
    ``captum_caveat``; with one-hot inputs and a zero baseline the leaky_relu variant
    still sums to delta, but may place the pool's share on a different position).
    """
    def act(n: int) -> nn.Module:
        if activation == "prelu":
            return nn.PReLU(n)
        if activation == "leaky_relu":
            return nn.LeakyReLU(0.1)
        if activation == "relu":
            return nn.ReLU()
        raise ValueError(f"unknown activation {activation!r}")

    m = nn.Sequential(
        nn.Conv1d(4, 20, 15, padding=7), act(20), nn.MaxPool1d(50, 50),
        nn.Flatten(), nn.Linear(20 * 4, 200), act(200),
        nn.Linear(200, 200), act(200),
        nn.Linear(200, 1),
    )
    return _init_(m, seed)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """How to build a zoo model and what it eats (input shape without the batch dim)."""

    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    n_outputs: int
    kind: str = "gaussian"  # or "onehot" (DNA)


MODELS: dict[str, ModelSpec] = {
    "mlp_relu_sigmoid_tanh": ModelSpec(mlp_relu_sigmoid_tanh, (20,), 5),
    "all_conv": ModelSpec(all_conv, (3, 32, 32), 10),
    "vgg_maxpool": ModelSpec(vgg_maxpool, (3, 64, 64), 200),
    "residual_bn": ModelSpec(residual_bn, (3, 32, 32), 10),
    "resnet18": ModelSpec(resnet18, (3, 224, 224), 1000),
    "wide_mlp": ModelSpec(wide_mlp, (512,), 10),
    "maxpool_relu_adjacent": ModelSpec(maxpool_relu_adjacent, (3, 16, 16), 5),
    "conv1d_genomics": ModelSpec(conv1d_genomics, (4, 200), 1, kind="onehot"),
}

def captum_caveat(name: str, **kw) -> str | None:
    """Why Captum 0.9's DeepLift is not an exact reference for this model, or None.

    Checked by tests/test_zoo.py::test_captum_completeness (summation-to-delta with a
    random baseline), so a Captum upgrade that fixes these shows up there.
    """
    if name == "maxpool_relu_adjacent":
        return "MaxPool feeds ReLU directly: Captum uses the ReLU's gradient there (captum#1104)"
    if name == "vgg_maxpool" and kw.get("relu_before_pool"):
        return "ReLU feeds MaxPool directly: Captum uses the pool's gradient there (captum#1104)"
    if name == "resnet18" and not kw.get("captum_exact"):
        return ("stem ReLU feeds an overlapping MaxPool(3, 2): Captum uses the pool's gradient "
                "(captum#1104) and its MaxUnpool rule overwrites shared argmaxes")
    if name == "conv1d_genomics":
        if kw.get("activation", "prelu") == "prelu":
            return "nn.PReLU is not in Captum's DeepLift rule table: Captum uses its gradient"
        return "activation feeds MaxPool1d directly: Captum uses the pool's gradient there (captum#1104)"
    return None


def build(name: str, seed: int = 0, **kw) -> nn.Module:
    """Build a zoo model by name."""
    return MODELS[name].builder(seed=seed, **kw)


def make_input(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    """Deterministic input batch for a zoo model (float32; one-hot DNA for genomics)."""
    spec = MODELS[name]
    g = torch.Generator().manual_seed(10_000 + seed)
    if spec.kind == "onehot":
        c, length = spec.input_shape
        idx = torch.randint(0, c, (batch, length), generator=g)
        return torch.nn.functional.one_hot(idx, c).permute(0, 2, 1).float().contiguous()
    return torch.randn((batch, *spec.input_shape), generator=g)


# --------------------------------------------------------------------------- export


def export(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike | None = None,
           dynamo: bool = False, optimize: bool = True) -> onnx.ModelProto:
    """Export ``model`` to ONNX with a dynamic batch axis named "batch".

    ``dynamo=False``: TorchScript exporter (deprecated in torch >= 2.9 but still there),
    opset 17, ``dynamic_axes``. ``dynamo=True``: the torch.export-based exporter at this
    torch's default opset (20 for torch 2.13), ``dynamic_shapes=({0: Dim("batch")},)``,
    ``external_data=False`` so every weight is an initializer of the returned proto.
    Use an example batch >= 2: torch.export specialises sizes 0 and 1.

    ``optimize=True`` (default) lets both exporters fold eval-mode BatchNorm into the
    preceding Conv (TorchScript: ``do_constant_folding``; dynamo: the onnxscript
    optimizer). ``optimize=False`` keeps ``BatchNormalization`` nodes, to test that op;
    the unoptimised dynamo graph also carries Shape/Expand/CastLike plumbing.

    Returns the ModelProto; also writes it (weights inline) to ``path`` if given.
    """
    model = model.eval()
    args = (example_input,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        if dynamo:
            prog = torch.onnx.export(
                model, args, dynamo=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                optimize=optimize, external_data=False, verbose=False, report=False,
            )
            proto = prog.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                model, args, buf, dynamo=False, opset_version=17,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=optimize, export_params=True,
            )
            proto = onnx.load_from_string(buf.getvalue())
    if path is not None:
        onnx.save_model(proto, os.fspath(path), save_as_external_data=False)
    return proto


def run_ort(proto: onnx.ModelProto, x: np.ndarray | torch.Tensor, **session_kw) -> np.ndarray:
    """Run the (single-input, single-output) model in onnxruntime on the CPU."""
    import onnxruntime as ort

    if isinstance(x, torch.Tensor):
        x = x.detach().numpy()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"], **session_kw)
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]

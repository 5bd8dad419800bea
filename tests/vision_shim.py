"""Test-only stand-in for the few torchvision names timm imports at module level.

Why: timm depends on torchvision, and every torchvision wheel available needs a newer
(CUDA) torch than the CPU torch 2.13.0 this project pins. timm is therefore installed
with ``pip install --no-deps timm``, and before ``import timm`` the tests call
``install()``, which registers placeholder ``torchvision`` modules. Only timm's data
pipeline (transforms, datasets) would use them, and those raise if called; the model
code needs nothing but ``FrozenBatchNorm2d``, given here. A real torchvision, if present,
is left alone. Never imported by liftir itself.
"""
from __future__ import annotations

import enum
import importlib.machinery
import sys
import types

import torch

_MODULES = ["torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
            "torchvision.transforms.functional", "torchvision.datasets", "torchvision.utils",
            "torchvision.models", "torchvision.models.feature_extraction"]


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: batch norm with fixed statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Placeholders(types.ModuleType):
    """A module whose every public name is a class that refuses to be instantiated."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(self, *args, **kwargs):
            raise RuntimeError(f"torchvision stand-in (tests/vision_shim.py): {name} is not available")
        return type(name, (), {"__init__": refuse})


def install() -> None:
    """Register the stand-in modules unless a real torchvision imports."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    mods = {name: _Placeholders(name) for name in _MODULES}
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    for name in ("torchvision.transforms.functional", "torchvision.transforms"):
        mods[name].InterpolationMode = InterpolationMode
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    for name, module in mods.items():
        module.__path__ = []
        # a spec, so that importlib.util.find_spec (transformers' availability probe) answers;
        # no distribution metadata, so transformers still sees no torchvision
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules.update(mods)

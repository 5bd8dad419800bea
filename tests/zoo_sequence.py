"""Recurrent classifiers and a small Enformer-style genomics model, random weights.

Beside tests/zoo_transformers.py (timm and transformers code), these are the sequence
families issue #9 asks for: LSTM and GRU classifiers, uni- and bidirectional, batch first,
with a Linear front on float features; and a conv + attention model on one-hot DNA in the
shape of Enformer (Avsec et al. 2021): a conv stem with pooling, a residual conv block,
pre-norm transformer blocks with multi-head self-attention, a pointwise head with a
Softplus per track. Everything is small (an export takes about a second) and seeded.

Each model ends in a *head* of modules Captum's DeepLift hooks (Linear, ReLU, Linear,
Softplus for Enformer) applied to one tensor, ``model.pool``'s output: there Captum's
``LayerDeepLift`` and liftir's ``layer=`` apply the same rules, so they can be compared
exactly (the trunks hold LSTM gates, LayerNorm, GELU and functional softmax, which Captum
back-propagates as plain gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

FEATURES, STEPS = 6, 10       # recurrent classifiers: (N, STEPS, FEATURES) float inputs
DNA_LENGTH = 128              # Enformer-style: (N, 4, DNA_LENGTH) one-hot


def _seed_(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights of a realistic scale (1/sqrt(fan-in)); norms near identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):  # non-trivial statistics
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.75 + 0.5 * torch.rand(m.running_var.shape, generator=g))
    return model.eval()


class LastStep(nn.Module):
    """The recurrent output at the last time step, (N, T, H) -> (N, H): a module, so that
    Captum's LayerDeepLift can name the tensor the head reads."""

    def forward(self, y):
        return y[:, -1]


class RecurrentClassifier(nn.Module):
    """Linear front -> LSTM / GRU (batch first) -> last step -> Linear, ReLU, Linear."""

    def __init__(self, kind: str, bidirectional: bool, hidden: int = 12, classes: int = 4,
                 features: int = FEATURES, front: int = 8):
        super().__init__()
        self.front = nn.Linear(features, front)
        self.rnn = getattr(nn, kind)(front, hidden, batch_first=True, bidirectional=bidirectional)
        self.pool = LastStep()
        width = hidden * (2 if bidirectional else 1)
        self.head = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        y, _ = self.rnn(self.front(x))
        return self.head(self.pool(y))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block (Enformer's): x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MeanOverPositions(nn.Module):
    def forward(self, x):  # (N, L, C) -> (N, C)
        return x.mean(dim=1)


class EnformerSmall(nn.Module):
    """One-hot DNA (N, 4, L) -> conv stem, GELU, max-pool 2 -> residual conv block with
    BatchNorm, max-pool 2 -> positional embedding + 2 attention blocks over L/4 positions ->
    mean over positions -> Linear, ReLU, Linear, Softplus: non-negative tracks."""

    def __init__(self, width: int = 32, heads: int = 4, blocks: int = 2, tracks: int = 3,
                 length: int = DNA_LENGTH):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(4, width, 15, padding=7), nn.GELU(), nn.MaxPool1d(2))
        self.tower = nn.Sequential(nn.BatchNorm1d(width), nn.GELU(), nn.Conv1d(width, width, 5, padding=2))
        self.down = nn.MaxPool1d(2)
        self.position = nn.Parameter(torch.zeros(1, length // 4, width))
        self.blocks = nn.Sequential(*[AttentionBlock(width, heads) for _ in range(blocks)])
        self.pool = MeanOverPositions()
        self.head = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, tracks), nn.Softplus())

    def forward(self, x):
        h = self.stem(x)
        h = self.down(h + self.tower(h))
        h = self.blocks(h.transpose(1, 2) + self.position)
        return self.head(self.pool(h))


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    onehot: bool = False  # DNA (N, 4, L) instead of (N, STEPS, FEATURES) floats
    text: bool = False    # float inputs only (zoo_transformers.export reads this)

    def inputs(self, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if self.onehot:
            idx = torch.randint(0, 4, (n, DNA_LENGTH), generator=g)
            return (nn.functional.one_hot(idx, 4).permute(0, 2, 1).float().contiguous(),)
        return (torch.randn((n, STEPS, FEATURES), generator=g),)

    def input_names(self) -> list[str]:
        return ["input"]


MODELS: dict[str, Spec] = {
    "lstm": Spec(lambda: RecurrentClassifier("LSTM", False)),
    "lstm_bi": Spec(lambda: RecurrentClassifier("LSTM", True)),
    "gru": Spec(lambda: RecurrentClassifier("GRU", False)),
    "gru_bi": Spec(lambda: RecurrentClassifier("GRU", True)),
    "enformer_small": Spec(EnformerSmall, onehot=True),
}


def build(name: str, seed: int = 0) -> nn.Module:
    return _seed_(MODELS[name].build(), seed)


seed_ = _seed_  # for the benchmarks' larger configurations


def head_input(proto, model: nn.Module) -> str:
    """The ONNX tensor ``model.head`` reads (``model.pool``'s output), found by the head's
    first weight matrix (stored as W or as its transpose, by either exporter)."""
    from onnx import numpy_helper
    w = model.head[0].weight.detach().numpy()
    names = {i.name for i in proto.graph.initializer
             if (a := numpy_helper.to_array(i)).shape in (w.shape, w.T.shape) and
             (np.array_equal(a, w) or np.array_equal(a, w.T))}
    for node in proto.graph.node:
        if node.op_type in ("Gemm", "MatMul") and node.input[1] in names:
            return node.input[0]
    raise LookupError("no Gemm/MatMul reads the head's first weight")

"""Real transformer architectures, small and randomly initialised, for the tests.

The model code is the real thing (timm's ViT, ConvNeXt, MLP-Mixer and Swin; Hugging Face
transformers' BERT and GPT-2), with configurations small enough that an export takes a
second and a forward milliseconds. Nothing is downloaded: every weight is drawn from a
seeded generator. These exports are where the batch axis leaves axis 0 (attention's
(L, N, E) layout, timm's qkv permute, Swin's window partition, GPT-2's (N*T, E)
flattening) and where inputs are token ids (BERT, GPT-2, Llama).

timm must be installed with ``pip install --no-deps timm`` (its torchvision dependency
needs a newer CUDA torch than the pinned CPU one); ``vision_shim.install()`` stands in
for the torchvision names it imports.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

IMAGE = (3, 32, 32)
VOCAB, SEQ = 100, 8
EXPORTS = ("ts14", "ts17", "dynamo")  # TorchScript exporter at opset 14 / 17, torch.export-based


def _seed_(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights of a realistic scale, LayerNorm affine parameters included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name or "LayerNorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(max(fan_in, 1)))
    return model.eval()


def _timm():
    import vision_shim
    vision_shim.install()
    import timm  # noqa: F401
    return timm


def vit() -> nn.Module:
    _timm()
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=10)


def deit() -> nn.Module:
    """DeiT: a ViT with a distillation token beside the class token."""
    _timm()
    from timm.models.deit import VisionTransformerDistilled
    return VisionTransformerDistilled(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                                      num_classes=10)


def convnext() -> nn.Module:
    _timm()
    from timm.models.convnext import ConvNeXt
    return ConvNeXt(num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 16, 24))


def mixer() -> nn.Module:
    _timm()
    from timm.models.mlp_mixer import MlpMixer
    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=48, num_classes=10)


def swin() -> nn.Module:
    _timm()
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=10)


class TorchMHA(nn.Module):
    """torch.nn.MultiheadAttention (batch_first=False inside, as torchvision's ViT calls
    it through its encoder): the batch moves to axis 1, (L, N, E)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x: (N, L, 12)
        h = self.embed(x).transpose(0, 1)  # (L, N, E)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(dim=0))


class BertClassifier(nn.Module):
    """transformers' BertForSequenceClassification returning its logits."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=32,
                            num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.model = BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class GPT2NextToken(nn.Module):
    """transformers' GPT2LMHeadModel: the logits of the token after the last one."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -1]


class LlamaNextToken(nn.Module):
    """transformers' LlamaForCausalLM (rotary position embeddings, grouped-query attention,
    RMSNorm, SiLU gates, causal mask): the logits of the token after the last one."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                             attention_dropout=0.0)
        self.model = LlamaForCausalLM(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -1]


class BagOfEmbeddings(nn.Module):
    """A text classifier with DeepLIFT rules for every op: ids -> embedding -> mean -> MLP."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(20, 6)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(dim=1))))


def bag_of_embeddings() -> tuple[nn.Module, onnx.ModelProto]:
    """The bag-of-embeddings classifier and its TorchScript export (ids (batch, seq) -> logits)."""
    model = BagOfEmbeddings().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 5, dtype=torch.int64),), buf, dynamo=False, opset_version=17,
                          input_names=["ids"], output_names=["logits"],
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}})
    return model, onnx.load_from_string(buf.getvalue())


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    text: bool = False  # inputs (input_ids, attention_mask) instead of an image

    def inputs(self, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if self.build is TorchMHA:
            return (torch.randn((n, 6, 12), generator=g),)
        if self.text:
            ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
            mask = torch.ones((n, SEQ), dtype=torch.int64)
            mask[0, -2:] = 0  # one padded sample
            return ids, mask
        return (torch.randn((n,) + IMAGE, generator=g),)

    def input_names(self) -> list[str]:
        if self.text:
            return ["input_ids", "attention_mask"]
        return ["input"]


MODELS: dict[str, Spec] = {
    "vit": Spec(vit), "deit": Spec(deit), "convnext": Spec(convnext), "mixer": Spec(mixer),
    "swin": Spec(swin), "torch_mha": Spec(TorchMHA),
    "bert": Spec(BertClassifier, text=True), "gpt2": Spec(GPT2NextToken, text=True),
    "llama": Spec(LlamaNextToken, text=True),
}


def build(name: str, seed: int = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _seed_(MODELS[name].build(), seed)


def export(model: nn.Module, spec: Spec, how: str) -> onnx.ModelProto:
    """ONNX export with a dynamic batch axis (and, for text, a dynamic sequence axis).

    how: "ts14" / "ts17" (TorchScript exporter, that opset) or "dynamo" (torch.export).
    """
    names = spec.input_names()
    example = spec.inputs(2, seed=123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=64)
            dims = {0: batch, 1: torch.export.Dim("seq", min=2, max=32)} if spec.text else {0: batch}
            prog = torch.onnx.export(model, example, dynamo=True, input_names=names, output_names=["logits"],
                                     dynamic_shapes=tuple(dims for _ in names), external_data=False,
                                     verbose=False, report=False)
            return prog.model_proto
        axes = {n: ({0: "batch", 1: "seq"} if spec.text else {0: "batch"}) for n in names}
        axes["logits"] = {0: "batch"}
        buf = io.BytesIO()
        torch.onnx.export(model, example, buf, dynamo=False, opset_version=int(how[2:]), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue())


# --------------------------------------------------------------------------- test-only rules
def gradient_layer_norm():
    """A gradient-only LayerNormalization rule for saliency / integrated gradients, plugged
    in with ``rules=`` until liftir has a DeepLIFT rule for the op (then tests use that)."""
    from liftir.rule import Rule

    class GradientLayerNorm(Rule):
        modes = ("gradient",)

        def _axes(self, ctx, ndim):
            axis = ctx.attr("axis", -1) % ndim
            return tuple(range(axis, ndim))

        def _normalized(self, ctx, x):
            axes = self._axes(ctx, x.ndim)
            mean = x.mean(axis=axes, keepdims=True)
            centered = x - mean
            inv = 1 / ctx.xp.sqrt((centered * centered).mean(axis=axes, keepdims=True) + ctx.attr("epsilon", 1e-5))
            return centered * inv, inv

        def forward(self, ctx, x, scale, bias=None):
            z, _ = self._normalized(ctx, x)
            y = z * scale
            return (y + bias if bias is not None else y).astype(x.dtype, copy=False)

        def backward(self, ctx, g, *unused):
            x = ctx.x(0)
            z, inv = self._normalized(ctx, x)
            axes = tuple(a + 1 for a in self._axes(ctx, x.ndim))
            gz = g * ctx.input_value(1)
            gx = inv * (gz - gz.mean(axis=axes, keepdims=True) - z * (gz * z).mean(axis=axes, keepdims=True))
            return gx.astype(g.dtype, copy=False), None, None

    return GradientLayerNorm()


def gradient_where():
    """A gradient-only Where rule (the condition is held; each branch gets the multiplier
    where it is selected), for saliency on attention masks until liftir has one."""
    from liftir.rule import Rule, unbroadcast

    class GradientWhere(Rule):
        modes = ("gradient",)

        def forward(self, ctx, cond, a, b):
            return ctx.xp.where(cond, a, b)

        def backward(self, ctx, g):
            xp = ctx.xp
            cond = ctx.input_value(0) if ctx.is_const(0) else ctx.x(0)
            ga = None if ctx.is_const(1) else unbroadcast(xp, xp.where(cond, g, 0), ctx.input_shape(1))
            gb = None if ctx.is_const(2) else unbroadcast(xp, xp.where(cond, 0, g), ctx.input_shape(2))
            return None, ga, gb

    return GradientWhere()


def stand_in_rules(registry_lookup=None) -> dict:
    """Test-only rules for ops liftir's registry does not serve yet (only those)."""
    from liftir.registry import lookup
    rules = {}
    for op, make in (("LayerNormalization", gradient_layer_norm), ("Where", gradient_where)):
        if lookup(op, "", 17) is None:
            rules[op] = make()
    return rules


def gradient_div():
    """A gradient-only Div rule that also divides by activations (opset-14 LayerNorm
    decompositions), for saliency on those exports."""
    from liftir.rule import Rule, unbroadcast

    class GradientDiv(Rule):
        modes = ("gradient",)

        def forward(self, ctx, a, b):
            return a / b

        def backward(self, ctx, g):
            xp = ctx.xp
            a = ctx.input_value(0) if ctx.is_const(0) else ctx.x(0)
            b = ctx.input_value(1) if ctx.is_const(1) else ctx.x(1)
            ga = None if ctx.is_const(0) else unbroadcast(xp, g / b, ctx.input_shape(0))
            gb = None if ctx.is_const(1) else unbroadcast(xp, -g * a / (b * b), ctx.input_shape(1))
            return ga, gb

    return GradientDiv()


_EXPORTED: dict = {}


def exported(name: str, how: str):
    """(model, export) of a zoo model, built once per process and exported once per test
    session: the exports (dynamo's above all, seconds each) are shared by every test module
    and worker (tests/export_cache.py)."""
    if (name, how) not in _EXPORTED:
        from export_cache import export_once
        model = build(name)
        _EXPORTED[name, how] = (model, export_once(__name__, name, how, lambda: export(model, MODELS[name], how)))
    return _EXPORTED[name, how]

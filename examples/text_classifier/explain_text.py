"""Which words drove a text classifier's score? Token-id inputs with liftir.

A tiny BERT (transformers' BertForSequenceClassification, random weights: nothing is
downloaded) is exported to ONNX with token ids and an attention mask as int64 inputs.
liftir holds integer inputs as given and attributes to the float tensors computed
directly from them: the word-embedding lookup (N, T, E), like Captum's
LayerIntegratedGradients / LayerDeepLift on the embedding layer. The reference gives its
own ids (here every word replaced by [PAD], [CLS] and [SEP] kept), and DeepLIFT's
summation-to-delta holds against f(actual ids) - f(reference ids). Summing an embedding's
attribution over its E features gives one score per token.

    python examples/text_classifier/explain_text.py [--out DIR]
"""
from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import liftir
from liftir.registry import lookup

WORDS = ["[PAD]", "[CLS]", "[SEP]", "the", "a", "movie", "film", "plot", "was", "is", "very", "not",
         "good", "bad", "great", "boring", "fun", "acting", "and", "but", "too", "long"]
SENTENCES = ["the movie was very good", "the plot is boring and too long",
             "great acting but bad plot", "a fun film"]


def encode(sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] words [SEP], padded with [PAD]; the mask is 0 on padding."""
    rows = [[1] + [WORDS.index(w) for w in s.split()] + [2] for s in sentences]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, (ids != 0).astype(np.int64)


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=len(WORDS), max_position_embeddings=32, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            attn_implementation="eager", initializer_range=0.5)  # mask added to the scores, then softmax
        torch.manual_seed(0)
        self.bert = BertForSequenceClassification(config).eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def export(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> onnx.ModelProto:
    buf = io.BytesIO()
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), buf, dynamo=False,
                          opset_version=17, input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def gradient_layer_norm():
    """liftir has no LayerNormalization rule yet on this branch: a gradient-only one, passed with
    rules=, serves saliency (DeepLIFT then waits for the built-in rule)."""
    from liftir.rule import Rule

    class GradientLayerNorm(Rule):
        modes = ("gradient",)

        def forward(self, ctx, x, scale, bias=None):
            axes = tuple(range(ctx.attr("axis", -1) % x.ndim, x.ndim))
            z = x - x.mean(axis=axes, keepdims=True)
            z = z / ctx.xp.sqrt((z * z).mean(axis=axes, keepdims=True) + ctx.attr("epsilon", 1e-5))
            return z * scale + (0 if bias is None else bias)

        def backward(self, ctx, g, *unused):
            x = ctx.x(0)
            axes = tuple(range(ctx.attr("axis", -1) % x.ndim, x.ndim))
            z = x - x.mean(axis=axes, keepdims=True)
            inv = 1 / ctx.xp.sqrt((z * z).mean(axis=axes, keepdims=True) + ctx.attr("epsilon", 1e-5))
            z = z * inv
            gz = g * ctx.input_value(1)
            k_axes = tuple(a + 1 for a in axes)
            gx = inv * (gz - gz.mean(axis=k_axes, keepdims=True) - z * (gz * z).mean(axis=k_axes, keepdims=True))
            return gx, None, None

    return GradientLayerNorm()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    ids, mask = encode(SENTENCES)
    model = Classifier()
    proto = export(model, ids, mask)
    reference = np.where(ids > 2, 0, ids)  # every word -> [PAD]; [CLS], [SEP], padding kept
    feeds = {"input_ids": ids, "attention_mask": mask}
    results: dict = {}

    rule = lookup("LayerNormalization", "", 17)
    has_deeplift = rule is not None and rule.supports("deeplift")
    stand_in = {} if rule is not None else {"LayerNormalization": gradient_layer_norm()}
    ex = liftir.Explainer(proto, method="saliency", rules=stand_in)
    word = ex.attributed[0]
    print(f"attributed at {word!r} (the word embeddings) and {len(ex.attributed) - 1} float mask tensor(s)")
    grads = ex.attribute(feeds, target=1)[word]  # (N, T, E) gradients at the embedding
    # gradient x (embedding - reference embedding) per token: the first-order estimate
    with torch.no_grad():
        table = model.bert.bert.embeddings.word_embeddings.weight.numpy()
    per_token = (grads * (table[ids] - table[reference])).sum(axis=2)
    # saliency must equal torch's gradient at the same tensor
    store = {}
    emb = model.bert.bert.embeddings.word_embeddings
    handle = emb.register_forward_hook(lambda m, a, out: (out.retain_grad(), store.update(e=out)) and None)
    model(torch.from_numpy(ids), torch.from_numpy(mask))[:, 1].sum().backward()
    handle.remove()
    torch_grad = store["e"].grad.numpy()
    results["saliency_vs_torch_max_rel_diff"] = float(np.abs(grads - torch_grad).max() / np.abs(torch_grad).max())
    print(f"saliency at the embedding vs torch.autograd: max rel diff {results['saliency_vs_torch_max_rel_diff']:.1e}")

    if has_deeplift:
        dl = liftir.Explainer(proto)
        attr, delta = dl.attribute(feeds, baselines={"input_ids": reference}, target=1,
                                   return_convergence_delta=True)
        per_token = attr[word].sum(axis=2)
        sess = onnxruntime.InferenceSession(proto.SerializeToString())
        diff = sess.run(None, feeds)[0][:, 1] - sess.run(None, {"input_ids": reference,
                                                                 "attention_mask": mask})[0][:, 1]
        total = sum(a.reshape(len(ids), -1).sum(axis=1) for a in attr.values())
        results["deeplift_max_abs_delta"] = float(np.abs(delta).max())
        results["deeplift_sum_vs_f_ids_minus_f_ref"] = float(np.abs(total - diff).max())
        print(f"DeepLIFT: summation-to-delta max |delta| {results['deeplift_max_abs_delta']:.1e} "
              f"against f(ids) - f([PAD] ids)")
    else:
        print("DeepLIFT: liftir's registry has no LayerNormalization rule yet; showing gradient x "
              "(embedding - reference embedding) instead")

    for s, row, r in zip(SENTENCES, per_token, ids):
        tokens = [WORDS[t] for t in r if t != 0]
        print("  " + "  ".join(f"{t}:{v:+.2g}" for t, v in zip(tokens, row)))
    results["per_token"] = {s: [float(v) for v in row[: len(s.split()) + 2]] for s, row in zip(SENTENCES, per_token)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

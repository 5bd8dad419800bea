"""DeepLIFT paper, section 3.2: DeepLIFT finds both motifs, gradient x input misses GATA.

Steps (all on the CPU, no download):

1. Simulate the two-motif task (simulate.py): positives hold a GATA and a CAGATG
   (TAL1 E-box) instance, negatives only one of the two, once or twice.
2. Train the paper's CNN in PyTorch: Conv1d(4 -> 20, width 15) -> PReLU ->
   MaxPool1d(50, 50) -> Linear 200 -> PReLU -> Linear 200 -> PReLU -> Linear 1 ->
   Sigmoid; Adam, 7 epochs on 40 000 sequences (with 8 000 the network memorizes them
   before it finds the motifs). (The paper used Keras; it does not say how the
   convolution was padded. We pad it to length 200 so that the pool's four windows
   cover the whole sequence: with 'valid' padding, a 186-long output pooled by 50
   drops the last 36 positions, and motifs there would be invisible to the model.)
3. Export to ONNX (Sigmoid included) and apply the paper's section 2.6 weight
   normalization to the one-hot input (liftir.canonize.normalize_constrained_inputs):
   every filter's weights become mean-free over the four bases at each tap. On one-hot
   input the outputs do not change; we check this with onnxruntime.
4. Test auROC (the paper reports 0.907 for its simulation).
5. On the correctly predicted test positives: DeepLIFT (reference: all zeros after the
   weight normalization, as in the paper; explaining the Sigmoid's input, paper 2.4)
   against gradient x input. Per-position scores are summed over bases; the
   motif-recovery auROC (score.py) ranks the positions inside GATA (or TAL1) instances
   against the background positions.
6. Bonus: DeepLIFT averaged over dinucleotide-shuffled references
   (liftir.genomics.dinucleotide_shuffle, method="deeplift_shap").

Writes model.pt, model.onnx, model_normalized.onnx, results.json and logo_*.png into --out.

Usage: ``python examples/genomics/train_and_explain.py [--out DIR] [--quick]``
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import liftir
from liftir.canonize import normalize_constrained_inputs
from liftir.genomics import dinucleotide_shuffle
from liftir.plots import dna_logo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from score import auroc, motif_auroc  # noqa: E402
from simulate import simulate  # noqa: E402

INPUT, OUTPUT = "sequence", "probability"


class PaperCNN(nn.Module):
    """Section 3.2's network on one-hot (N, 4, 200) DNA."""

    def __init__(self, length: int = 200, filters: int = 20, width: int = 15,
                 pool: int = 50, hidden: int = 200):
        super().__init__()
        self.conv = nn.Conv1d(4, filters, width, padding=width // 2)
        self.act1 = nn.PReLU(filters)
        self.pool = nn.MaxPool1d(pool, pool)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(filters * (length // pool), hidden)
        self.act2 = nn.PReLU(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act3 = nn.PReLU(hidden)
        self.fc3 = nn.Linear(hidden, 1)
        self.out = nn.Sigmoid()

    def logits(self, x):
        h = self.flatten(self.pool(self.act1(self.conv(x))))
        return self.fc3(self.act3(self.fc2(self.act2(self.fc1(h)))))

    def forward(self, x):
        return self.out(self.logits(x))


def train(model, x, y, epochs: int, seed: int, batch: int = 128, lr: float = 3e-3,
          weight_decay: float = 0.0):
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))[:, None]
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt))
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model.logits(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: training loss {total / len(xt):.4f}")
    return model.eval()


def export_onnx(model: nn.Module, example: np.ndarray) -> onnx.ModelProto:
    """TorchScript exporter, opset 17, dynamic batch (as tests/zoo.py's export)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.from_numpy(example),), buf, dynamo=False,
                          opset_version=17, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT: x})[0]


def per_sample_shap(model, x: np.ndarray, shuffles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """method="deeplift_shap" with each sequence's own shuffles as its reference distribution.

    Explainer.attribute takes one distribution (B, ...) for the whole batch, so each
    sequence is explained in a call of its own.
    """
    ex = liftir.Explainer(model, method="deeplift_shap")
    attrs, deltas = [], []
    for i in range(len(x)):
        a, d = ex.attribute(x[i:i + 1], baselines=shuffles[i], return_convergence_delta=True)
        attrs.append(a)
        deltas.append(d)
    return np.concatenate(attrs), np.concatenate(deltas)


def plot_logos(x, scores: dict, positions, test_index, out: str) -> list[str]:
    """For each sequence: one logo per method stacked (DeepLIFT on top), as Figure 3.

    logo_<k>.png shows the whole sequence, logo_<k>_zoom.png each motif instance +- 8 bp.
    """
    import matplotlib.figure  # noqa: PLC0415

    paths = []
    for i, seq_id in enumerate(test_index):
        rank = i
        fig = matplotlib.figure.Figure(figsize=(20, 2.3 * len(scores)), layout="constrained")
        axes = fig.subplots(len(scores), 1)
        spans = [(s, e) for _, s, e in positions[i]]
        labels = ", ".join(f"{name} {s}-{e - 1}" for name, s, e in positions[i])
        for ax, (name, a) in zip(axes, scores.items()):
            dna_logo(a[i].T, onehot=x[i].T, highlight=spans, ax=ax, ylabel="score",
                     title=f"{name}: test sequence {seq_id} (embedded motifs shaded: {labels})")
        path = os.path.join(out, f"logo_{rank}.png")
        fig.savefig(path, dpi=90)
        paths.append(path)
        # A zoom on each motif instance, the letters large enough to read.
        fig = matplotlib.figure.Figure(figsize=(5.0 * len(spans), 2.1 * len(scores)),
                                       layout="constrained")
        axes = fig.subplots(len(scores), len(spans), squeeze=False)
        for col, (name_m, s, e) in enumerate(positions[i]):
            lo, hi = max(0, s - 8), min(x.shape[2], e + 8)
            for row, (name, a) in enumerate(scores.items()):
                dna_logo(a[i, :, lo:hi].T, onehot=x[i, :, lo:hi].T, start=lo, highlight=[(s, e)],
                         ax=axes[row, col], ylabel="score", title=f"{name}: {name_m} at {s}-{e - 1}")
        fig.suptitle(f"test sequence {seq_id}: the embedded motif instances (shaded) +- 8 bp")
        path = os.path.join(out, f"logo_{rank}_zoom.png")
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--quick", action="store_true",
                        help="small run for the tests: 2000/500 sequences, 2 epochs")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-shap", type=int, default=None,
                        help="sequences explained with shuffled references (default 200, quick 20)")
    parser.add_argument("--n-shuffles", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true",
                        help="load the weights of an earlier run (OUT/model.pt) instead of training")
    args = parser.parse_args(argv)
    n_train = args.n_train or (2000 if args.quick else 40000)
    n_test = args.n_test or (500 if args.quick else 2000)
    epochs = args.epochs or (2 if args.quick else 7)
    n_shap = args.n_shap or (20 if args.quick else 200)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    results: dict = {"paper": {"test_auroc": 0.907}}

    # 1. data, channels first for Conv1d: (N, 4, 200)
    x_all, y_all, pos_all = simulate(n_train + n_test, seed=args.seed)
    x_all = np.ascontiguousarray(x_all.transpose(0, 2, 1))
    x_tr, y_tr = x_all[:n_train], y_all[:n_train]
    x_te, y_te, pos_te = x_all[n_train:], y_all[n_train:], pos_all[n_train:]
    print(f"simulated {n_train} training and {n_test} test sequences of length {x_all.shape[2]}")

    # 2. train
    t0 = time.perf_counter()
    weights = os.path.join(args.out, "model.pt")
    loaded = args.reuse and os.path.exists(weights)
    if loaded:
        model = PaperCNN(length=x_all.shape[2])
        model.load_state_dict(torch.load(weights))
        model.eval()
        print("loaded", weights)
    else:
        model = train(PaperCNN(length=x_all.shape[2]), x_tr, y_tr, epochs, args.seed)
        torch.save(model.state_dict(), weights)
    results["train_seconds"] = round(time.perf_counter() - t0, 1)

    # 3. export, normalize, check
    onnx_model = export_onnx(model, x_te[:2])
    normalized = normalize_constrained_inputs(onnx_model, INPUT, group_axis=1, total=1.0)
    onnx.save(onnx_model, os.path.join(args.out, "model.onnx"))
    onnx.save(normalized, os.path.join(args.out, "model_normalized.onnx"))
    p_torch = model(torch.from_numpy(x_te)).detach().numpy()[:, 0]
    p_onnx = run_ort(onnx_model, x_te)[:, 0]
    p_norm = run_ort(normalized, x_te)[:, 0]
    results["max_abs_diff_torch_vs_onnx"] = float(np.abs(p_torch - p_onnx).max())
    results["max_abs_diff_onnx_vs_normalized"] = float(np.abs(p_onnx - p_norm).max())
    print(f"ONNX export vs torch: max |diff| = {results['max_abs_diff_torch_vs_onnx']:.2e}; "
          f"after 2.6 weight normalization: max |diff| = "
          f"{results['max_abs_diff_onnx_vs_normalized']:.2e}")
    if results["max_abs_diff_onnx_vs_normalized"] > 1e-4:
        print("ERROR: weight normalization changed the model's outputs")
        return 1

    # 4. accuracy
    results["test_auroc"] = auroc(p_norm[y_te == 1], p_norm[y_te == 0])
    results["test_accuracy"] = float(((p_norm > 0.5) == (y_te == 1)).mean())
    print(f"test auROC {results['test_auroc']:.3f} (paper: 0.907), "
          f"accuracy {results['test_accuracy']:.3f}")

    # 5. attributions on the correctly predicted positives
    keep = np.flatnonzero((y_te == 1) & (p_norm > 0.5))
    results["explained"] = "correctly predicted positives"
    if len(keep) < 20:  # an undertrained model (--quick): take the best-scored positives
        positives = np.flatnonzero(y_te == 1)
        keep = np.sort(positives[np.argsort(-p_norm[positives])[:50]])
        results["explained"] = "the 50 positives with the highest predicted probability"
    xs, pos = x_te[keep], [pos_te[i] for i in keep]
    results["n_explained"] = int(len(keep))
    print(f"explaining {len(keep)} {results['explained']} (the logit of the Sigmoid)")
    scores, timings = {}, {}
    t0 = time.perf_counter()
    dl, delta = liftir.Explainer(normalized, method="deeplift").attribute(
        xs, baselines=np.zeros_like(xs[:1]), return_convergence_delta=True, batch_size=256)
    timings["deeplift"] = time.perf_counter() - t0
    scores["DeepLIFT (zero reference, normalized weights)"] = dl
    results["deeplift_max_abs_delta"] = float(np.abs(delta).max())
    t0 = time.perf_counter()
    gxi = liftir.Explainer(onnx_model, method="input_x_gradient").attribute(xs, batch_size=256)
    timings["input_x_gradient"] = time.perf_counter() - t0
    scores["gradient x input"] = gxi
    gxi_norm = liftir.Explainer(normalized, method="input_x_gradient").attribute(xs, batch_size=256)
    scores["gradient x input (normalized weights)"] = gxi_norm

    # 6. bonus: dinucleotide-shuffled references
    m = min(n_shap, len(xs))
    shuffles = dinucleotide_shuffle(xs[:m], n_shuffles=args.n_shuffles, seed=args.seed, axis=-2)
    t0 = time.perf_counter()
    shap, shap_delta = per_sample_shap(normalized, xs[:m], shuffles)
    timings["deeplift_shap"] = time.perf_counter() - t0
    results["deeplift_shap_max_abs_delta"] = float(np.abs(shap_delta).max())
    # Cross-check: the same average from plain DeepLIFT with per-sample references, each
    # sequence repeated once per shuffle.
    c = min(m, 20)
    tiled = liftir.Explainer(normalized, method="deeplift").attribute(
        np.repeat(xs[:c], args.n_shuffles, axis=0), baselines=shuffles[:c].reshape((-1,) + xs.shape[1:]))
    tiled = tiled.reshape((c, args.n_shuffles) + xs.shape[1:]).mean(axis=1)
    results["deeplift_shap_vs_tiled_deeplift_max_abs_diff"] = float(np.abs(tiled - shap[:c]).max())
    results["deeplift_shap_sequences"] = m
    results["deeplift_shap_shuffles"] = args.n_shuffles

    rows = {}
    for name, a in scores.items():
        per_pos = a.sum(axis=1)  # sum over bases: (N, L)
        rows[name] = {"abs": motif_auroc(per_pos, pos, use_abs=True),
                      "signed": motif_auroc(per_pos, pos, use_abs=False)}
    shap_name = f"DeepLIFT, {args.n_shuffles} dinucleotide shuffles (first {m} seqs)"
    shap_rows = {}
    for name, a in ((f"DeepLIFT zero ref. (same {m} seqs)", dl[:m]),
                    (f"gradient x input (same {m} seqs)", gxi[:m]), (shap_name, shap)):
        per_pos = a.sum(axis=1)
        shap_rows[name] = {"abs": motif_auroc(per_pos, pos[:m], use_abs=True),
                           "signed": motif_auroc(per_pos, pos[:m], use_abs=False)}
    results["motif_auroc"] = rows
    results["motif_auroc_shuffled_refs"] = shap_rows

    print("\nmotif recovery: auROC of motif positions vs background, per-position score "
          "(sum over bases)")
    print(f"{'method':<58}{'GATA |s|':>9}{'TAL1 |s|':>9}{'GATA s':>8}{'TAL1 s':>8}")
    for table in (rows, shap_rows):
        for name, r in table.items():
            print(f"{name:<58}{r['abs']['GATA']:>9.3f}{r['abs']['TAL1']:>9.3f}"
                  f"{r['signed']['GATA']:>8.3f}{r['signed']['TAL1']:>8.3f}")
    print(f"\nsummation to delta: DeepLIFT max |delta| = {results['deeplift_max_abs_delta']:.2e}, "
          f"DeepLIFT with shuffled references max |delta| = "
          f"{results['deeplift_shap_max_abs_delta']:.2e}; deeplift_shap vs averaged per-reference "
          f"deeplift: max |diff| = {results['deeplift_shap_vs_tiled_deeplift_max_abs_diff']:.1e}")
    results["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    trained = "weights loaded (--reuse)" if loaded else f"training {results['train_seconds']} s"
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()) + f" ({trained})")

    # logos: the sequences where DeepLIFT's and gradient x input's GATA recovery differ most
    plot_scores = {"DeepLIFT": dl, "gradient x input": gxi}
    picks = _pick_examples(xs, dl.sum(axis=1), gxi.sum(axis=1), pos, k=2)
    picked = [int(keep[i]) for i in picks]
    paths = plot_logos(xs[picks], {k: v[picks] for k, v in plot_scores.items()},
                       [pos[i] for i in picks], picked, args.out)
    results["logo_sequences_test_index"] = picked
    for p in paths:
        print("wrote", p)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print("wrote", os.path.join(args.out, "results.json"),
          f"(total {results['total_seconds']} s)")
    return 0


def _pick_examples(x: np.ndarray, dl_pos: np.ndarray, gxi_pos: np.ndarray, positions,
                   k: int) -> list[int]:
    """Clear cases: one GATA and one TAL1 instance, both holding their consensus core.

    Among them, the sequence where DeepLIFT's GATA signal (relative to the sequence's
    largest score) most exceeds gradient x input's, and a typical (median) one.
    """
    from liftir.genomics import decode  # noqa: PLC0415

    gains = []
    for i, recs in enumerate(positions):
        if sorted(r[0] for r in recs) != ["GATA", "TAL1"]:
            continue
        text = {name: decode(x[i, :, s:e].T) for name, s, e in recs}
        if "GATA" not in text["GATA"] or "CAGATG" not in text["TAL1"]:
            continue
        (s, e), = [(s, e) for name, s, e in recs if name == "GATA"]
        rel = [np.abs(a[i, s:e]).max() / (np.abs(a[i]).max() + 1e-12) for a in (dl_pos, gxi_pos)]
        gains.append((rel[0] - rel[1], i))
    if not gains:
        return [0]
    gains.sort(reverse=True)
    chosen = [gains[0][1], gains[len(gains) // 2][1]]
    return list(dict.fromkeys(chosen))[:k]


if __name__ == "__main__":
    sys.exit(main())

"""An All-Convolutional network on scikit-learn's digits, explained four ways.

Springenberg et al. (2014), "Striving for Simplicity: The All Convolutional Net": a
network of convolutions only -- strided convolutions instead of max-pooling, ReLU, a 1x1
convolution to the 10 classes and global average pooling. Their section 3.4 compares
three backward passes that differ only at the ReLUs:

* saliency (the plain gradient): masked where the ReLU's *input* was negative;
* deconvnet: masked where the *backward signal* is negative;
* guided backpropagation: masked by both.

DeepLIFT (Shrikumar et al. 2016) instead divides each ReLU's output difference from a
reference (here the blank image, all zeros) by its input difference.

Steps: load the network's trained weights (shipped next to this script,
all_conv_digits_weights.npz: 60 epochs on the 8x8 digits upsampled to 16x16 so the maps are
less blocky; no download: the data ship with scikit-learn; ``--train`` retrains them, which
takes minutes and whose accuracy depends on the machine's kernels), export to ONNX (logits
output), report test accuracy, check liftir against Captum run in float64 on the same torch
module, then draw

* methods.png: each method's map for a few test digits (explaining the predicted class);
* neuron.png: one unit of an intermediate layer, as in the paper's Figure 3 -- the test
  images that excite it most and the guided backpropagation (and deconvnet) of that unit
  alone, obtained with ``output=<hidden tensor>`` and a tuple target (channel, i, j);
* maxpool_deconvnet.png (optional, ``--maxpool``): the trained network with a 2x2
  max-pool inserted after training, where deconvnet routes its signal through the
  pooling "switches" (the argmax of each window).

Usage: ``python examples/all_conv/all_conv_digits.py [--out DIR] [--maxpool] [--train [--epochs N]]``
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
from sklearn.datasets import load_digits
from torch import nn

import liftir
from liftir.plots import image_heatmaps

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_WEIGHTS = os.path.join(HERE, "all_conv_digits_weights.npz")
INPUT, OUTPUT = "image", "logits"
METHODS = ("saliency", "deconvnet", "guided_backprop", "deeplift")


class AllConv(nn.Module):
    """All-CNN style: 3x3 convs, stride-2 convs for downsampling, 1x1 conv, global average."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),                   # 16x16
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.ReLU(),         # 8x8  (replaces pooling)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),               # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),  # 4x4  (replaces pooling)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),           # 4x4
            nn.Conv2d(2 * w, 2 * w, 1), nn.ReLU(),                      # 1x1 conv
            nn.Conv2d(2 * w, classes, 1),                               # 1x1 conv to the classes
        )
        self.pool = nn.AdaptiveAvgPool2d(1)                             # global average pooling
        self.flatten = nn.Flatten()

    def forward(self, x):
        return self.flatten(self.pool(self.features(x)))


def load_data(seed: int, size: int = 16):
    """Digits scaled to [0, 1], upsampled to size x size; 75/25 stratified split."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.numpy()
    return train_test_split(x, d.target.astype(np.int64), test_size=0.25, random_state=seed,
                            stratify=d.target)


def train(model, x, y, epochs: int, seed: int, batch: int = 64, lr: float = 3e-3):
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(xt) // batch))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            xb = xt[idx]
            # light augmentation: shift by up to one pixel
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,)))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"  epoch {epoch + 1}/{epochs}: training loss {total / len(xt):.4f}")
    return model.eval()


def save_weights(model: nn.Module, path: str) -> None:
    """The state dict as plain float32 arrays (.npz: nothing pickled, loads anywhere)."""
    np.savez_compressed(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})


def load_weights(model: nn.Module, path: str) -> nn.Module:
    with np.load(path, allow_pickle=False) as arrays:
        state = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    model.load_state_dict(state)
    return model.eval()


def export_onnx(model: nn.Module, example: np.ndarray) -> onnx.ModelProto:
    """TorchScript exporter (opset 17, dynamic batch): its tensor names follow the modules."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.from_numpy(example),), buf, dynamo=False,
                          opset_version=17, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def relu_outputs(model: onnx.ModelProto) -> list[str]:
    """Names of the ReLU output tensors, in graph order."""
    return [n.output[0] for n in model.graph.node if n.op_type == "Relu"]


def run_ort(model: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    if outputs:  # expose hidden tensors as extra outputs
        model = onnx.ModelProto.FromString(model.SerializeToString())
        have = {o.name for o in model.graph.output}
        for name in outputs:
            if name not in have:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs or None, {INPUT: x})


def compare_with_captum(model: nn.Module, xs: np.ndarray, targets: np.ndarray,
                        maps: dict, label: str = "") -> dict:
    """Captum's Saliency, Deconvolution, GuidedBackprop and DeepLift on the torch model.

    Captum runs on a float64 copy of the module, so the reference carries no float32
    round-off of its own. Compares the methods present in `maps`; returns
    max |liftir - captum| / max |captum| per method (empty if Captum is missing).
    """
    try:
        from captum.attr import Deconvolution, DeepLift, GuidedBackprop, Saliency  # noqa: PLC0415
    except ImportError:
        print("captum not installed: skipping the comparison")
        return {}
    import copy  # noqa: PLC0415

    model = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(xs.astype(np.float64))
    t = torch.from_numpy(targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = {"saliency": lambda: Saliency(model).attribute(x, target=t, abs=False),
                "deconvnet": lambda: Deconvolution(model).attribute(x, target=t),
                "guided backprop": lambda: GuidedBackprop(model).attribute(x, target=t),
                "deeplift": lambda: DeepLift(model).attribute(
                    x, baselines=torch.zeros_like(x[:1]), target=t)}
        runs["deeplift, liftir in float64"] = runs["deeplift"]
        ref = {name: run() for name, run in runs.items() if name in maps}
    out = {}
    for name, r in ref.items():
        r = r.detach().numpy()
        out[name] = float(np.abs(maps[name] - r).max() / np.abs(r).max())
    print(f"liftir vs Captum (float64) on the torch model{label} (max |diff| / max |captum|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in out.items()))
    return out


def with_maxpool(model: AllConv) -> nn.Module:
    """The trained network with MaxPool2d(2, 2) inserted after its first ReLU, and the
    stride-2 conv that followed it made stride 1 (so the spatial sizes stay the same).
    Not retrained: only to show how deconvnet passes a max-pool."""
    import copy  # noqa: PLC0415

    m = copy.deepcopy(model)
    layers = list(m.features)
    layers[2].stride = (1, 1)
    m.features = nn.Sequential(*layers[:2], nn.MaxPool2d(2, 2), *layers[2:])
    return m.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--train", action="store_true",
                        help="train the network instead of loading the shipped weights "
                             "(writes OUT/all_conv_digits_weights.npz)")
    parser.add_argument("--epochs", type=int, default=60, help="with --train (default: 60)")
    parser.add_argument("--width", type=int, default=16, help="with --train (default: 16)")
    parser.add_argument("--n-show", type=int, default=5, help="test digits in methods.png")
    parser.add_argument("--maxpool", action="store_true",
                        help="also draw deconvnet through a max-pool inserted after training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.train and args.width != 16:
        parser.error("--width needs --train (the shipped weights are for width 16)")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    results = {}

    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    print(f"digits: {len(x_tr)} training, {len(x_te)} test images of {x_tr.shape[1:]}")
    if args.train:
        t0 = time.perf_counter()
        model = train(AllConv(args.width), x_tr, y_tr, args.epochs, args.seed)
        results["train_seconds"] = round(time.perf_counter() - t0, 1)
        results["weights"] = os.path.join(args.out, os.path.basename(SHIPPED_WEIGHTS))
        save_weights(model, results["weights"])
        print(f"trained in {results['train_seconds']} s; wrote {results['weights']}")
    else:
        model = load_weights(AllConv(), SHIPPED_WEIGHTS)
        results["weights"] = "shipped"
        print(f"loaded the shipped weights {os.path.relpath(SHIPPED_WEIGHTS)} (--train to retrain)")
    proto = export_onnx(model, x_te[:2])
    onnx.save(proto, os.path.join(args.out, "all_conv.onnx"))
    logits = run_ort(proto, x_te)[0]
    with torch.no_grad():
        diff = float(np.abs(model(torch.from_numpy(x_te)).numpy() - logits).max())
    pred = logits.argmax(1)
    results["test_accuracy"] = float((pred == y_te).mean())
    results["max_abs_diff_torch_vs_onnx"] = diff
    print(f"test accuracy {results['test_accuracy']:.4f} "
          f"(ONNX vs torch logits: max |diff| {diff:.1e})")

    # ---- four methods on a few test digits, explaining the predicted class' logit --------
    rng = np.random.default_rng(args.seed)
    show = []
    for digit in rng.permutation(10):  # distinct digits, correctly classified
        hits = np.flatnonzero((y_te == digit) & (pred == digit))
        if hits.size:
            show.append(int(hits[0]))
        if len(show) == args.n_show:
            break
    xs, ts = x_te[show], pred[show]
    maps, timings = {}, {}
    for method in METHODS:
        t0 = time.perf_counter()
        ex = liftir.Explainer(proto, method=method)
        if method == "deeplift":
            a, delta = ex.attribute(xs, baselines=np.zeros_like(xs[:1]), target=ts,
                                    return_convergence_delta=True)
            # summation-to-delta on the whole test set
            _, delta_all = ex.attribute(x_te, baselines=0.0, target=pred,
                                        return_convergence_delta=True)
            results["deeplift_max_abs_delta"] = float(np.abs(delta_all).max())
        else:
            a = ex.attribute(xs, target=ts)
        timings[method] = time.perf_counter() - t0
        maps[method.replace("_", " ")] = a
    # the same DeepLIFT with liftir's graph in double precision: equal to Captum's float64
    maps["deeplift, liftir in float64"] = liftir.Explainer(proto, precision="float64").attribute(
        xs, baselines=0.0, target=ts)
    results["captum_max_rel_diff"] = compare_with_captum(model, xs, ts, maps)
    maps.pop("deeplift, liftir in float64")
    path = os.path.join(args.out, "methods.png")
    image_heatmaps(xs, maps, row_labels=[f"predicted {t}" for t in ts], path=path,
                   title="All-Conv net on digits: what drives the predicted class' logit "
                         "(DeepLIFT: reference = blank image)")
    print(f"DeepLIFT summation to delta on all {len(x_te)} test images: max |delta| = "
          f"{results['deeplift_max_abs_delta']:.2e}")
    print("wrote", path)

    # ---- one intermediate neuron, All-Conv paper Figure 3 style --------------------------
    hidden = relu_outputs(proto)[3]  # output of the second stride-2 conv's ReLU: (N, 64, 4, 4)
    act = run_ort(proto, x_te, [hidden])[0]
    flat = act.reshape(len(act), -1)
    unit = np.unravel_index(int(flat.max(axis=0).argmax()), act.shape[1:])  # most excitable
    unit = tuple(int(u) for u in unit)
    top = np.argsort(-act[(slice(None),) + unit])[:4]
    gb = liftir.Explainer(proto, method="guided_backprop")
    dc = liftir.Explainer(proto, method="deconvnet")
    gmap = gb.attribute(x_te[top], output=hidden, target=unit)
    dmap = dc.attribute(x_te[top], output=hidden, target=unit)
    spread = float(np.abs(dmap - dmap[:1]).max() / np.abs(dmap).max())
    print(f"deconvnet maps of this unit differ across its 4 images by at most {spread:.1e} "
          "(relative): with no max-pool switches, deconvnet is not conditioned on the image "
          "(Springenberg et al., sec. 3.4); guided backprop is")
    results["neuron_deconvnet_relative_spread"] = spread
    results["neuron"] = {"tensor": hidden, "unit (channel, i, j)": list(unit),
                         "top_test_images": top.tolist(),
                         "activations": act[(top,) + unit].round(3).tolist()}
    path = os.path.join(args.out, "neuron.png")
    image_heatmaps(x_te[top], {"guided backprop": gmap, "deconvnet": dmap},
                   row_labels=[f"act. {act[(i,) + unit]:.2f}" for i in top], path=path,
                   title=f"unit (channel {unit[0]}, row {unit[1]}, col {unit[2]}) of {hidden}\n"
                         "(4x4 map, receptive field 13 px): its 4 most exciting test images")
    print(f"neuron: unit {unit} of {hidden!r}, top activations "
          f"{', '.join(f'{v:.2f}' for v in act[(top,) + unit])}")
    print("wrote", path)

    # ---- optional: deconvnet through max-pooling switches --------------------------------
    if args.maxpool:
        pooled = export_onnx(with_maxpool(model), x_te[:2])
        acc = float((run_ort(pooled, x_te)[0].argmax(1) == y_te).mean())
        pm = {}
        for method in ("saliency", "deconvnet", "guided_backprop", "deeplift"):
            ex = liftir.Explainer(pooled, method=method)
            kw = {"baselines": 0.0} if method == "deeplift" else {}
            pm[method.replace("_", " ")] = ex.attribute(xs, target=ts, **kw)
        # Captum's DeepLift is left out here: its rule is wrong where a ReLU feeds a max-pool
        # (captum issue #1104), the others route through the pool's argmax as liftir does.
        results["maxpool_captum_max_rel_diff"] = compare_with_captum(
            with_maxpool(model), xs, ts, {k: v for k, v in pm.items() if k != "deeplift"},
            label=" with the max-pool")
        path = os.path.join(args.out, "maxpool_deconvnet.png")
        image_heatmaps(xs, pm, row_labels=[f"predicted {t}" for t in ts], path=path,
                       title=f"max-pool inserted after training (accuracy now {acc:.3f}): "
                             "deconvnet routes through the pooling switches")
        results["maxpool_variant_accuracy"] = acc
        print(f"max-pool variant (not retrained): test accuracy {acc:.4f}; wrote {path}")

    results["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
          + f"; total {results['total_seconds']} s")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PyTorch -> ONNX (both exporters) -> liftir, checked against Captum's DeepLift.

A small MLP with ReLU and Tanh hidden layers and a Sigmoid output is trained on the
breast-cancer data (standardized features, so the all-zeros reference is the training
mean patient), then exported twice:

* ``dynamo=False``: the TorchScript exporter (opset 17);
* ``dynamo=True``: the torch.export-based exporter (this torch's default opset).

The two graphs differ (op choice, names, opset), the function is the same, so liftir's
attributions must be the same. Captum's DeepLift runs on the torch module itself:

* with ``final_activation="keep"`` liftir explains the Sigmoid's output, as Captum does
  for the full model;
* with the default ``final_activation="strip"`` liftir explains the Sigmoid's input (the
  logit, paper 2.4), as Captum does for the model without its last module. This holds
  for every method: liftir's saliency of this model is the gradient of the logit.

A second model, a small CNN with BatchNorm, MaxPool, Flatten and a final Softmax (random
weights, on scikit-learn's 8x8 digits), is exported both ways too: here the exporters'
graphs differ, and liftir's attributions for all 10 classes at once must still agree.

Usage: ``python examples/frameworks/pytorch_exporters.py [--out DIR]``
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
import torch
from torch import nn

import liftir
from liftir.plots import feature_bars

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import breast_cancer, op_types, rel_diff, run_ort  # noqa: E402

INPUT, OUTPUT = "features", "p_benign"


def make_model() -> nn.Sequential:
    # Every nonlinearity is its own module instance: Captum hooks modules.
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 1), nn.Sigmoid())


def train(model, x, y, epochs: int, seed: int):
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))[:, None]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):  # full batch: 426 patients
        opt.zero_grad()
        loss = loss_fn(model[:-1](xt), yt)
        loss.backward()
        opt.step()
    return model.eval()


def export(model: nn.Module, example: np.ndarray, dynamo: bool) -> onnx.ModelProto:
    """Both exporters with a dynamic batch axis (options as in tests/zoo.py)."""
    x = torch.from_numpy(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT],
                                     output_names=[OUTPUT],
                                     dynamic_shapes=({0: torch.export.Dim("batch")},),
                                     external_data=False, verbose=False, report=False)
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=[INPUT],
                          output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        return onnx.load_from_string(buf.getvalue())


def compare_cnn_exports(seed: int) -> dict:
    """A CNN with BatchNorm, MaxPool and Softmax, exported both ways: same attributions?"""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    torch.manual_seed(seed)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 2 * 2, 10), nn.Softmax(dim=1))
    with torch.no_grad():  # non-trivial BatchNorm statistics
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2.0)
    cnn.eval()
    x = (load_digits().images[:64, None] / 16.0).astype(np.float32)
    out = {}
    attrs = {}
    for dynamo in (False, True):
        proto = export(cnn, x[:4], dynamo)
        ex = liftir.Explainer(proto, method="deeplift")
        a, d = ex.attribute(x, baselines=0.0, target="all", return_convergence_delta=True)
        attrs[dynamo] = a
        out[f"dynamo={dynamo}"] = {"ops": op_types(proto), "deeplift_max_abs_delta":
                                   float(np.abs(d).max())}
        print(f"CNN dynamo={dynamo}: {' -> '.join(op_types(proto))}; DeepLIFT of all 10 "
              f"classes {a.shape}, max |delta| {np.abs(d).max():.1e}")
    out["exporters_max_rel_diff"] = rel_diff(attrs[True], attrs[False])
    print(f"CNN: the two exports' DeepLIFT attributions differ by max |diff| / max "
          f"{out['exporters_max_rel_diff']:.1e}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    results = {}

    x_tr, x_te, y_tr, y_te, features, classes = breast_cancer(args.seed, standardize=True)
    torch.manual_seed(args.seed)
    model = train(make_model(), x_tr, y_tr, args.epochs, args.seed)
    with torch.no_grad():
        p_torch = model(torch.from_numpy(x_te)).numpy()
    results["test_accuracy"] = float(((p_torch[:, 0] > 0.5) == (y_te == 1)).mean())
    print(f"torch MLP on breast cancer: test accuracy {results['test_accuracy']:.4f}")

    protos = {}
    for dynamo in (False, True):
        t0 = time.perf_counter()
        proto = export(model, x_te[:4], dynamo)
        key = f"dynamo={dynamo}"
        protos[key] = proto
        onnx.save(proto, os.path.join(args.out, f"torch_mlp_dynamo_{dynamo}.onnx"))
        opset = {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"]
        diff = float(np.abs(run_ort(proto, x_te) - p_torch).max())
        results[key] = {"opset": opset, "ops": op_types(proto), "max_abs_diff_vs_torch": diff,
                        "export_seconds": round(time.perf_counter() - t0, 2)}
        print(f"{key}: opset {opset}, {' -> '.join(op_types(proto))}; "
              f"ONNX vs torch max |diff| {diff:.1e}")

    baseline = np.zeros((1, x_te.shape[1]), np.float32)
    attrs = {}
    for key, proto in protos.items():
        for final in ("keep", "strip"):
            ex = liftir.Explainer(proto, method="deeplift", final_activation=final)
            t0 = time.perf_counter()
            a, d = ex.attribute(x_te, baselines=baseline, target=0, return_convergence_delta=True)
            attrs[key, final] = a
            results[key][f"deeplift_{final}_max_abs_delta"] = float(np.abs(d).max())
            results[key][f"deeplift_{final}_seconds"] = round(time.perf_counter() - t0, 4)
        attrs[key, "saliency"] = liftir.Explainer(proto, method="saliency").attribute(x_te, target=0)
    for kind in ("keep", "strip", "saliency"):
        results[f"exporters_max_abs_diff_{kind}"] = float(
            np.abs(attrs["dynamo=False", kind] - attrs["dynamo=True", kind]).max())
    print("same model, two exporters -> liftir attributions differ by at most: "
          + ", ".join(f"{k} {results[f'exporters_max_abs_diff_{k}']:.1e}"
                      for k in ("keep", "strip", "saliency")))
    for key in protos:
        print(f"  {key}: DeepLIFT max |delta| (Sigmoid kept) "
              f"{results[key]['deeplift_keep_max_abs_delta']:.1e}, (stripped, logit) "
              f"{results[key]['deeplift_strip_max_abs_delta']:.1e}")

    try:
        from captum.attr import DeepLift, Saliency  # noqa: PLC0415
    except ImportError:
        print("captum is not installed: skipping the comparison")
        captum = None
    else:
        x = torch.from_numpy(x_te)
        b = torch.from_numpy(baseline)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captum = {"keep": DeepLift(model).attribute(x, baselines=b, target=0),
                      "strip": DeepLift(model[:-1]).attribute(x, baselines=b, target=0),
                      "saliency": Saliency(model[:-1]).attribute(x, target=0, abs=False)}
        captum = {k: v.detach().numpy() for k, v in captum.items()}
        results["captum_rel_diff"] = {f"{key} {kind}": rel_diff(attrs[key, kind], captum[kind])
                                      for key in protos for kind in captum}
        print("liftir vs Captum (max |diff| / max |captum|): " + ", ".join(
            f"{k} {v:.1e}" for k, v in results["captum_rel_diff"].items()))

    results["cnn"] = compare_cnn_exports(args.seed)

    import matplotlib.figure  # noqa: PLC0415
    fig = matplotlib.figure.Figure(figsize=(12.5, 5.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.3, 1])
    i = int(np.argmin(np.abs(p_torch[:, 0] - 0.5) + 10 * (y_te != 1)))  # a borderline benign case
    feature_bars(attrs["dynamo=False", "strip"][i], features, top_k=12, ax=ax1,
                 xlabel="DeepLIFT contribution to the logit",
                 title=f"test patient {i}: P(benign) = {p_torch[i, 0]:.2f} "
                       f"(reference: mean patient)")
    if captum is not None:
        for key, marker in (("dynamo=False", "o"), ("dynamo=True", "x")):
            ax2.scatter(captum["strip"].ravel(), attrs[key, "strip"].ravel(), s=14,
                        marker=marker, label=f"liftir, {key}", alpha=0.7)
        lim = float(np.abs(captum["strip"]).max()) * 1.05
        ax2.plot([-lim, lim], [-lim, lim], color="0.4", lw=0.8, label="y = x")
        ax2.set_xlabel("Captum DeepLift (torch module)")
        ax2.set_ylabel("liftir DeepLIFT (ONNX export)")
        ax2.set_title(f"all {x_te.size} feature contributions of {len(x_te)} patients")
        ax2.legend()
    else:
        ax2.set_axis_off()
    fig.suptitle("PyTorch MLP (ReLU, Tanh, Sigmoid) exported twice; DeepLIFT of the logit")
    path = os.path.join(args.out, "pytorch_breast_cancer.png")
    fig.savefig(path, dpi=110)
    print("wrote", path)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"total {results['total_seconds']} s")
    with open(os.path.join(args.out, "pytorch_results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    worst = max([results[f"exporters_max_abs_diff_{k}"] for k in ("keep", "strip", "saliency")]
                + [results["cnn"]["exporters_max_rel_diff"]])
    if worst > 1e-4:
        print("ERROR: the two exports give different attributions")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

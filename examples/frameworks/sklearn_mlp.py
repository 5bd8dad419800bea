"""scikit-learn -> skl2onnx -> liftir: explaining an MLPClassifier's probabilities.

Two models, both exported with ``options={id(clf): {"zipmap": False}}`` so that the class
probabilities come out as a plain (N, C) tensor named "probabilities" instead of
ZipMap's list of dicts:

* breast cancer (30 features, 2 classes): ``StandardScaler`` + ``MLPClassifier`` in one
  Pipeline. skl2onnx writes the scaler as the ``ai.onnx.ml`` op ``Scaler`` and the binary
  head as ``Concat(1 - Sigmoid(z), Sigmoid(z))``;
* iris (4 features, 3 classes): the multiclass head is ``Softmax`` then ``Identity``.

What liftir does with such a graph (the script prints each step):

1. The exported graph also computes the label: ArgMax -> ArrayFeatureExtractor
   (ai.onnx.ml) -> Reshape -> Cast. It needs no rule: liftir asks for rules only on the
   way to the explained output, "probabilities".
2. ``ai.onnx.ml::Scaler`` is affine, y = (x - offset) * scale: a built-in rule (2.3.1).
3. The final Softmax is found through the Identity: by default (final_activation="strip")
   liftir explains the logits with the mean-normalized weights of paper 2.5;
   final_activation="keep" explains the probability itself (contributions then add up to
   the change in probability).

DeepLIFT's reference is the training-set mean patient (raw units; 0 after the scaler).

Usage: ``python examples/frameworks/sklearn_mlp.py [--out DIR]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import onnx
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import to_onnx

import liftir
from liftir.plots import feature_bars

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import breast_cancer, op_types, rel_diff, run_ort  # noqa: E402


def input_of(model: onnx.ModelProto, op_type: str) -> str:
    """First input tensor of the (last) node of a given op type."""
    return [n.input[0] for n in model.graph.node if n.op_type == op_type][-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    results = {}

    # ---- breast cancer: Pipeline(StandardScaler, MLPClassifier) ----------------------------
    x_tr, x_te, y_tr, y_te, features, classes = breast_cancer(args.seed)
    pipe = make_pipeline(StandardScaler(), MLPClassifier((32, 16), max_iter=1000,
                                                         random_state=args.seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x_tr, y_tr)
    acc = float(pipe.score(x_te, y_te))
    full = to_onnx(pipe, x_tr[:1], options={id(pipe[-1]): {"zipmap": False}},
                   target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save(full, os.path.join(args.out, "sklearn_breast_cancer.onnx"))
    print(f"breast cancer MLP: test accuracy {acc:.4f}")
    print("skl2onnx graph:", " -> ".join(op_types(full)))
    try:
        liftir.Explainer(full, method="deeplift", output="probabilities")
        print("liftir accepts the full graph")
    except liftir.UnsupportedOpError as exc:
        print("liftir on the full graph:", str(exc).splitlines()[0])
    model = full
    p_onnx = run_ort(model, x_te, "probabilities")
    results["breast_cancer"] = {"test_accuracy": acc,
                                "ops": op_types(full),
                                "max_abs_diff_predict_proba_vs_onnx":
                                    float(np.abs(p_onnx - pipe.predict_proba(x_te)).max())}
    print(f"ONNX probabilities vs predict_proba: max |diff| "
          f"{results['breast_cancer']['max_abs_diff_predict_proba_vs_onnx']:.1e}")

    reference = x_tr.mean(axis=0, keepdims=True)  # the mean patient
    target = classes.index("malignant")
    ex = liftir.Explainer(model, method="deeplift")
    t0 = time.perf_counter()
    attr, delta = ex.attribute(x_te, baselines=reference, target=target, output="probabilities",
                               return_convergence_delta=True)
    seconds = time.perf_counter() - t0
    # The same for the logit z of P(benign) = Sigmoid(z): any tensor can be explained.
    logit = input_of(model, "Sigmoid")
    logit_attr, logit_delta = ex.attribute(x_te, baselines=reference, output=logit, target=0,
                                           return_convergence_delta=True)
    ig = liftir.Explainer(model, method="integrated_gradients").attribute(
        x_te, baselines=reference, target=target, output="probabilities")
    bc = results["breast_cancer"]
    bc["deeplift_max_abs_delta"] = float(np.abs(delta).max())
    bc["deeplift_logit_max_abs_delta"] = float(np.abs(logit_delta).max())
    bc["deeplift_vs_integrated_gradients_rel_diff"] = rel_diff(attr, ig)
    bc["deeplift_vs_integrated_gradients_corr"] = float(np.corrcoef(attr.ravel(), ig.ravel())[0, 1])
    bc["deeplift_seconds"] = round(seconds, 3)
    print(f"DeepLIFT of P(malignant) for {len(x_te)} test patients in {seconds:.2f} s: "
          f"max |delta| {bc['deeplift_max_abs_delta']:.1e}; of the logit (the Sigmoid's input "
          f"{logit!r}): max |delta| {bc['deeplift_logit_max_abs_delta']:.1e}")
    print(f"DeepLIFT vs integrated gradients (50 steps, same reference; different methods, both "
          f"complete): correlation {bc['deeplift_vs_integrated_gradients_corr']:.3f}, max |diff| / "
          f"max {bc['deeplift_vs_integrated_gradients_rel_diff']:.2f}")
    mean_abs = np.abs(attr).mean(axis=0)
    top = np.argsort(-mean_abs)[:5]
    bc["top_features_mean_abs_deeplift"] = {features[i]: float(mean_abs[i]) for i in top}
    print("top features by mean |DeepLIFT| of P(malignant): "
          + ", ".join(f"{features[i]} {mean_abs[i]:.3f}" for i in top))

    import matplotlib.figure  # noqa: PLC0415
    fig = matplotlib.figure.Figure(figsize=(13, 5.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    i = int(np.argmax(p_onnx[:, target] * (y_te == target)))  # a confidently malignant patient
    feature_bars(attr[i], features, top_k=12, ax=ax1, xlabel="DeepLIFT contribution",
                 title=f"test patient {i}: P(malignant) = {p_onnx[i, target]:.3f} vs "
                       f"{float(run_ort(model, reference, 'probabilities')[0, target]):.3f} for the mean patient")
    feature_bars(mean_abs, features, top_k=12, ax=ax2, xlabel="mean |DeepLIFT contribution|",
                 title=f"all {len(x_te)} test patients: mean |contribution| to P(malignant)")
    fig.suptitle("scikit-learn MLPClassifier (StandardScaler + MLP) via skl2onnx: "
                 "DeepLIFT, reference = training mean")
    path = os.path.join(args.out, "sklearn_breast_cancer_bars.png")
    fig.savefig(path, dpi=110)
    print("wrote", path)

    # ---- iris: multiclass head Softmax -> Identity ------------------------------------------
    xi, yi = load_iris(return_X_y=True)
    xi = xi.astype(np.float32)
    xi_tr, xi_te, yi_tr, yi_te = train_test_split(xi, yi, test_size=0.3, random_state=args.seed,
                                                  stratify=yi)
    clf = MLPClassifier((16,), max_iter=2000, random_state=args.seed).fit(xi_tr, yi_tr)
    iris_full = to_onnx(clf, xi_tr[:1], options={id(clf): {"zipmap": False}},
                        target_opset={"": 17, "ai.onnx.ml": 3})
    iris = iris_full
    print(f"\niris MLP: test accuracy {clf.score(xi_te, yi_te):.4f}; graph: "
          + " -> ".join(op_types(iris)))
    pred = run_ort(iris, xi_te, "probabilities").argmax(1)
    ref = xi_tr.mean(0, keepdims=True)
    # final_activation="keep": the probability itself is explained, through the Softmax;
    # contributions add up to the change in probability.
    a_prob, d_prob = liftir.Explainer(iris, method="deeplift", output="probabilities",
                                      final_activation="keep").attribute(
        xi_te, baselines=ref, target=pred, return_convergence_delta=True)
    # The default, final_activation="strip": the Softmax (seen through the Identity) is the
    # final op, so liftir explains the logits with the mean-normalized weights of paper 2.5
    # (contributions add up to the change of z_t - mean_j z_j).
    a_logit, d_logit = liftir.Explainer(iris, method="deeplift", output="probabilities").attribute(
        xi_te, baselines=ref, target=pred, return_convergence_delta=True)
    p_change = float(np.mean(np.take_along_axis(run_ort(iris, xi_te, "probabilities") - run_ort(iris, ref, "probabilities"),
                                                pred[:, None], 1)))
    results["iris"] = {"test_accuracy": float(clf.score(xi_te, yi_te)), "ops": op_types(iris),
                       "probabilities_max_abs_delta": float(np.abs(d_prob).max()),
                       "probabilities_mean_total": float(a_prob.sum(1).mean()),
                       "mean_probability_change": p_change,
                       "softmax_stripped_max_abs_delta": float(np.abs(d_logit).max()),
                       "softmax_stripped_mean_total": float(a_logit.sum(1).mean())}
    r = results["iris"]
    print(f"  'probabilities', final_activation='keep' (propagated through the Softmax): contributions "
          f"sum to {r['probabilities_mean_total']:.3f} on average = the mean change of the "
          f"predicted class' probability {p_change:.3f}; max |delta| "
          f"{r['probabilities_max_abs_delta']:.1e}")
    print(f"  'probabilities', default strip (2.5-normalized logits): contributions sum to "
          f"{r['softmax_stripped_mean_total']:.3f} on average; max |delta| "
          f"{r['softmax_stripped_max_abs_delta']:.1e}")
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"total {results['total_seconds']} s")
    with open(os.path.join(args.out, "sklearn_results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

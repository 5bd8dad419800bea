"""Keras (TensorFlow) -> tf2onnx -> liftir, checked against Captum on the same weights.

Needs ``tensorflow-cpu`` and ``tf2onnx`` (about 280 MB of wheels; not dependencies of
liftir). Without them the script says so and exits 0.

The Keras twin of pytorch_exporters.py's MLP (Dense 32 ReLU, Dense 16 Tanh, Dense 1
Sigmoid) is trained on the standardized breast-cancer data and converted with tf2onnx.
Its weights are then copied into the PyTorch module of pytorch_exporters.py, and
Captum's DeepLift on that module must agree with liftir on the tf2onnx graph.

Usage: ``python examples/frameworks/keras_tf2onnx.py [--out DIR]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    try:
        import tensorflow as tf  # noqa: PLC0415
        import tf2onnx  # noqa: PLC0415
    except ImportError as exc:
        print(f"skipped: {exc.name} is not installed (pip install tensorflow-cpu tf2onnx)")
        return 0
    import keras  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import torch  # noqa: PLC0415

    import liftir  # noqa: PLC0415
    from common import breast_cancer, op_types, rel_diff, run_ort  # noqa: PLC0415
    from pytorch_exporters import make_model  # noqa: PLC0415

    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    results = {"tensorflow": tf.__version__, "keras": keras.__version__,
               "tf2onnx": tf2onnx.__version__}
    x_tr, x_te, y_tr, y_te, features, _ = breast_cancer(args.seed, standardize=True)
    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential([keras.Input((x_tr.shape[1],), name="features"),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    model.fit(x_tr, y_tr.astype(np.float32), epochs=args.epochs, batch_size=len(x_tr), verbose=0)
    p_keras = model.predict(x_te, verbose=0)
    results["test_accuracy"] = float(((p_keras[:, 0] > 0.5) == (y_te == 1)).mean())
    print(f"Keras {keras.__version__} (TensorFlow {tf.__version__}) MLP: test accuracy "
          f"{results['test_accuracy']:.4f}")

    t0 = time.perf_counter()
    spec = (tf.TensorSpec((None, x_tr.shape[1]), tf.float32, name="features"),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
            how = "tf2onnx.convert.from_keras"
        except Exception as exc:  # Keras 3 models are not always accepted: trace a function
            print(f"from_keras failed ({type(exc).__name__}: {str(exc)[:80]}); "
                  "using from_function")
            fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
            how = "tf2onnx.convert.from_function"
    onnx.save(proto, os.path.join(args.out, "keras_mlp.onnx"))
    diff = float(np.abs(run_ort(proto, x_te) - p_keras).max())
    results.update(converter=how, ops=op_types(proto), max_abs_diff_vs_keras=diff,
                   convert_seconds=round(time.perf_counter() - t0, 2))
    print(f"{how}: {' -> '.join(op_types(proto))}; ONNX vs Keras max |diff| {diff:.1e}")

    baseline = np.zeros((1, x_te.shape[1]), np.float32)  # the mean patient
    attrs = {}
    for final in ("keep", "strip"):
        ex = liftir.Explainer(proto, method="deeplift", final_activation=final)
        attrs[final], d = ex.attribute(x_te, baselines=baseline, target=0,
                                       return_convergence_delta=True)
        results[f"deeplift_{final}_max_abs_delta"] = float(np.abs(d).max())
    print(f"liftir DeepLIFT: max |delta| {results['deeplift_keep_max_abs_delta']:.1e} (Sigmoid "
          f"kept), {results['deeplift_strip_max_abs_delta']:.1e} (stripped: the logit)")

    # The same weights in the PyTorch module, explained by Captum.
    twin = make_model().eval()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    linears = [m for m in twin if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, lin in zip(dense, linears):
            w, b = layer.get_weights()
            lin.weight.copy_(torch.from_numpy(w.T))
            lin.bias.copy_(torch.from_numpy(b))
    try:
        from captum.attr import DeepLift  # noqa: PLC0415
    except ImportError:
        print("captum is not installed: skipping the comparison")
    else:
        x = torch.from_numpy(x_te)
        b = torch.from_numpy(baseline)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = {"keep": DeepLift(twin).attribute(x, baselines=b, target=0),
                   "strip": DeepLift(twin[:-1]).attribute(x, baselines=b, target=0)}
        results["captum_rel_diff"] = {k: rel_diff(attrs[k], v.detach().numpy())
                                      for k, v in ref.items()}
        print("liftir (tf2onnx graph) vs Captum (same weights in torch), max |diff| / max: "
              + ", ".join(f"{k} {v:.1e}" for k, v in results["captum_rel_diff"].items()))
    mean_abs = np.abs(attrs["strip"]).mean(axis=0)
    top = np.argsort(-mean_abs)[:5]
    print("top features by mean |DeepLIFT| of the logit: "
          + ", ".join(f"{features[i]} {mean_abs[i]:.2f}" for i in top))
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"total {results['total_seconds']} s (TensorFlow import excluded)")
    with open(os.path.join(args.out, "keras_results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the framework examples: the breast-cancer data and small helpers (no download:
the data ship with scikit-learn)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split


def breast_cancer(seed: int = 0, standardize: bool = False):
    """(x_train, x_test, y_train, y_test, feature_names, class_names), float32 features.

    Classes: 0 = malignant, 1 = benign. With standardize=True the features are z-scored
    with the training set's mean and standard deviation (for the torch and Keras models;
    the scikit-learn pipeline does it in the graph).
    """
    d = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data.astype(np.float32), d.target.astype(np.int64),
                                              test_size=0.25, random_state=seed, stratify=d.target)
    if standardize:
        mu, sd = x_tr.mean(0), x_tr.std(0)
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    return (x_tr.astype(np.float32), x_te.astype(np.float32), y_tr, y_te,
            list(d.feature_names), list(d.target_names))


def run_ort(model: onnx.ModelProto, x: np.ndarray, output: str | None = None) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run([output] if output else None, {name: x})[0]


def op_types(model: onnx.ModelProto) -> list[str]:
    """'domain::Op' (or 'Op' for the default domain) of every node, in graph order."""
    return [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node]


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

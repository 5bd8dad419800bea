"""Build the tiny Keras recurrent models of tests/test_keras_masking.py and their anchors.

Run with a Python that has TensorFlow and tf2onnx (they are not liftir's test
dependencies, which only read what this script writes):
    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfenv/bin/python tests/data/make_keras_masking.py
Writes keras_<name>.onnx (tf2onnx, opset 17: each recurrent layer is an ONNX Loop) and
keras_<name>.npz: inputs, baselines, the Keras outputs, saliency (tf.GradientTape) and
integrated gradients (Gauss-Legendre, computed in TensorFlow) of output 0, all for fixed
seeds and random weights (no training). Padded steps are all-zero (Masking) or id 0
(Embedding(mask_zero=True)).
"""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
import tf2onnx  # noqa: E402
import onnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
T, F, H, V = 5, 3, 4, 7  # steps, features, units, vocabulary
IG_STEPS = 16
TARGET = 0


def float_models():
    def rnn(name):
        return {"lstm": lambda: keras.layers.LSTM(H),
                "gru_backwards": lambda: keras.layers.GRU(H, go_backwards=True),
                "simplernn": lambda: keras.layers.SimpleRNN(H),
                "bilstm": lambda: keras.layers.Bidirectional(keras.layers.LSTM(H)),
                "bigru_sequences": lambda: keras.layers.Bidirectional(
                    keras.layers.GRU(H, return_sequences=True), merge_mode="sum")}[name]()

    for name in ("lstm", "gru_backwards", "simplernn", "bilstm", "bigru_sequences"):
        keras.utils.set_random_seed(1)
        x = keras.Input((T, F), name="x")
        h = rnn(name)(keras.layers.Masking(0.0)(x))
        if name == "bigru_sequences":
            h = keras.layers.GlobalAveragePooling1D()(h)  # masked mean over the valid steps
        yield f"masking_{name}", keras.Model(x, keras.layers.Dense(2)(h))


def float_data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, T, F)).astype(np.float32)
    x[0, 3:] = 0  # padded at the end
    x[1, 4:] = 0
    x[2, 1] = 0  # a masked step in the middle
    # a reference with the input's mask (noise where the input has data, 0 where padded)
    same_mask = (rng.normal(size=x.shape) * (np.abs(x).sum(-1, keepdims=True) > 0)).astype(np.float32)
    return x, same_mask


def convert(model, spec, path):
    fn = tf.function(lambda v: model(v, training=False), input_signature=spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    proto.doc_string = ""
    proto.producer_name = "tf2onnx (tests/data/make_keras_masking.py)"
    onnx.save(proto, path)
    return proto


def gradients(f, x):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = f(x)[:, TARGET]
    return tape.gradient(y, x).numpy()


def integrated(f, x, x0):
    nodes, weights = np.polynomial.legendre.leggauss(IG_STEPS)
    alphas, weights = 0.5 * (nodes + 1), 0.5 * weights
    total = np.zeros_like(x)
    for a, w in zip(alphas, weights):  # the path, as Captum's IntegratedGradients walks it
        total += w * gradients(f, x0 + np.float32(a) * (x - x0))
    return (x - x0) * total


def main():
    x, same_mask = float_data()
    for name, model in float_models():
        spec = (tf.TensorSpec((None, T, F), tf.float32, name="x"),)
        convert(model, spec, os.path.join(HERE, f"keras_{name}.onnx"))
        f = lambda v: model(v, training=False)  # noqa: E731
        zero = np.zeros((1, T, F), np.float32)
        np.savez_compressed(
            os.path.join(HERE, f"keras_{name}.npz"), x=x, same_mask=same_mask,
            output=f(x).numpy(), saliency=gradients(f, x),
            ig_zero=integrated(f, x, np.broadcast_to(zero, x.shape)), ig_same_mask=integrated(f, x, same_mask))
        print(name, os.path.getsize(os.path.join(HERE, f"keras_{name}.onnx")), "bytes")

    # Embedding(mask_zero=True) -> GRU: ids, attributed at the embedding output
    keras.utils.set_random_seed(2)
    embedding = keras.layers.Embedding(V, F, mask_zero=True)
    gru = keras.layers.GRU(H)
    dense = keras.layers.Dense(2)
    ids_in = keras.Input((T,), dtype="int32", name="ids")
    model = keras.Model(ids_in, dense(gru(embedding(ids_in))))
    convert(model, (tf.TensorSpec((None, T), tf.int32, name="ids"),), os.path.join(HERE, "keras_embedding_gru.onnx"))
    ids = np.array([[3, 1, 5, 0, 0], [2, 6, 1, 4, 0], [4, 4, 2, 6, 1]], np.int32)
    mask = ids != 0
    emb = embedding(ids).numpy()
    after = lambda e: dense(gru(e, mask=mask))  # noqa: E731 - the model past its embedding
    same_mask = np.where(ids > 0, 1, 0).astype(np.int32)  # reference ids: token 1 wherever ids has one
    emb0 = embedding(same_mask).numpy()
    np.savez_compressed(os.path.join(HERE, "keras_embedding_gru.npz"), ids=ids, output=model(ids).numpy(),
                        embedding=emb, saliency=gradients(after, emb), same_mask=same_mask,
                        ig_same_mask=integrated(after, emb, emb0))  # the path at the embeddings, mask fixed
    print("embedding_gru", os.path.getsize(os.path.join(HERE, "keras_embedding_gru.onnx")), "bytes")
    print("tensorflow", tf.__version__, "keras", keras.__version__, "tf2onnx", tf2onnx.__version__)


if __name__ == "__main__":
    main()

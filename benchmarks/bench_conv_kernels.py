"""Time liftir's conv kernels on an All-CNN-C style stack (width/4, 3x32x32): onnxruntime vs array path.

The forward is the Conv chain, the backward the chain of conv_adjoint (what multiplier propagation costs).
Run: python benchmarks/bench_conv_kernels.py [batch]   (default 64; medians of 5 runs)
"""
import importlib
import sys
import time

import numpy as np

from liftir.kernels import conv, conv_adjoint

conv_module = importlib.import_module("liftir.kernels.conv")  # the package re-exports a function named `conv`

# (in channels, out channels, kernel, stride, pad)
LAYERS = [(3, 24, 3, 1, 1), (24, 24, 3, 1, 1), (24, 24, 3, 2, 1), (24, 48, 3, 1, 1), (48, 48, 3, 1, 1),
          (48, 48, 3, 2, 1), (48, 48, 3, 1, 0), (48, 48, 1, 1, 0), (48, 10, 1, 1, 0)]


def attrs(k, s, p):
    return dict(strides=[s, s], pads=[p] * 4, dilations=[1, 1], group=1)


def forward(x, weights, caches):
    inputs = []
    for (ci, co, k, s, p), (w, b), cache in zip(LAYERS, weights, caches):
        inputs.append(x)
        x = conv(np, x, w, b, cache=cache, **attrs(k, s, p))
    return x, inputs


def backward(g, weights, inputs, caches):
    for (ci, co, k, s, p), (w, _), x, cache in reversed(list(zip(LAYERS, weights, inputs, caches))):
        g = conv_adjoint(np, g, w, input_shape=x.shape, cache=cache, **attrs(k, s, p))
    return g


def median_ms(f, repeats=5):
    f()  # warm-up: builds the sessions and prepared weights
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(batch):
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    w32 = [((rng.standard_normal((co, ci, k, k)) * np.sqrt(2 / (ci * k * k))).astype(np.float32),
            (0.1 * rng.standard_normal(co)).astype(np.float32)) for ci, co, k, s, p in LAYERS]
    rows = []
    for name, use_ort, dtype in [("onnxruntime float32", True, np.float32), ("NumPy float32", False, np.float32),
                                 ("NumPy float64", False, np.float64)]:
        conv_module.USE_ORT = use_ort
        x, weights = x32.astype(dtype), [(w.astype(dtype), b.astype(dtype)) for w, b in w32]
        caches = [{} for _ in LAYERS]
        y, inputs = forward(x, weights, caches)
        g = np.ones_like(y)
        rows.append((name, median_ms(lambda: forward(x, weights, caches)),
                     median_ms(lambda: backward(g, weights, inputs, caches))))
    base = rows[0][1]
    print(f"All-CNN-C/4 conv stack, batch {batch}, 3x32x32, median of 5 runs")
    print(f"{'engine':<22}{'forward ms':>12}{'adjoint ms':>12}{'fwd / ORT fwd':>15}")
    for name, fwd, bwd in rows:
        print(f"{name:<22}{fwd:>12.1f}{bwd:>12.1f}{fwd / base:>15.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)

"""ONNX Conv / ConvTranspose and their adjoints (vector-Jacobian products w.r.t. the input).

A DeepLIFT pass spends its time in these kernels, so they pick the fastest engine per case:
- NumPy float32 runs each op as a cached single-op onnxruntime session (its kernels beat a NumPy
  im2col 2.5-9x on the 2-core CPU measured in shared/measurements; spinning off so sessions don't fight).
- Everything else (float64, CuPy arrays, or ``USE_ORT = False``) runs an im2col + batched matmul written
  against the array module ``xp`` with functions CuPy also has, so the GPU path is the same code.

Both adjoints are the other op with the same weight: the input-gradient of Conv is ConvTranspose and the
input-gradient of ConvTranspose is Conv, so only two kernels exist per engine.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..compile.tracer import is_tracer
from ..onnx_models import make_model
from ..threads import session_options

USE_ORT = True
"""Send NumPy float32/float16 convs to onnxruntime; set to False to force the array path (tests compare both)."""

_SAME = ("SAME_UPPER", "SAME_LOWER")

FEW_INPUT_CHANNELS = 16
"""Below this many input channels (an ungrouped conv: a model's RGB or one-hot DNA stem), the
adjoint runs as ConvTranspose even at stride 1. The flipped-kernel Conv would have that few
output channels, which onnxruntime's blocked CPU kernels fill poorly: ConvTranspose took
0.12-0.45x its time on 4-channel DNA stems (k 15-21) and 0.28-0.69x on 3-channel image stems,
at 1 and 2 threads; from 16 channels up the flipped Conv is as fast or faster (0.7-1.8x), and
grouped convs keep it (a depthwise ConvTranspose took 1.3-6.8x)."""


class _Attrs(NamedTuple):
    """Hashable conv attributes: part of the cache key and of the ONNX node."""

    strides: tuple
    pads: tuple
    dilations: tuple
    group: int
    output_padding: tuple | None = None


def conv(xp, x, w, b, *, strides, pads, dilations, group, cache=None):
    """ONNX Conv: x (B, C, *S), w (M, C/group, *k), b (M,) or None -> (B, M, *out)."""
    attrs = _Attrs(tuple(strides), tuple(pads), tuple(dilations), int(group))
    return _dispatch(xp, "Conv", x, w, b, attrs, cache)


def conv_adjoint(xp, g, w, *, input_shape, strides, pads, dilations, group, cache=None):
    """Transpose of ``conv`` w.r.t. x: g (B, M, *out) -> (B, C, *input_shape[2:]).

    It is ConvTranspose with the same weight; output_padding brings back the trailing input rows that a
    stride which does not divide the input never reached (their gradient is zero).
    """
    n = w.ndim - 2
    spans = [dilations[i] * (w.shape[2 + i] - 1) for i in range(n)]
    if (USE_ORT and (xp is np or is_tracer(xp)) and g.dtype == np.float32 and all(s == 1 for s in strides)
            and all(0 <= pads[i] <= spans[i] and 0 <= pads[n + i] <= spans[i] for i in range(n))
            and not (group == 1 and w.shape[1] < FEW_INPUT_CHANNELS)):
        # stride 1: the adjoint is a plain Conv with the flipped, channel-swapped kernel, and
        # onnxruntime's Conv is 1.1-1.9x faster than its ConvTranspose (measured here) when it
        # has FEW_INPUT_CHANNELS outputs or more
        cache = {} if cache is None else cache
        flipped = _cached(cache, ("flipped", id(w), group), (w,), lambda: _flip_for_adjoint(w, group))
        full = [spans[i] - pads[i] for i in range(n)] + [spans[i] - pads[n + i] for i in range(n)]
        return conv(xp, g, flipped, None, strides=strides, pads=full, dilations=dilations, group=group,
                    cache=cache)
    output_padding = tuple(
        input_shape[2 + i] + pads[i] + pads[n + i]
        - (strides[i] * (g.shape[2 + i] - 1) + dilations[i] * (w.shape[2 + i] - 1) + 1)
        for i in range(n)
    )
    attrs = _Attrs(tuple(strides), tuple(pads), tuple(dilations), int(group), output_padding)
    return _dispatch(xp, "ConvTranspose", g, w, None, attrs, cache)


def _flip_for_adjoint(w, group):
    """(M, C/g, *k) conv weight -> (C, M/g, *k) weight of the conv computing its transpose."""
    m, cg = w.shape[:2]
    k = w.shape[2:]
    per_group = w.reshape((group, m // group, cg) + k).swapaxes(1, 2)  # (g, C/g, M/g, *k)
    flipped = per_group[(Ellipsis,) + (slice(None, None, -1),) * len(k)]
    return np.ascontiguousarray(flipped.reshape((group * cg, m // group) + k))


def conv_transpose(xp, x, w, b, *, strides, pads, dilations, group, output_padding, cache=None):
    """ONNX ConvTranspose with explicit pads: x (B, C, *S), w (C, M/group, *k), b (M,) or None."""
    attrs = _Attrs(tuple(strides), tuple(pads), tuple(dilations), int(group), tuple(output_padding))
    return _dispatch(xp, "ConvTranspose", x, w, b, attrs, cache)


def conv_transpose_adjoint(xp, g, w, *, input_shape, strides, pads, dilations, group, cache=None):
    """Transpose of ``conv_transpose`` w.r.t. x: g (B, M, *out) -> (B, C, *input_shape[2:]).

    It is Conv with the same weight. An output_padding >= stride (legal when dilation > stride) makes that
    Conv produce rows past the input; they are cropped.
    """
    attrs = _Attrs(tuple(strides), tuple(pads), tuple(dilations), int(group))
    gx = _dispatch(xp, "Conv", g, w, None, attrs, cache)
    return gx[(Ellipsis, *(slice(0, s) for s in input_shape[2:]))]


def resolve_auto_pad(auto_pad, in_spatial, kernel, strides, dilations, pads, transpose=False,
                     output_shape=None, output_padding=None) -> list[int]:
    """Explicit ONNX pads [begin_1..begin_n, end_1..end_n] for an auto_pad setting, per the operator spec.

    Conv SAME_*: output = ceil(in / stride). ConvTranspose: an ``output_shape`` attribute decides the pads
    whatever auto_pad says; SAME_* alone means output = in * stride. An odd total puts the extra pad at the
    end for SAME_UPPER and at the beginning otherwise. A negative ConvTranspose total is taken as 0: under
    SAME_* alone onnxruntime keeps the natural size; an explicit output_shape up to stride - 1 past it gets
    its extra rows as output_padding (the caller's part), and one a stride or more past it is an error.
    """
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    n = len(in_spatial)
    if transpose and (output_shape is not None or auto_pad in _SAME):
        return _transpose_pads(auto_pad, in_spatial, kernel, strides, dilations, output_shape,
                               output_padding or [0] * n)
    if auto_pad in _SAME:
        totals = [max(0, (-(-i // s) - 1) * s + (k - 1) * d + 1 - i)
                  for i, k, s, d in zip(in_spatial, kernel, strides, dilations)]
        return _split_pads(totals, auto_pad == "SAME_UPPER")
    if auto_pad == "VALID" or not pads:
        return [0] * (2 * n)
    return [int(p) for p in pads]


def _transpose_pads(auto_pad, in_spatial, kernel, strides, dilations, output_shape, output_padding):
    """ConvTranspose pads from the requested output size (spec: total_padding formula)."""
    n = len(in_spatial)
    target = list(output_shape)[-n:] if output_shape is not None else [i * s for i, s in zip(in_spatial, strides)]
    totals = [s * (i - 1) + op + (k - 1) * d + 1 - o
              for i, k, s, d, op, o in zip(in_spatial, kernel, strides, dilations, output_padding, target)]
    # onnxruntime takes an output_shape up to stride - 1 past the natural size (the extra rows are
    # output_padding at the end, which the caller derives from output_shape); more cannot be produced
    if output_shape is not None and any(-t >= s for t, s in zip(totals, strides)):
        raise ValueError(f"ConvTranspose output_shape {target} exceeds the natural output size by a stride "
                         "or more; express the extra rows as output_padding")
    return _split_pads([max(0, t) for t in totals], auto_pad == "SAME_UPPER")


def _split_pads(totals, extra_at_end):
    """Split each total pad in two halves; an odd one leaves its extra unit at the end or the beginning."""
    begins = [t // 2 if extra_at_end else t - t // 2 for t in totals]
    return begins + [t - b for t, b in zip(totals, begins)]


def _dispatch(xp, op, x, w, b, attrs, cache):
    """Pick the engine: onnxruntime for NumPy float32, the array kernels otherwise."""
    cache = {} if cache is None else cache
    if is_tracer(xp):  # compiling (liftir/compile): the op itself becomes one node of the graph
        extra = {} if attrs.output_padding is None else {"output_padding": list(attrs.output_padding)}
        return xp.emit_node(op, [x, w, b], dict(kernel_shape=list(w.shape[2:]), strides=list(attrs.strides),
                                                 pads=list(attrs.pads), dilations=list(attrs.dilations),
                                                 group=attrs.group, **extra))
    if xp is np and x.dtype == np.float16:  # NumPy has no float16 GEMM: compute in float32, round once
        return _dispatch(xp, op, x.astype(np.float32), w, b, attrs, cache).astype(np.float16)
    if USE_ORT and xp is np and x.dtype == np.float32:
        session = _cached(cache, ("ort", op, id(w), id(b), attrs), (w, b), lambda: _ort_session(op, w, b, attrs))
        return session.run(None, {"x": np.ascontiguousarray(x)})[0]
    return _ARRAY_KERNELS[op](xp, x, w, b, attrs, cache)


def _cached(cache, key, keep_alive, build):
    """Build once per key; the key holds id()s, so the entry keeps those objects alive to keep the ids unique."""
    if key not in cache:
        cache[key] = (keep_alive, build())
    return cache[key][1]


def _ort_session(op, w, b, attrs):
    """A one-node onnxruntime session with the weight (and bias) baked in, batch and spatial dims dynamic."""
    n = w.ndim - 2
    in_channels = w.shape[1] * attrs.group if op == "Conv" else w.shape[0]
    inits = [numpy_helper.from_array(np.asarray(w, np.float32), "w")]
    if b is not None:
        inits.append(numpy_helper.from_array(np.asarray(b, np.float32), "b"))
    extra = {} if attrs.output_padding is None else {"output_padding": list(attrs.output_padding)}
    node = helper.make_node(op, ["x", "w"] + ["b"] * (b is not None), ["y"], kernel_shape=list(w.shape[2:]),
                            strides=list(attrs.strides), pads=list(attrs.pads), dilations=list(attrs.dilations),
                            group=attrs.group, **extra)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_channels] + [None] * n)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = session_options()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _conv_array(xp, x, w, b, attrs, cache):
    """Conv as one contiguous im2col and one matmul batched over groups (depthwise needs no Python loop)."""
    groups, batch, kernel = attrs.group, x.shape[0], w.shape[2:]
    padded = _grouped_channels_last(xp, x, groups, attrs.pads)
    out = tuple((p - d * (k - 1) - 1) // s + 1
                for p, k, s, d in zip(padded.shape[2:-1], kernel, attrs.strides, attrs.dilations))
    cols = _im2col(xp, padded, kernel, out, attrs.strides, attrs.dilations)
    weight = _cached(cache, ("conv-weight", id(w), x.dtype.str), (w,),
                     lambda: _conv_matrix(xp, w, groups).astype(x.dtype))
    y = xp.matmul(cols, weight)
    if b is not None:
        y += b.reshape(groups, 1, -1)
    return _to_channels_first(xp, y.reshape(groups, batch, *out, -1))


def _conv_transpose_array(xp, x, w, b, attrs, cache):
    """ConvTranspose as col2im: one matmul broadcast over kernel offsets gives each offset's contribution as a
    contiguous block, then prod(kernel) whole-array strided adds scatter them (no add.at, no loop over batch
    or positions)."""
    n, groups, batch = w.ndim - 2, attrs.group, x.shape[0]
    kernel, size = w.shape[2:], x.shape[2:]
    rows = _grouped_channels_last(xp, x, groups, (0,) * (2 * n))
    weight = _cached(cache, ("conv-transpose-weight", id(w), x.dtype.str), (w,),
                     lambda: _conv_transpose_matrices(xp, w, groups).astype(x.dtype))
    cols = xp.matmul(rows.reshape(1, groups, -1, rows.shape[-1]), weight)
    full = [s * (i - 1) + d * (k - 1) + 1 + op
            for i, k, s, d, op in zip(size, kernel, attrs.strides, attrs.dilations, attrs.output_padding)]
    acc = xp.zeros((groups, batch, *full, cols.shape[-1]), dtype=x.dtype)
    for col, offset in zip(cols, itertools.product(*map(range, kernel))):
        dst = tuple(slice(o * d, o * d + s * (i - 1) + 1, s)
                    for o, i, s, d in zip(offset, size, attrs.strides, attrs.dilations))
        acc[(slice(None), slice(None), *dst)] += col.reshape(groups, batch, *size, -1)
    crop = tuple(slice(attrs.pads[i], full[i] - attrs.pads[n + i]) for i in range(n))
    y = _to_channels_first(xp, acc[(slice(None), slice(None), *crop)])
    if b is not None:
        y += b.reshape(1, -1, *(1,) * n)
    return y


_ARRAY_KERNELS = {"Conv": _conv_array, "ConvTranspose": _conv_transpose_array}


def _grouped_channels_last(xp, x, groups, pads):
    """(B, C, *S) -> zero-padded contiguous (G, B, *S_padded, C/G): one copy that makes im2col rows contiguous."""
    n = x.ndim - 2
    batch, channels, size = x.shape[0], x.shape[1], x.shape[2:]
    view = x.reshape(batch, groups, channels // groups, *size).transpose(1, 0, *range(3, 3 + n), 2)
    padded = xp.zeros((groups, batch, *(s + pads[i] + pads[n + i] for i, s in enumerate(size)), channels // groups),
                      dtype=x.dtype)
    padded[(slice(None), slice(None), *(slice(pads[i], pads[i] + s) for i, s in enumerate(size)))] = view
    return padded


def _im2col(xp, padded, kernel, out, strides, dilations):
    """(G, B, *P, c) -> (G, B*prod(out), prod(kernel)*c) via an as_strided window view (CuPy has it too)."""
    groups, batch, channels = padded.shape[0], padded.shape[1], padded.shape[-1]
    st = padded.strides
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(groups, batch, *out, *kernel, channels),
        strides=(st[0], st[1], *(s * t for s, t in zip(strides, st[2:-1])),
                 *(d * t for d, t in zip(dilations, st[2:-1])), st[-1]))
    return xp.ascontiguousarray(windows).reshape(groups, batch * math.prod(out), math.prod(kernel) * channels)


def _conv_matrix(xp, w, groups):
    """Conv weight (M, C/G, *k) -> (G, prod(k)*C/G, M/G), rows ordered like the im2col columns."""
    n = w.ndim - 2
    m, c = w.shape[:2]
    grouped = w.reshape(groups, m // groups, c, *w.shape[2:]).transpose(0, *range(3, 3 + n), 2, 1)
    return xp.ascontiguousarray(grouped).reshape(groups, -1, m // groups)


def _conv_transpose_matrices(xp, w, groups):
    """ConvTranspose weight (C, M/G, *k) -> (prod(k), G, C/G, M/G): one matrix per kernel offset and group."""
    c, m = w.shape[:2]
    grouped = w.reshape(groups, c // groups, m, -1).transpose(3, 0, 1, 2)
    return xp.ascontiguousarray(grouped)


def _to_channels_first(xp, y):
    """(G, B, *S, M/G) -> contiguous (B, M, *S), the layout ONNX tensors use."""
    n = y.ndim - 3
    batch, size = y.shape[1], y.shape[2:-1]
    return xp.ascontiguousarray(y.transpose(1, 0, n + 2, *range(2, 2 + n))).reshape(batch, -1, *size)

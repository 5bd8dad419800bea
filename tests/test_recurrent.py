"""LSTM, GRU and RNN (rules/recurrent.py) and the batch-first rewrite (liftir/layout.py).

Anchors nobody here wrote: forwards equal onnxruntime (on the original time-major model,
since onnxruntime runs no layout 1) and torch; saliency equals torch.autograd on nn.LSTM /
nn.GRU / nn.RNN exports, and central finite differences of the float64 forward on spec-level
graphs; integrated gradients equals Captum's. DeepLIFT conserves to 1e-9 in float64 with
initial states as attributed inputs. Captum's DeepLift is no anchor here: nn.LSTM's gates
are not modules it hooks, so it back-propagates plain gradients through them.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.errors import InputError, RuleError
from onnx_builders import export_torch, run_ort

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def time_major_model(op, direction="forward", hidden=3, features=2, steps=4, attrs=None,
                     peepholes=False, states=True, output="y", layout=0, seed=0, lens=None):
    """x [N, T, F] (and h0, c0 [N, D, H]) batch first, around a time-major op, as torch writes it."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    consts = {"W": rng.standard_normal((d, g * hidden, features)) * 0.7,
              "R": rng.standard_normal((d, g * hidden, hidden)) * 0.5,
              "B": rng.standard_normal((d, 2 * g * hidden)) * 0.3,
              "shape": np.array([0, 0, -1], np.int64)}
    if peepholes:
        consts["P"] = rng.standard_normal((d, 3 * hidden)) * 0.5
    if lens is not None:
        consts["lens"] = np.asarray(lens, np.int32)
    inputs = {"x": [None, steps, features]}
    state_names = ["h0", "c0"] if op == "LSTM" else ["h0"]
    if states:
        inputs.update({s: [None, d, hidden] for s in state_names})
    if layout == 0:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2])]
        args = ["xt", "W", "R", "B", "lens" if lens is not None else ""]
        for s in state_names:
            if states:
                nodes.append(helper.make_node("Transpose", [s], [s + "t"], perm=[1, 0, 2]))
            args.append(s + "t" if states else "")
    else:
        nodes, args = [], ["x", "W", "R", "B", ""] + [s if states else "" for s in state_names]
    if peepholes:
        args.append("P")
    outs = ["Y", "Yh", "Yc"][:3 if op == "LSTM" else 2]
    nodes.append(helper.make_node(op, args, outs, hidden_size=hidden, direction=direction,
                                  layout=layout, **(attrs or {})))
    if layout == 0:
        nodes += [helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["Yt", "shape"], ["Yr"]),
                  helper.make_node("Transpose", ["Yr"], ["y"], perm=[1, 0, 2]),
                  helper.make_node("Transpose", ["Yh"], ["hn"], perm=[1, 0, 2])]
    else:
        nodes += [helper.make_node("Reshape", ["Y", "shape"], ["y"]), helper.make_node("Identity", ["Yh"], ["hn"])]
    dtype = np.float32
    graph = helper.make_graph(
        nodes, "rnn", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N"] + s[1:]) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", steps, d * hidden]),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, ["N", d, hidden])],
        [numpy_helper.from_array(np.asarray(v, dtype if v.dtype.kind == "f" else v.dtype), k)
         for k, v in consts.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return m, list(inputs)


def _feeds(names, m, n, rng, scale=1.0):
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in m.graph.input}
    return {k: (rng.standard_normal([n] + shapes[k][1:]) * scale) for k in names}


SPEC_CASES = {
    "lstm-bi-peepholes-clip": dict(op="LSTM", direction="bidirectional", peepholes=True, attrs={"clip": 1.2}),
    "lstm-reverse-activations": dict(op="LSTM", direction="reverse", attrs={
        "activations": ["HardSigmoid", "LeakyRelu", "Softsign"], "activation_alpha": [0.3, 0.1],
        "activation_beta": [0.4]}),
    "lstm-no-states": dict(op="LSTM", direction="forward", states=False),
    "lstm-bi-sequence-lens": dict(op="LSTM", direction="bidirectional", lens=[3, 3, 3]),
    "gru-bi-linear-before-reset": dict(op="GRU", direction="bidirectional", attrs={"linear_before_reset": 1}),
    "gru-scaled-tanh": dict(op="GRU", direction="forward", attrs={
        "activations": ["HardSigmoid", "ScaledTanh"], "activation_alpha": [0.3, 0.8],
        "activation_beta": [0.4, 1.2]}),
    "rnn-bi-elu-affine": dict(op="RNN", direction="bidirectional", attrs={
        "activations": ["Elu", "Affine"], "activation_alpha": [0.5, 0.7], "activation_beta": [0.2]}),
    "rnn-relu-softplus": dict(op="RNN", direction="bidirectional", attrs={"activations": ["Relu", "Softplus"]}),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_spec_forward_saliency_and_conservation(case):
    m, names = time_major_model(**SPEC_CASES[case])
    rng = np.random.default_rng(1)
    feeds = _feeds(names, m, 3, rng)
    expected = run_ort(m, {k: v.astype(np.float32) for k, v in feeds.items()})
    ex = liftir.Explainer(m, "deeplift", output="y")
    ex.plan.use_onnxruntime = False
    got = ex.predict({k: v.astype(np.float32) for k, v in feeds.items()})
    np.testing.assert_allclose(got, expected[0], rtol=1e-5, atol=1e-6)
    assert all(n.attrs.get("layout", 0) == 1 for n in ex.graph.nodes.values() if n.op_type in GATES)

    for output, target in (("y", (3, 1)), ("hn", (0, 2))):
        ex64 = liftir.Explainer(m, "deeplift", output=output, precision="float64")
        refs = _feeds(names, m, 1, np.random.default_rng(2))
        attr, delta = ex64.attribute(tuple(feeds[k] for k in names), baselines=tuple(refs[k] for k in names),
                                     target=target, return_convergence_delta=True)
        scale = max(np.abs(a).max() for a in attr)
        assert np.abs(delta).max() <= 1e-9 * max(1.0, scale), (output, delta)
        # saliency against a central difference of the float64 forward along a random direction
        sal = liftir.Explainer(m, "saliency", output=output, precision="float64")
        grads = sal.attribute(tuple(feeds[k] for k in names), target=target)
        direction = {k: np.random.default_rng(7).standard_normal(feeds[k].shape) for k in names}
        plus = sal.predict(tuple(feeds[k] + 1e-6 * direction[k] for k in names))
        minus = sal.predict(tuple(feeds[k] - 1e-6 * direction[k] for k in names))
        index = (slice(None),) + target
        numeric = (plus[index] - minus[index]) / 2e-6
        analytic = sum((g * direction[k]).reshape(len(g), -1).sum(axis=1) for g, k in zip(grads, names))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_layout_1_node_equals_time_major_onnxruntime():
    kw = dict(op="LSTM", direction="bidirectional", peepholes=True)
    m0, names = time_major_model(**kw)
    m1, _ = time_major_model(**kw, layout=1)
    feeds = {k: v.astype(np.float32) for k, v in _feeds(names, m0, 2, np.random.default_rng(3)).items()}
    ex = liftir.Explainer(m1, "deeplift", output="y")
    np.testing.assert_allclose(ex.predict(feeds), run_ort(m0, feeds)[0], rtol=1e-5, atol=1e-6)


def test_refusals_are_clear():
    m, names = time_major_model(op="GRU")
    m.graph.node[0].attribute[0].ints[:] = [1, 0, 2]  # unchanged: sanity
    lens = numpy_helper.from_array(np.array([2, 4], np.int32), "lens")
    m1, names1 = time_major_model(op="GRU", layout=1)
    m1.graph.initializer.append(lens)
    gru = next(n for n in m1.graph.node if n.op_type == "GRU")
    gru.input[4] = "lens"
    # constant per-sample lengths tie the node to a batch of 2 (tests/test_recurrent_lengths.py)
    feeds = {k: v.astype(np.float32) for k, v in _feeds(names1, m1, 3, np.random.default_rng(4)).items()}
    with pytest.raises(InputError, match="GRU node.*constant sequence_lens.*exactly 2 samples"):
        liftir.Explainer(m1, "saliency", output="y").attribute(tuple(feeds.values()), target=(0, 0))
    # a time-major op whose neighbours are not the exporter's chain: a clear refusal
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "N", 2])
    w = numpy_helper.from_array(np.ones((1, 3, 2), np.float32), "W")
    r = numpy_helper.from_array(np.ones((1, 3, 3), np.float32), "R")
    node = helper.make_node("RNN", ["x", "W", "R"], ["Y"], hidden_size=3)
    g = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 1, "N", 3])],
                          [w, r])
    bare = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    with pytest.raises(RuleError, match="time-major"):
        ex = liftir.Explainer(bare, "saliency")
        ex.plan.use_onnxruntime = False
        ex.predict(np.ones((4, 2, 2), np.float32))


# ---- PyTorch classifiers, both exporters ----------------------------------------------------

class Classifier(torch.nn.Module):
    def __init__(self, kind, bidirectional, read_hidden):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(torch.nn, kind)(3, 4, batch_first=True, bidirectional=bidirectional)
        self.fc = torch.nn.Linear(8 if bidirectional else 4, 3)
        self.read_hidden = read_hidden

    def forward(self, x):
        out, h = self.rnn(x)
        if self.read_hidden:
            h = h[0] if isinstance(h, tuple) else h
            return self.fc(torch.cat([h[-2], h[-1]], 1) if h.shape[0] == 2 else h[-1])
        return self.fc(out[:, -1])


TORCH_CASES = [("LSTM", True, False, 14), ("LSTM", False, True, 17), ("LSTM", True, True, "dynamo"),
               ("GRU", True, True, 17), ("GRU", False, False, "dynamo"), ("RNN", True, False, 14),
               # dynamo writes nn.RNN as an unrolled time-major loop of Slice/Gemm/Tanh
               ("RNN", True, False, "dynamo"), ("RNN", False, True, "dynamo")]


@pytest.fixture(scope="module")
def torch_models():
    models = {}
    for case in TORCH_CASES:
        kind, bi, read_hidden, exporter = case
        module = Classifier(kind, bi, read_hidden).eval()
        models[case] = (module, export_torch(module, torch.randn(2, 5, 3), exporter))
    return models


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_classifier(torch_models, case):
    module, proto = torch_models[case]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 3)).astype(np.float32)
    x0 = rng.standard_normal((1, 5, 3)).astype(np.float32) * 0.5
    xt = torch.tensor(x, requires_grad=True)
    out = module(xt)
    np.testing.assert_allclose(liftir.Explainer(proto, "saliency").predict(x), out.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    out[:, 2].sum().backward()
    sal = liftir.Explainer(proto, "saliency").attribute(x, target=2)
    grad = xt.grad.numpy()
    assert np.abs(sal - grad).max() <= 1e-4 * np.abs(grad).max()
    ex = liftir.Explainer(proto, "deeplift", precision="float64")
    attr, delta = ex.attribute(x.astype(np.float64), baselines=x0.astype(np.float64), target=2,
                               return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-9 * max(1.0, np.abs(attr).sum(axis=(1, 2)).max())
    attr32, delta32 = liftir.Explainer(proto, "deeplift").attribute(x, baselines=x0, target=2,
                                                                    return_convergence_delta=True)
    assert np.abs(delta32).max() <= 1e-4 * max(1.0, np.abs(attr32).sum(axis=(1, 2)).max())
    np.testing.assert_allclose(attr32, attr, atol=1e-4 * np.abs(attr).max())


@pytest.mark.parametrize("case", [c for c in TORCH_CASES if c[0] != "RNN" or c[3] != "dynamo"],
                         ids=lambda c: "-".join(map(str, c)))
def test_batch_first_recurrent_ops_forward_on_onnxruntime(torch_models, case, caplog):
    """liftir runs recurrent ops batch first (layout 1), which onnxruntime has no kernel for;
    its forward session runs them time major between transposes instead of falling back to
    the rules' forward: no fallback, the interpreter's attributions and the rules' own
    forward agree (onnxruntime's gate activations are within float32 round-off of NumPy's)."""
    import logging

    module, proto = torch_models[case]
    x = np.random.default_rng(7).standard_normal((3, 5, 3)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="liftir"):
        ex = liftir.Explainer(proto, "deeplift")
        got, delta = ex.attribute(x, baselines=np.zeros_like(x[:1]), target=1, return_convergence_delta=True)
    assert "cannot build a session" not in caplog.text and "layout" not in caplog.text
    assert any(n.op_type in ("LSTM", "GRU", "RNN") and n.attrs.get("layout", 0) == 1
               for n in ex.graph.nodes.values())  # the batch-first op is what ran
    np.testing.assert_allclose(ex.predict(x), module(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    rules_only = liftir.Explainer(proto, "deeplift")
    rules_only.plan.use_onnxruntime = False
    want = rules_only.attribute(x, baselines=np.zeros_like(x[:1]), target=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(delta).max() <= 1e-5 * max(1.0, float(np.abs(got).sum(axis=(1, 2)).max()))


def test_integrated_gradients_equals_captum(torch_models):
    from captum.attr import IntegratedGradients
    module, proto = torch_models[("LSTM", True, False, 14)]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 3))
    x0 = rng.standard_normal((2, 5, 3)) * 0.3
    ours = liftir.Explainer(proto, "integrated_gradients", precision="float64").attribute(
        x, baselines=x0, target=1, n_steps=16)
    double = Classifier("LSTM", True, False).double().eval()
    double.load_state_dict(module.state_dict())
    theirs = IntegratedGradients(double).attribute(torch.tensor(x), baselines=torch.tensor(x0), target=1,
                                                   n_steps=16, method="gausslegendre").numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-7 * np.abs(theirs).max(), rtol=1e-6)


@pytest.mark.parametrize("method", ["deeplift", "saliency"])
def test_cupy_subset_backend(method):
    """The rules call only functions CuPy also has (see tests/test_array_api_subset.py)."""
    from test_array_api_subset import subset_module
    m, names = time_major_model(op="LSTM", direction="bidirectional", peepholes=True, attrs={"clip": 1.0})
    rng = np.random.default_rng(8)
    feeds = tuple(v.astype(np.float32) for v in _feeds(names, m, 2, rng).values())
    refs = tuple(v.astype(np.float32) for v in _feeds(names, m, 1, rng).values())
    want = liftir.Explainer(m, method, output="y").attribute(feeds, baselines=refs, target=(2, 1))
    ex = liftir.Explainer(m, method, output="y")
    ex.xp = subset_module()
    got = ex.attribute(feeds, baselines=refs, target=(2, 1))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _elementary_lstm(w, r, b, p, steps):
    """The same LSTM (one direction, batch first) written out in elementary ONNX ops, whose
    rules (affine, Rescale, product) are tested on their own: the fused rule must agree."""
    hidden = r.shape[-1]
    consts = {"Wt": w[0].T, "Rt": r[0].T, "b": b[0, :4 * hidden] + b[0, 4 * hidden:],
              "Pi": p[0, :hidden], "Po": p[0, hidden:2 * hidden], "Pf": p[0, 2 * hidden:],
              "ax1": np.array([1])}
    for j in range(4):
        consts[f"s{j}"], consts[f"e{j}"] = np.array([j * hidden]), np.array([(j + 1) * hidden])
    nodes = [helper.make_node("Squeeze", ["h0", "ax1"], ["h_0"]), helper.make_node("Squeeze", ["c0", "ax1"], ["c_0"])]
    for t in range(steps):
        consts[f"t{t}"] = np.array(t)
        h, c, s = f"h_{t}", f"c_{t}", f"_{t}"
        nodes += [helper.make_node("Gather", ["x", f"t{t}"], ["x" + s], axis=1),
                  helper.make_node("MatMul", ["x" + s, "Wt"], ["xw" + s]),
                  helper.make_node("MatMul", [h, "Rt"], ["hr" + s]),
                  helper.make_node("Add", ["xw" + s, "hr" + s], ["zs" + s]),
                  helper.make_node("Add", ["zs" + s, "b"], ["z" + s])]
        for j, gate in enumerate("iofc"):
            nodes.append(helper.make_node("Slice", ["z" + s, f"s{j}", f"e{j}", "ax1"], [f"z{gate}" + s]))
        nodes += [helper.make_node("Mul", [c, "Pi"], ["pi" + s]), helper.make_node("Add", ["zi" + s, "pi" + s], ["ai" + s]),
                  helper.make_node("Mul", [c, "Pf"], ["pf" + s]), helper.make_node("Add", ["zf" + s, "pf" + s], ["af" + s]),
                  helper.make_node("Sigmoid", ["ai" + s], ["i" + s]), helper.make_node("Sigmoid", ["af" + s], ["f" + s]),
                  helper.make_node("Tanh", ["zc" + s], ["g" + s]),
                  helper.make_node("Mul", ["f" + s, c], ["fc" + s]), helper.make_node("Mul", ["i" + s, "g" + s], ["ig" + s]),
                  helper.make_node("Add", ["fc" + s, "ig" + s], [f"c_{t + 1}"]),
                  helper.make_node("Mul", [f"c_{t + 1}", "Po"], ["po" + s]),
                  helper.make_node("Add", ["zo" + s, "po" + s], ["ao" + s]),
                  helper.make_node("Sigmoid", ["ao" + s], ["o" + s]),
                  helper.make_node("Tanh", [f"c_{t + 1}"], ["th" + s]),
                  helper.make_node("Mul", ["o" + s, "th" + s], [f"h_{t + 1}"]),
                  helper.make_node("Unsqueeze", [f"h_{t + 1}", "ax1"], ["y" + s])]
    nodes.append(helper.make_node("Concat", [f"y_{t}" for t in range(steps)], ["y"], axis=1))
    return model_from(nodes, consts, steps, w.shape[-1], hidden)


def model_from(nodes, consts, steps, features, hidden):
    f64 = TensorProto.DOUBLE
    graph = helper.make_graph(
        nodes, "elementary",
        [helper.make_tensor_value_info("x", f64, ["N", steps, features]),
         helper.make_tensor_value_info("h0", f64, ["N", 1, hidden]),
         helper.make_tensor_value_info("c0", f64, ["N", 1, hidden])],
        [helper.make_tensor_value_info("y", f64, ["N", steps, hidden])],
        [numpy_helper.from_array(np.asarray(v, np.float64 if np.asarray(v).dtype.kind == "f" else np.int64), k)
         for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_fused_lstm_equals_its_elementary_unrolling():
    rng = np.random.default_rng(11)
    hidden, features, steps = 3, 2, 3
    w, r = rng.standard_normal((1, 4 * hidden, features)), rng.standard_normal((1, 4 * hidden, hidden)) * 0.6
    b, p = rng.standard_normal((1, 8 * hidden)) * 0.3, rng.standard_normal((1, 3 * hidden)) * 0.5
    consts = {"W": w, "R": r, "B": b, "P": p, "shape": np.array([0, 0, -1])}
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0", "P"], ["Y"], hidden_size=hidden, layout=1),
             helper.make_node("Reshape", ["Y", "shape"], ["y"])]
    fused = model_from(nodes, consts, steps, features, hidden)
    elementary = _elementary_lstm(w, r, b, p, steps)
    xs = (rng.standard_normal((4, steps, features)), rng.standard_normal((4, 1, hidden)),
          rng.standard_normal((4, 1, hidden)))
    refs = tuple(rng.standard_normal((1,) + a.shape[1:]) for a in xs)
    for method in ("deeplift", "saliency"):
        ours, theirs = liftir.Explainer(fused, method), liftir.Explainer(elementary, method)
        np.testing.assert_allclose(ours.predict(xs), theirs.predict(xs), rtol=1e-13)
        for target in ((0, 1), (2, 2)):
            kw = {"baselines": refs} if method == "deeplift" else {}
            for g, e in zip(ours.attribute(xs, target=target, **kw), theirs.attribute(xs, target=target, **kw)):
                np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-13)


BATCHED_CASES = {  # nodes whose backward runs batched over time (no peepholes, no per-row lengths)
    "lstm-reverse-activations": SPEC_CASES["lstm-reverse-activations"],
    "lstm-bi-clip": dict(op="LSTM", direction="bidirectional", attrs={"clip": 1.2}),
    "lstm-no-states": SPEC_CASES["lstm-no-states"],
    "lstm-bi-shared-length": SPEC_CASES["lstm-bi-sequence-lens"],
    "gru-bi-linear-before-reset": SPEC_CASES["gru-bi-linear-before-reset"],
    "rnn-bi-elu-affine": SPEC_CASES["rnn-bi-elu-affine"],
}


@pytest.mark.parametrize("case", list(BATCHED_CASES))
def test_batched_backward_equals_the_step_by_step_walk(case, monkeypatch):
    """The backward computed for all steps at once from the forward's Y (`_walk_batched`)
    gives the step-by-step walk's multipliers (`_walk_unrolled`, which it replaces there),
    up to the rounding of reassociated products."""
    from liftir.rules.recurrent import _Recurrent
    m, names = time_major_model(**BATCHED_CASES[case], steps=6)
    feeds = _feeds(names, m, 4, np.random.default_rng(3))
    refs = _feeds(names, m, 1, np.random.default_rng(4))
    xs, bs = tuple(feeds[k] for k in names), tuple(refs[k] for k in names)
    results = {}
    for batched in (True, False):
        with monkeypatch.context() as patch:
            if batched:  # and it must be the one that runs
                patch.setattr(_Recurrent, "_walk_unrolled", lambda *a, **k: pytest.fail("_walk_unrolled ran"))
            else:
                patch.setattr(_Recurrent, "_walk_batched", lambda *a, **k: pytest.fail("_walk_batched ran"))
                for cls in _Recurrent.__subclasses__():
                    patch.setattr(cls, "_batched", lambda self, p: False)
            for method in ("deeplift", "saliency"):
                for output, target in (("y", (5, 1)), ("hn", (0, 2))):
                    ex = liftir.Explainer(m, method, output=output, precision="float64")
                    kw = {"baselines": bs} if method == "deeplift" else {}
                    results[batched, method, output] = ex.attribute(xs, target=target, **kw)
    for (batched, method, output), got in results.items():
        if batched:
            for g, e in zip(got, results[False, method, output]):
                np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14 * np.abs(e).max())


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_node_without_y_walks_step_by_step(op):
    """A node that outputs only Y_h has no Y to read h_{t-1} from: the backward unrolls the
    forward again; it conserves (float64) and compiles to the interpreter's values."""
    m, names = time_major_model(op=op, direction="bidirectional", layout=1, steps=5,
                                attrs={"linear_before_reset": 1} if op == "GRU" else None)
    graph = m.graph
    next(n for n in graph.node if n.op_type == op).output[0] = ""
    nodes, outputs = [n for n in graph.node if "Y" not in n.input], [o for o in graph.output if o.name == "hn"]
    del graph.node[:], graph.output[:]
    graph.node.extend(nodes)
    graph.output.extend(outputs)
    feeds = _feeds(names, m, 3, np.random.default_rng(1))
    refs = _feeds(names, m, 1, np.random.default_rng(2))
    xs, bs = tuple(feeds[k] for k in names), tuple(refs[k] for k in names)
    ex64 = liftir.Explainer(m, "deeplift", output="hn", precision="float64")
    attr, delta = ex64.attribute(xs, baselines=bs, target=(0, 2), return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-9 * max(1.0, max(np.abs(a).max() for a in attr))
    xs32, bs32 = tuple(a.astype(np.float32) for a in xs), tuple(a.astype(np.float32) for a in bs)
    interp = liftir.Explainer(m, "deeplift", output="hn").attribute(xs32, baselines=bs32, target=(0, 2))
    compiled = liftir.Explainer(m, "deeplift", output="hn", engine="compiled").attribute(xs32, baselines=bs32,
                                                                                       target=(0, 2))
    for c, i in zip(compiled, interp):
        np.testing.assert_allclose(c, i, rtol=0, atol=1e-6 * np.abs(i).max())

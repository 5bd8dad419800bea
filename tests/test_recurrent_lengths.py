"""Per-sample `sequence_lens` in LSTM / GRU / RNN (rules/recurrent.py).

The spec: steps t >= len[b] leave sample b's state alone and are zeros in Y, Y_h/Y_c are
the state at the last valid step, and the reverse direction reads the sequence reversed
within its own length. Anchors nobody here wrote: onnxruntime's forward on the same graph
(time-major, which onnxruntime runs; the batch-first rewrite and layout-1 nodes are held to
it), torch with packed sequences (forward, torch.autograd saliency, float64 forward for
DeepLIFT's summation-to-delta), central differences of the float64 forward. The float64
hand check: each sample cut to its own length and run without sequence_lens (no masks)
gives the same outputs, saliency and DeepLIFT attributions as the padded batch.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.errors import InputError, RuleError
from onnx_builders import run_ort

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
STEPS, FEATURES, HIDDEN = 5, 2, 3
LENS = np.array([5, 2, 4, 1], np.int32)  # unsorted, one full, one of a single step


def lens_model(op, direction="forward", layout=0, lens="input", states=True, steps=STEPS, attrs=None,
               peepholes=False, seed=0):
    """x [N, T, F], lengths [N] (int32 input, a constant array, or None), h0/c0 [N, D, H];
    outputs y [N, T, D*H], hn (and cn) [N, D, H], batch first around the op as torch writes
    it (layout 0) or a batch-first node (layout 1). The weights depend on `seed` only."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    f32 = TensorProto.FLOAT
    consts = {"W": rng.standard_normal((d, g * HIDDEN, FEATURES)) * 0.7,
              "R": rng.standard_normal((d, g * HIDDEN, HIDDEN)) * 0.5,
              "B": rng.standard_normal((d, 2 * g * HIDDEN)) * 0.3,
              "P": rng.standard_normal((d, 3 * HIDDEN)) * 0.5,
              "shape": np.array([0, 0, -1], np.int64)}
    if not peepholes:
        del consts["P"]
    inputs = [helper.make_tensor_value_info("x", f32, ["N", steps, FEATURES])]
    if isinstance(lens, str):
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["N"]))
    elif lens is not None:
        consts["lens"] = np.asarray(lens, np.int32)
    state_names = ["h0", "c0"] if op == "LSTM" else ["h0"]
    if states:
        inputs += [helper.make_tensor_value_info(s, f32, ["N", d, HIDDEN]) for s in state_names]
    outs = ["Y", "Yh", "Yc"][:3 if op == "LSTM" else 2]
    lens_arg = "lens" if lens is not None else ""
    if layout == 0:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2])]
        args = ["xt", "W", "R", "B", lens_arg]
        for s in state_names:
            if states:
                nodes.append(helper.make_node("Transpose", [s], [s + "t"], perm=[1, 0, 2]))
            args.append(s + "t" if states else "")
    else:
        nodes, args = [], ["x", "W", "R", "B", lens_arg] + [s if states else "" for s in state_names]
    if peepholes:
        args.append("P")
    nodes.append(helper.make_node(op, args, outs, hidden_size=HIDDEN, direction=direction, layout=layout,
                                  name=f"{op.lower()}_node", **(attrs or {})))
    finals = [("Yh", "hn"), ("Yc", "cn")][:len(outs) - 1]
    if layout == 0:
        nodes += [helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["Yt", "shape"], ["Yr"]),
                  helper.make_node("Transpose", ["Yr"], ["y"], perm=[1, 0, 2])]
        nodes += [helper.make_node("Transpose", [a], [b], perm=[1, 0, 2]) for a, b in finals]
    else:
        nodes.append(helper.make_node("Reshape", ["Y", "shape"], ["y"]))
        nodes += [helper.make_node("Identity", [a], [b]) for a, b in finals]
    outputs = [helper.make_tensor_value_info("y", f32, ["N", steps, d * HIDDEN])]
    outputs += [helper.make_tensor_value_info(b, f32, ["N", d, HIDDEN]) for _, b in finals]
    graph = helper.make_graph(nodes, "rnn_lens", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype), k)
                               for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _float_inputs(op, direction, n, rng, states=True):
    d = 2 if direction == "bidirectional" else 1
    feeds = {"x": rng.standard_normal((n, STEPS, FEATURES))}
    if states:
        feeds["h0"] = rng.standard_normal((n, d, HIDDEN)) * 0.5
        if op == "LSTM":
            feeds["c0"] = rng.standard_normal((n, d, HIDDEN)) * 0.5
    return feeds


def _f32(feeds):
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}


CASES = [(op, direction, layout) for op in ("LSTM", "GRU", "RNN")
         for direction in ("forward", "reverse", "bidirectional") for layout in (0, 1)]


@pytest.mark.parametrize("op,direction,layout", CASES, ids=lambda v: str(v))
def test_per_sample_lengths_equal_onnxruntime_and_conserve(op, direction, layout):
    """Forward equals onnxruntime (on the time-major graph) with lengths 5, 2, 4, 1; padded
    steps are zeros in Y and change nothing; DeepLIFT conserves against onnxruntime's
    f(x) - f(x0) in float32 (1e-5) and to 1e-9 in float64, for Y, Y_h and Y_c."""
    m = lens_model(op, direction, layout)
    time_major = lens_model(op, direction, 0)
    rng = np.random.default_rng(1)
    feeds = dict(_float_inputs(op, direction, 4, rng), lens=LENS)
    want = run_ort(time_major, _f32(feeds))
    outputs = [o.name for o in m.graph.output]
    for name, expected in zip(outputs, want):
        got = liftir.Explainer(m, "saliency", output=name).predict(_f32(feeds))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    y = want[0]
    pad = np.arange(STEPS)[None, :] >= LENS[:, None]
    assert not y[pad].any() and np.abs(y[~pad]).min() > 0
    # padded inputs influence nothing
    moved = dict(feeds, x=np.where(pad[:, :, None], 7.0, feeds["x"]))
    for a, b in zip(run_ort(time_major, _f32(moved)), want):
        np.testing.assert_array_equal(a, b)

    refs = _float_inputs(op, direction, 1, np.random.default_rng(2))
    ref_feeds = {k: np.broadcast_to(v, (4,) + v.shape[1:]) for k, v in refs.items()}
    ref_out = run_ort(time_major, _f32(dict(ref_feeds, lens=LENS)))
    d = 2 if direction == "bidirectional" else 1
    targets = {"y": (3, 1), "hn": (d - 1, 2), "cn": (0, 1)}
    for name, out, out0 in zip(outputs, want, ref_out):
        target = targets[name]
        index = (slice(None),) + target
        diff = out[index] - out0[index]
        ex = liftir.Explainer(m, "deeplift", output=name)
        attr, delta = ex.attribute(_f32(feeds), baselines=_f32(refs), target=target, return_convergence_delta=True)
        total = sum(a.reshape(4, -1).sum(1) for a in attr.values())
        assert np.abs(total - diff).max() <= 1e-5 * max(1.0, np.abs(diff).max()), (name, total - diff)
        assert not attr["x"][pad].any()  # padded steps get nothing
        ex64 = liftir.Explainer(m, "deeplift", output=name, precision="float64")
        attr64, delta64 = ex64.attribute(feeds, baselines=refs, target=target, return_convergence_delta=True)
        scale = max(np.abs(a).max() for a in attr64.values())
        assert np.abs(delta64).max() <= 1e-9 * max(1.0, scale), (name, delta64)
        np.testing.assert_allclose(ex64.predict(feeds)[index], out[index], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,direction", [("LSTM", "bidirectional"), ("GRU", "reverse"), ("RNN", "bidirectional")])
def test_saliency_equals_central_differences(op, direction):
    m = lens_model(op, direction, 1)
    rng = np.random.default_rng(3)
    feeds = dict(_float_inputs(op, direction, 4, rng), lens=LENS)
    floats = [k for k in feeds if k != "lens"]
    for output, target in (("y", (3, 1)), ("hn", (0, 2))):
        sal = liftir.Explainer(m, "saliency", output=output, precision="float64")
        grads = sal.attribute(feeds, target=target)
        direction_ = {k: np.random.default_rng(7).standard_normal(feeds[k].shape) for k in floats}
        plus = sal.predict({**feeds, **{k: feeds[k] + 1e-6 * direction_[k] for k in floats}})
        minus = sal.predict({**feeds, **{k: feeds[k] - 1e-6 * direction_[k] for k in floats}})
        index = (slice(None),) + target
        numeric = (plus[index] - minus[index]) / 2e-6
        analytic = sum((grads[k] * direction_[k]).reshape(4, -1).sum(1) for k in floats)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("op,direction", [("LSTM", "bidirectional"), ("GRU", "bidirectional"), ("RNN", "reverse")])
def test_each_sample_cut_to_its_length_gives_the_same_numbers(op, direction):
    """Float64 hand check: sample b of the padded batch is the same computation as sample b
    cut to len[b] steps and run without sequence_lens (no masks anywhere): outputs, saliency
    and DeepLIFT attributions agree to round-off, and the padded steps get exactly 0."""
    m = lens_model(op, direction, 0, peepholes=op == "LSTM", attrs={"clip": 1.5} if op == "LSTM" else None)
    rng = np.random.default_rng(4)
    feeds = dict(_float_inputs(op, direction, 4, rng), lens=LENS)
    refs = _float_inputs(op, direction, 4, np.random.default_rng(5))
    floats = [k for k in feeds if k != "lens"]
    d = 2 if direction == "bidirectional" else 1
    padded = {method: liftir.Explainer(m, method, output="hn", precision="float64") for method in ("deeplift", "saliency")}
    target = (d - 1, 1)
    dl = padded["deeplift"].attribute(feeds, baselines=refs, target=target)
    sal = padded["saliency"].attribute(feeds, target=target)
    hn = padded["saliency"].predict(feeds)
    for b, length in enumerate(LENS):
        cut = lens_model(op, direction, 0, lens=None, steps=int(length), peepholes=op == "LSTM",
                         attrs={"clip": 1.5} if op == "LSTM" else None)
        one = {k: feeds[k][b:b + 1, :length] if k == "x" else feeds[k][b:b + 1] for k in floats}
        one0 = {k: refs[k][b:b + 1, :length] if k == "x" else refs[k][b:b + 1] for k in floats}
        ex = liftir.Explainer(cut, "saliency", output="hn", precision="float64")
        np.testing.assert_allclose(hn[b], ex.predict(one)[0], rtol=1e-13, atol=1e-14)
        want_sal = ex.attribute(one, target=target)
        want_dl = liftir.Explainer(cut, "deeplift", output="hn", precision="float64").attribute(
            one, baselines=one0, target=target)
        for k in floats:
            got_s, got_d = sal[k][b], dl[k][b]
            if k == "x":
                assert not got_s[length:].any() and not got_d[length:].any()
                got_s, got_d = got_s[:length], got_d[:length]
            np.testing.assert_allclose(got_s, want_sal[k][0], rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(got_d, want_dl[k][0], rtol=1e-10, atol=1e-13)


def test_reference_lengths_held_at_the_inputs_or_refused_where_they_differ():
    """The lengths are an integer input, held as given: the reference takes the input's own
    lengths when the baselines leave them out (the same as giving them), and DeepLIFT refuses
    a reference whose lengths differ, by node name (no float difference could carry what the
    skipped steps change); gradient methods do not read the reference."""
    m = lens_model("LSTM", "bidirectional", 0, states=False)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, STEPS, FEATURES)).astype(np.float32)
    x0 = 0.3 * rng.standard_normal((1, STEPS, FEATURES)).astype(np.float32)
    ex = liftir.Explainer(m, "deeplift", output="hn")
    left_out, d1 = ex.attribute({"x": x, "lens": LENS}, baselines={"x": x0}, target=(1, 0),
                                return_convergence_delta=True)
    given, d2 = ex.attribute({"x": x, "lens": LENS}, baselines={"x": x0, "lens": LENS}, target=(1, 0),
                             return_convergence_delta=True)
    np.testing.assert_array_equal(left_out["x"], given["x"])
    assert np.abs(d1).max() <= 1e-5
    other = LENS.copy()
    other[2] = 3
    with pytest.raises(RuleError, match="lstm_node.*sample 2 has sequence length 4 but its reference 3"):
        ex.attribute({"x": x, "lens": LENS}, baselines={"x": x0, "lens": other}, target=(1, 0))
    sal = liftir.Explainer(m, "saliency", output="hn").attribute({"x": x, "lens": LENS}, target=(1, 0))
    assert np.isfinite(sal["x"]).all()
    # DeepLIFT-SHAP: each sample keeps its own lengths for every reference of the distribution
    shap, delta = liftir.Explainer(m, "deeplift_shap", output="hn").attribute(
        {"x": x, "lens": LENS}, baselines={"x": rng.standard_normal((3, STEPS, FEATURES)).astype(np.float32)},
        target=(1, 0), return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-5 and not shap["x"][np.arange(STEPS)[None] >= LENS[:, None]].any()


def test_bad_lengths_are_refused_by_node_name():
    m = lens_model("GRU", "forward", 1, states=False)
    x = np.random.default_rng(8).standard_normal((4, STEPS, FEATURES)).astype(np.float32)
    ex = liftir.Explainer(m, "saliency", output="hn")
    for bad, what in ((np.array([5, 0, 4, 1], np.int32), "sample 1 the length 0"),
                      (np.array([5, 2, 6, 1], np.int32), "sample 2 the length 6")):
        with pytest.raises(InputError, match=f"gru_node.*{what}.*between 1 and the input's 5 steps"):
            ex.attribute({"x": x, "lens": bad}, target=(0, 1))
    with pytest.raises(InputError, match="gru_node.*gives the reference of sample 3 the length 9"):
        liftir.Explainer(m, "deeplift", output="hn").attribute(
            {"x": x, "lens": LENS}, baselines={"x": 0 * x, "lens": np.array([5, 2, 4, 9], np.int32)}, target=(0, 1))
    with pytest.raises(InputError, match="lens"):  # not [N]: the Explainer's shape check names the input
        ex.attribute({"x": x, "lens": LENS[:, None]}, target=(0, 1))
    for const, what in ((np.array([3, 0, 2, 1]), "sample 1 the length 0"), (np.array([[5, 2], [4, 1]]), "shape")):
        with pytest.raises(RuleError, match=f"gru_node.*{what}"):
            liftir.Explainer(lens_model("GRU", "forward", 1, lens=const, states=False), "saliency",
                             output="hn").attribute(x, target=(0, 1))


def test_a_constant_of_batch_length_gives_each_sample_its_length():
    """A fixed-batch export's constant lengths: sample b gets lens[b], and every sample its own
    reference row (a shared one could not take them all); another number of samples is
    refused by node name."""
    m = lens_model("LSTM", "bidirectional", 0, lens=LENS, states=False)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, STEPS, FEATURES)).astype(np.float32)
    want = run_ort(m, {"x": x})[1]
    np.testing.assert_allclose(liftir.Explainer(m, "saliency", output="hn").predict(x), want, rtol=1e-5, atol=1e-6)
    ex = liftir.Explainer(m, "deeplift", output="hn")
    attr, delta = ex.attribute(x, target=(1, 2), return_convergence_delta=True)  # default: zeros
    diff = want[:, 1, 2] - run_ort(m, {"x": np.zeros_like(x)})[1][:, 1, 2]
    assert np.abs(attr.reshape(4, -1).sum(1) - diff).max() <= 1e-5 * np.abs(diff).max()
    assert not attr[np.arange(STEPS)[None] >= LENS[:, None]].any()
    for kw in ({"inputs": x[:3]}, {"inputs": x, "batch_size": 2}):  # 3 samples; passes of 2
        with pytest.raises(InputError, match="LSTM node 'lstm_node': its constant sequence_lens.*exactly 4 samples"):
            ex.attribute(target=(1, 2), **kw)
    with pytest.raises(InputError, match="lstm_node.*exactly 4 samples.*200 samples"):  # the path's points
        liftir.Explainer(m, "integrated_gradients", output="hn").attribute(x, target=(1, 2))


@pytest.mark.parametrize("method", ["deeplift", "saliency"])
def test_cupy_subset_backend_with_lengths(method):
    """The masked time loop calls only functions CuPy also has."""
    from test_array_api_subset import subset_module
    m = lens_model("LSTM", "bidirectional", 0, peepholes=True)
    rng = np.random.default_rng(10)
    feeds = _f32(dict(_float_inputs("LSTM", "bidirectional", 4, rng), lens=LENS))
    refs = _f32(_float_inputs("LSTM", "bidirectional", 1, rng))
    want = liftir.Explainer(m, method, output="y").attribute(feeds, baselines=refs, target=(2, 1))
    ex = liftir.Explainer(m, method, output="y")
    ex.xp = subset_module()
    got = ex.attribute(feeds, baselines=refs, target=(2, 1))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


# ---- PyTorch: pack_padded_sequence with the lengths as a model input ------------------------

class Packed(torch.nn.Module):
    """Features and lengths in; packed LSTM/GRU/RNN; the padded output's mean and h_n into a
    Linear head. Exported with enforce_sorted=True (one recurrent op with sequence_lens) or
    False (the batch sorted by length around it: TopK, Gather, and Gathers back by the
    inverse permutation, which liftir/layout.py undoes); run with enforce_sorted=False,
    which is the same computation for lengths in any order."""

    def __init__(self, kind, bidirectional):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(torch.nn, kind)(3, 4, batch_first=True, bidirectional=bidirectional)
        width = 8 if bidirectional else 4
        self.fc = torch.nn.Linear(2 * width, 3)
        self.sorted = True

    def forward(self, x, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=self.sorted)
        out, h = self.rnn(packed)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        h = h[0] if isinstance(h, tuple) else h
        last = torch.cat([h[-2], h[-1]], 1) if h.shape[0] == 2 else h[-1]
        return self.fc(torch.cat([y.mean(1), last], 1))


def export_packed(module, opset, enforce_sorted=True):
    f = io.BytesIO()
    module.sorted = enforce_sorted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(3, 6, 3), torch.tensor([6, 4, 2])), f, dynamo=False,
                          opset_version=opset, input_names=["x", "lengths"],
                          dynamic_axes={"x": {0: "N"}, "lengths": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


PACKED = [("LSTM", True, 14, True), ("LSTM", False, 17, True), ("GRU", True, 17, True), ("GRU", False, 14, True),
          ("RNN", True, 17, True), ("LSTM", True, 17, False), ("GRU", True, 14, False), ("RNN", False, 17, False)]


@pytest.mark.parametrize("kind,bidirectional,opset,enforce_sorted", PACKED, ids=lambda v: str(v))
def test_packed_sequence_export(kind, bidirectional, opset, enforce_sorted):
    module = Packed(kind, bidirectional).eval()
    proto = export_packed(module, opset, enforce_sorted)
    assert any(n.op_type == kind and n.input[4] for n in proto.graph.node)  # sequence_lens from the input
    assert any(n.op_type == "TopK" for n in proto.graph.node) != enforce_sorted  # the batch sorted by length
    ex = liftir.Explainer(proto, "saliency")
    needed = {ex.graph.nodes[n].op_type for n in ex.plan.order_for((ex.output,))}
    assert "TopK" not in needed and kind in needed  # the sort is undone, the op batch first
    module.sorted = False
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    x0 = 0.5 * rng.standard_normal((1, 6, 3)).astype(np.float32)
    lengths = np.array([2, 6, 1, 4])
    feeds = {"x": x, "lengths": lengths}
    xt = torch.tensor(x, requires_grad=True)
    out = module(xt, torch.tensor(lengths))
    np.testing.assert_allclose(liftir.Explainer(proto, "saliency").predict(feeds), out.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_ort(proto, feeds)[0], out.detach().numpy(), rtol=1e-5, atol=1e-6)
    out[:, 2].sum().backward()
    sal = liftir.Explainer(proto, "saliency").attribute(feeds, target=2)["x"]
    grad = xt.grad.numpy()
    assert np.abs(sal - grad).max() <= 1e-5 * np.abs(grad).max()
    assert not grad[np.arange(6)[None] >= lengths[:, None]].any()  # torch agrees: padding has no gradient
    # DeepLIFT against onnxruntime's f(x) - f(x0) (float32) and torch's in float64
    diff = run_ort(proto, feeds)[0][:, 2] - run_ort(proto, {"x": np.repeat(x0, 4, 0), "lengths": lengths})[0][:, 2]
    attr, delta = liftir.Explainer(proto, "deeplift").attribute(feeds, baselines={"x": x0}, target=2,
                                                                return_convergence_delta=True)
    assert np.abs(attr["x"].reshape(4, -1).sum(1) - diff).max() <= 1e-5 * np.abs(diff).max()
    double = Packed(kind, bidirectional).double().eval()
    double.load_state_dict(module.state_dict())
    double.sorted = False
    with torch.no_grad():
        diff64 = (double(torch.tensor(x, dtype=torch.float64), torch.tensor(lengths))[:, 2]
                  - double(torch.tensor(np.repeat(x0, 4, 0), dtype=torch.float64), torch.tensor(lengths))[:, 2]).numpy()
    attr64 = liftir.Explainer(proto, "deeplift", precision="float64").attribute(
        {"x": x.astype(np.float64), "lengths": lengths}, baselines={"x": x0.astype(np.float64)}, target=2)["x"]
    assert np.abs(attr64.reshape(4, -1).sum(1) - diff64).max() <= 1e-9 * np.abs(diff64).max()


def test_packed_integrated_gradients_equal_captum():
    from captum.attr import IntegratedGradients
    module = Packed("LSTM", True).eval()
    proto = export_packed(module, 17)
    double = Packed("LSTM", True).double().eval()
    double.load_state_dict(module.state_dict())
    double.sorted = False
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 6, 3))
    x0 = 0.3 * rng.standard_normal((3, 6, 3))
    lengths = np.array([3, 6, 1])
    ours = liftir.Explainer(proto, "integrated_gradients", precision="float64").attribute(
        {"x": x, "lengths": lengths}, baselines={"x": x0}, target=1, n_steps=16)["x"]
    theirs = IntegratedGradients(double).attribute(
        torch.tensor(x), baselines=torch.tensor(x0), target=1, additional_forward_args=(torch.tensor(lengths),),
        n_steps=16, method="gausslegendre").numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-7 * np.abs(theirs).max(), rtol=1e-6)

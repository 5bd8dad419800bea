"""The compiled engine (liftir/compile) against the interpreter it is traced from.

The compiled graph is the interpreter's own rules recorded as ONNX, so on every model it
must give the interpreter's numbers (to 1e-6 relative; they are usually bit for bit the
same), with summation-to-delta holding, and whatever it cannot record must run on the
interpreter, said in a log line, never a silently different answer.
"""
from __future__ import annotations

import logging
import warnings
import math

import numpy as np
import pytest
from onnx import helper

import liftir
from liftir.compile import tracer
from liftir.rule import fill_where, reduce_rows_where
from onnx_builders import model

METHODS = [("deeplift", "cross_max"), ("deeplift", "paper"), ("saliency", "cross_max"),
           ("input_x_gradient", "cross_max"), ("guided_backprop", "cross_max"), ("deconvnet", "cross_max"),
           ("deeplift_revealcancel", "cross_max")]
REL = 1e-6


def _both(m, method, max_rule, x, x0, target, **kwargs):
    interp = liftir.Explainer(m, method, max_rule=max_rule, **kwargs)
    comp = liftir.Explainer(m, method, max_rule=max_rule, engine="compiled", **kwargs)
    a = interp.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
    b = comp.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
    assert comp._compiled.passes and all(p is not None for p in comp._compiled.passes.values()), \
        comp._compiled.reasons
    return interp, comp, a, b


def _assert_same(a, b, truth=None):
    """Equal to REL of the largest attribution. With `truth` (the float64 interpreter), for
    smooth activations: at least as accurate as the interpreter instead. Their rules take
    (f(x) - f(x0)) / dx where |dx| >= 1, and where both ends saturate that difference
    cancels, so one ulp of exp (NumPy's and onnxruntime's differ by one) moves the
    multiplier by up to ~1e-5 of itself in both engines alike."""
    (ra, da), (rb, db) = a, b
    scale = max(float(np.abs(ra).max()), 1e-30)
    diff = float(np.abs(ra - rb).max())
    if truth is not None and diff > REL * scale:
        assert float(np.abs(rb - truth).max()) <= max(2 * float(np.abs(ra - truth).max()), REL * scale)
    else:
        assert diff <= REL * scale
    if da is not None:
        assert np.abs(da - db).max() <= REL * max(1.0, scale) or truth is not None


def _assert_conserves(ex, x, x0, delta):
    """|sum of attributions - (f(x) - f(x0))| within float32 round-off of the outputs."""
    scale = max(1.0, float(np.abs(ex.predict(x)).max()), float(np.abs(ex.predict(x0.reshape((-1,) + x.shape[1:]))).max()))
    assert np.abs(delta).max() <= 1e-4 * scale


# ---- the benchmark models, small ----------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_models():
    zoo = pytest.importorskip("zoo")
    out = {}
    for name, kwargs, batch in [("all_conv", {"width": 8}, 2), ("vgg_maxpool", {"relu_before_pool": True}, 2), ("residual_bn", {}, 3),
                                ("mlp_relu_sigmoid_tanh", {}, 5), ("maxpool_relu_adjacent", {}, 3)]:
        net = zoo.build(name, **kwargs)
        proto = zoo.export(net, zoo.make_input(name, 2), None, dynamo=False)
        x = zoo.make_input(name, batch, seed=1).numpy()
        x0 = (np.random.default_rng(7).standard_normal(x.shape[1:]) * 0.1).astype(np.float32)
        out[name] = (proto, x, x0)
    return out


@pytest.mark.parametrize("name", ["all_conv", "vgg_maxpool", "residual_bn", "mlp_relu_sigmoid_tanh",
                                  "maxpool_relu_adjacent"])
def test_compiled_equals_interpreter_on_benchmark_models(zoo_models, name):
    proto, x, x0 = zoo_models[name]
    methods = METHODS if name != "vgg_maxpool" else METHODS[:3]  # the biggest graph: fewer methods
    for method, max_rule in methods:
        interp, comp, a, b = _both(proto, method, max_rule, x, x0, 1)
        _assert_same(a, b)
        if method in ("deeplift", "deeplift_revealcancel") and max_rule == "cross_max":
            _assert_conserves(comp, x, x0, b[1])  # the paper's max rule need not conserve


# ---- random graphs (fuzzer style) --------------------------------------------------------
def _random_net(rng):
    """A random conv net: random layers, a random residual, random pools and activations."""
    c, size = int(rng.integers(2, 4)), int(rng.integers(6, 10))
    nodes, consts = [], {}
    cur, shape = "x", (c, size, size)
    same_shape = {shape: ["x"]}

    def name(prefix):
        return f"{prefix}{len(nodes)}"

    def add_const(value):
        n = f"w{len(consts)}"
        consts[n] = value.astype(np.float32)
        return n

    for _ in range(int(rng.integers(3, 7))):
        kind = rng.choice(["conv", "conv_s2", "relu", "sigmoid", "tanh", "maxpool", "maxpool_overlap",
                           "avgpool", "bn", "residual", "relu_pool", "elu"])
        ch, h, _w = shape
        out = name("t")
        if kind in ("conv", "conv_s2"):
            m = int(rng.integers(2, 5))
            stride = 2 if kind == "conv_s2" and h >= 4 else 1
            wn = add_const(rng.standard_normal((m, ch, 3, 3)) * 0.5)
            bn_ = add_const(rng.standard_normal(m) * 0.1)
            nodes.append(helper.make_node("Conv", [cur, wn, bn_], [out], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                          strides=[stride, stride]))
            shape = (m, (h - 1) // stride + 1, (h - 1) // stride + 1)
        elif kind == "relu_pool":  # dx == 0 at the pool where actual and reference are both <= 0
            nodes.append(helper.make_node("Relu", [cur], [out + "r"]))
            nodes.append(helper.make_node("MaxPool", [out + "r"], [out], kernel_shape=[3, 3], strides=[2, 2],
                                          pads=[1, 1, 1, 1]))
            shape = (ch, (h - 1) // 2 + 1, (h - 1) // 2 + 1)
        elif kind in ("relu", "sigmoid", "tanh", "elu"):
            nodes.append(helper.make_node(kind.capitalize(), [cur], [out]))
        elif kind == "maxpool" and h >= 4:
            nodes.append(helper.make_node("MaxPool", [cur], [out], kernel_shape=[2, 2], strides=[2, 2]))
            shape = (ch, h // 2, h // 2)
        elif kind == "maxpool_overlap":
            nodes.append(helper.make_node("MaxPool", [cur], [out], kernel_shape=[3, 3], strides=[1, 1],
                                          pads=[1, 1, 1, 1]))
        elif kind == "avgpool":
            nodes.append(helper.make_node("AveragePool", [cur], [out], kernel_shape=[3, 3], strides=[1, 1],
                                          pads=[1, 1, 1, 1], count_include_pad=int(rng.integers(0, 2))))
        elif kind == "bn":
            params = [add_const(rng.uniform(0.5, 1.5, ch)), add_const(rng.standard_normal(ch) * 0.1),
                      add_const(rng.standard_normal(ch) * 0.1), add_const(rng.uniform(0.5, 2, ch))]
            nodes.append(helper.make_node("BatchNormalization", [cur] + params, [out]))
        elif kind == "residual" and len(same_shape.get(shape, [])) > 0:
            nodes.append(helper.make_node("Add", [cur, str(rng.choice(same_shape[shape]))], [out]))
        else:
            continue
        cur = out
        same_shape.setdefault(shape, []).append(cur)
    ch, h, _w = shape
    pooled = name("g")
    if rng.integers(0, 2):
        nodes.append(helper.make_node("GlobalAveragePool", [cur], [pooled]))
        nodes.append(helper.make_node("Flatten", [pooled], [name("f")]))
        features = ch
    else:
        nodes.append(helper.make_node("Flatten", [cur], [name("f")]))
        features = ch * h * h
    flat = nodes[-1].output[0]
    wn = add_const(rng.standard_normal((4, features)) * 0.5)
    bn_ = add_const(rng.standard_normal(4) * 0.1)
    nodes.append(helper.make_node("Gemm", [flat, wn, bn_], ["y"], transB=1))
    return model(nodes, {"x": (None, c, size, size)}, ["y"], consts), (c, size, size)


@pytest.mark.parametrize("seed", range(10))
def test_compiled_equals_interpreter_on_random_graphs(seed):
    rng = np.random.default_rng(100 + seed)
    m, shape = _random_net(rng)
    x = rng.standard_normal((3,) + shape).astype(np.float32)
    x0 = (rng.standard_normal((1,) + shape) * 0.3).astype(np.float32)
    x0[0, :, :, ::2] = x[0, :, :, ::2]  # dx == 0 exactly at some positions: the rules' fallbacks run
    smooth = any(n.op_type in ("Sigmoid", "Tanh", "Elu") for n in m.graph.node)
    for method, max_rule in METHODS:
        target = int(rng.integers(0, 4))
        interp, comp, a, b = _both(m, method, max_rule, x, x0, target)
        if smooth and method == "deeplift_revealcancel":
            # its split parts are plain float32 differences f(x0 + d+) - f(x0) (no closed form),
            # so onnxruntime's exp, an ulp from NumPy's, moves them by float32 cancellation
            # (up to 2.3e-6 of the largest attribution here): conservation is what both keep
            _assert_conserves(comp, x, x0, b[1])
            continue
        truth = None
        if smooth:
            truth = liftir.Explainer(m, method, max_rule=max_rule, precision="float64").attribute(
                x.astype(np.float64), baselines=x0.astype(np.float64), target=target)
        _assert_same(a, b, truth)
        if method in ("deeplift", "deeplift_revealcancel") and max_rule == "cross_max":
            _assert_conserves(comp, x, x0, b[1])  # the paper's max rule need not conserve


def test_compiled_equals_interpreter_on_transformer_mlp_pieces():
    """The transformer rules' elementwise pieces trace: LayerNorm, erf GELU written out (Div,
    Erf, Add, Mul), the Gelu op, GPT-2's tanh GELU (Pow 3, Tanh), a product of two activations.
    Their shortcuts (the derivative only where dx ~ 0, one rational fit per erf range) are
    recorded on every element instead: same values. dx == 0 at some positions exercises them."""
    rng = np.random.default_rng(21)
    d, h = 8, 12
    c = {"s": rng.uniform(0.5, 1.5, d), "b": rng.standard_normal(d) * 0.1, "w1": rng.standard_normal((d, h)) * 0.6,
         "w2": rng.standard_normal((h, h)) * 0.4, "w3": rng.standard_normal((h, 3)) * 0.4,
         "r2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5), "three": np.float32(3),
         "k": np.float32(0.044715), "a": np.float32(np.sqrt(2 / np.pi))}
    c = {k: np.asarray(v, np.float32) for k, v in c.items()}
    c["ax"] = np.array([1], np.int64)
    mk = helper.make_node
    nodes = [mk("LayerNormalization", ["x", "s", "b"], ["ln"], axis=-1),
             mk("MatMul", ["ln", "w1"], ["u"]),
             mk("Div", ["u", "r2"], ["u1"]), mk("Erf", ["u1"], ["e"]), mk("Add", ["e", "one"], ["e1"]),
             mk("Mul", ["u", "e1"], ["ue"]), mk("Mul", ["ue", "half"], ["g1"]),
             mk("MatMul", ["g1", "w2"], ["v"]), mk("Gelu", ["v"], ["g2"]),
             mk("Pow", ["v", "three"], ["v3"]), mk("Mul", ["v3", "k"], ["kv3"]), mk("Add", ["v", "kv3"], ["inner"]),
             mk("Mul", ["inner", "a"], ["ai"]), mk("Tanh", ["ai"], ["t"]), mk("Add", ["t", "one"], ["t1"]),
             mk("Mul", ["v", "t1"], ["g3"]),
             mk("Mul", ["g2", "g3"], ["gg"]),
             mk("MatMul", ["gg", "w3"], ["z"]), mk("ReduceMean", ["z", "ax"], ["y"], keepdims=0)]
    m = model(nodes, {"x": (None, 5, d)}, ["y"], c, opset=20)
    x = rng.standard_normal((3, 5, d)).astype(np.float32)
    x0 = (rng.standard_normal((1, 5, d)) * 0.3).astype(np.float32)
    x0[0, 1] = x[0, 1]  # a token equal in both: dx == 0 through the whole block on that row
    for method in ("deeplift", "saliency"):
        interp, comp, a, b = _both(m, method, "cross_max", x, x0, 1)
        truth = liftir.Explainer(m, method, precision="float64").attribute(
            x.astype(np.float64), baselines=x0.astype(np.float64), target=1)
        _assert_same(a, b, truth)
        if method == "deeplift":
            _assert_conserves(comp, x, x0, b[1])


def _scalars_against_row_statistics(graph, shapes, initializers):
    """Elementwise nodes (If bodies included) that combine a one-element operand of rank 0 or
    1 with a result whose last axis has length 1: onnxruntime broadcasts those one element
    at a time (tracer._scalar_as_ones)."""
    found = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                found += _scalars_against_row_statistics(attr.g, shapes, initializers)
        if node.op_type not in ("Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Pow", "Greater", "Less",
                                "Equal", "GreaterOrEqual", "LessOrEqual", "And", "Or"):
            continue
        out = shapes.get(node.output[0])
        operands = [shapes.get(i, initializers.get(i)) for i in node.input]
        if out and len(out) >= 2 and out[-1] == 1 and any(
                o is not None and len(o) <= 1 and int(np.prod(o)) == 1 for o in operands):
            found.append((node.name, node.op_type, operands, out))
    return found


def test_compiled_pass_gives_row_statistics_no_rank_0_scalar():
    """A LayerNorm and an attention-style softmax keep rows' statistics (keepdims, last axis 1)
    and scale them by constants; the compiled pass writes those constants with the result's
    rank (Mul of a [16, 16, 16, 1] by a scalar took 50 us in onnxruntime, by a [1, 1, 1, 1]
    1.2 us), and still equals the interpreter and conserves."""
    rng = np.random.default_rng(23)
    t, d = 6, 8
    c = {"s": rng.uniform(0.5, 1.5, d), "b": rng.standard_normal(d) * 0.1, "wq": rng.standard_normal((d, d)) * 0.5,
         "wk": rng.standard_normal((d, d)) * 0.5, "w3": rng.standard_normal((d, 3)) * 0.4}
    c = {k: np.asarray(v, np.float32) for k, v in c.items()}
    c["ax"] = np.array([1], np.int64)
    mk = helper.make_node
    nodes = [mk("LayerNormalization", ["x", "s", "b"], ["ln"], axis=-1),
             mk("MatMul", ["ln", "wq"], ["q"]), mk("MatMul", ["ln", "wk"], ["k"]),
             mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), mk("MatMul", ["q", "kt"], ["scores"]),
             mk("Softmax", ["scores"], ["p"], axis=-1), mk("MatMul", ["p", "ln"], ["o"]),
             mk("MatMul", ["o", "w3"], ["z"]), mk("ReduceMean", ["z", "ax"], ["y"], keepdims=0)]
    m = model(nodes, {"x": (None, t, d)}, ["y"], c, opset=18)
    x = rng.standard_normal((4, t, d)).astype(np.float32)
    x0 = (rng.standard_normal((1, t, d)) * 0.3).astype(np.float32)
    interp, comp, a, b = _both(m, "deeplift", "cross_max", x, x0, 1)
    _assert_same(a, b)
    _assert_conserves(comp, x, x0, b[1])
    passes = [p for p in comp._compiled.passes.values() if p is not None]
    assert passes
    graph = passes[0].model.graph
    initializers = {i.name: tuple(i.dims) for i in graph.initializer}
    statistics = [n for n in graph.node if n.op_type.startswith("Reduce")]
    assert statistics  # the rules did keep rows' statistics
    assert _scalars_against_row_statistics(graph, passes[0].shapes, initializers) == []


def test_compiled_gelu_slope_where_dx_is_tiny_is_as_accurate_as_the_interpreters():
    """Where dx ~ 0 the Gelu rule takes the derivative at the midpoint; a float32 compiled
    pass computes it from onnxruntime's Erf (1/2 + erf / 2) instead of erfc's rational fits.
    Its error is absolute, ~1e-7 (relative to df's own tiny value for x << 0): no worse
    than the interpreter's, against the float64 interpreter, from x = -9 to 9. The slope at
    x instead of at the midpoint would be off by f'' dx / 2 ~ 1e-5."""
    rng = np.random.default_rng(5)
    n = 4000
    m = model([helper.make_node("Gelu", ["x"], ["g"]), helper.make_node("ReduceSum", ["g", "ax"], ["y"], keepdims=1)],
              {"x": (None, n)}, ["y"], {"ax": np.array([1], np.int64)}, opset=20)
    x0 = rng.uniform(-9, 9, (1, n)).astype(np.float32)
    x = np.concatenate([x0 + rng.uniform(-1, 1, (1, n)).astype(np.float32) * np.float32(1e-4) * (1 + abs(x0)),
                        x0 + rng.uniform(-1, 1, (1, n)).astype(np.float32) * np.float32(1e-5)])
    dx = x.astype(np.float64) - x0
    moved = dx != 0
    truth = liftir.Explainer(m, "deeplift", precision="float64").attribute(
        x.astype(np.float64), baselines=x0.astype(np.float64))[moved] / dx[moved]
    erf = np.vectorize(math.erf)
    scale = sum(abs(v * 0.5 * (1 + erf(v / math.sqrt(2)))).sum(axis=1) for v in (x.astype(np.float64), x0))
    errors = {}
    for engine in ("interpreter", "compiled"):
        explainer = liftir.Explainer(m, "deeplift", engine=engine)
        got, delta = explainer.attribute(x, baselines=x0, return_convergence_delta=True)
        errors[engine] = abs(got[moved] / dx[moved] - truth).max()
        # summation-to-delta, to the float32 rounding of the forward's sum of 4000 outputs
        assert np.all(abs(delta) <= 4 * np.finfo(np.float32).eps * scale), (engine, delta, scale)
    assert errors["compiled"] <= max(errors["interpreter"], 1e-7) * 1.5, errors
    assert errors["interpreter"] < 3e-7, errors


def test_compiled_gelus_against_a_variant_reference_equal_the_interpreter():
    """The reference of each sample is the sequence itself but for one base (a variant's
    effect): outside that base's receptive field nothing moves, so nearly every element of
    the GELUs takes the derivative fallback, which a compiled pass then computes on every
    element with one Where instead of searching, gathering and scattering them all
    (tracer.fill_masked). The same attributions as the interpreter; summation-to-delta,
    with no ConvergenceWarning although the outputs move by a few ulps."""
    rng = np.random.default_rng(11)
    length, channels = 2048, 16
    inits = {"w1": (rng.standard_normal((channels, 4, 9)) * 0.3).astype(np.float32),
             "w2": (rng.standard_normal((8, channels, 9)) * 0.1).astype(np.float32),
             "ax": np.array([1, 2], np.int64)}
    m = model([helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[4, 4]), helper.make_node("Gelu", ["c1"], ["g1"]),
               helper.make_node("Conv", ["g1", "w2"], ["c2"], pads=[4, 4]), helper.make_node("Gelu", ["c2"], ["g2"]),
               helper.make_node("ReduceSum", ["g2", "ax"], ["y"], keepdims=0)],
              {"x": (None, 4, length)}, ["y"], inits, opset=20)
    x0 = np.eye(4, dtype=np.float32)[rng.integers(0, 4, length)].T[None]
    x = np.repeat(x0, 4, axis=0)
    for i, at in enumerate(rng.choice(length, 4, replace=False)):
        x[i, :, at] = np.roll(x0[0, :, at], 1 + i % 3)  # another base there
    with warnings.catch_warnings():
        warnings.simplefilter("error", liftir.diagnostics.ConvergenceWarning)
        interp, comp, a, b = _both(m, "deeplift", "cross_max", x, x0, None)
    _assert_same(a, b)
    _assert_conserves(comp, x, x0, b[1])
    # the fallback's slopes reach no attribution (their dx is 0) but every multiplier
    multipliers = [e.attribute(x, baselines=x0, multiply_by_inputs=False) for e in (interp, comp)]
    np.testing.assert_allclose(multipliers[1], multipliers[0], rtol=0, atol=REL * float(np.abs(multipliers[0]).max()))


# ---- caching ------------------------------------------------------------------------------
def test_one_compiled_pass_serves_every_target_of_a_batch_shape(monkeypatch):
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "1")  # one pass per batch shape, no row groups
    rng = np.random.default_rng(3)
    m, shape = _random_net(rng)
    ex = liftir.Explainer(m, "deeplift", engine="compiled")
    ref = liftir.Explainer(m, "deeplift")
    x = rng.standard_normal((4,) + shape).astype(np.float32)
    for target in (0, 3, [0, 1, 2, 3]):
        _assert_same((ref.attribute(x, target=target), None), (ex.attribute(x, target=target), None))
    assert len(ex._compiled.passes) == 1  # the seed is an input of the graph
    ex.attribute(x[:2], target=1)
    assert len(ex._compiled.passes) == 2  # a new batch shape compiles once more
    _assert_same((ref.attribute(x, target="all"), None), (ex.attribute(x, target="all"), None))


@pytest.mark.parametrize("method", ["deeplift", "saliency", "deeplift_revealcancel"])
@pytest.mark.parametrize("own_references, target", [(False, "all"), (True, [0, 1, 2, 0, 1, 2, 0])])
def test_row_groups_on_several_threads_give_the_whole_pass(monkeypatch, method, own_references, target):
    """With 3 CPU threads a pass of 7 samples runs as row groups of 3, 2 and 2 at once, on
    one-thread sessions (liftir/compile/engine.py `row_groups`): the same attributions and
    deltas as the interpreter, for every target or one per sample, with a shared or a
    per-sample reference."""
    rng = np.random.default_rng(11)
    m, shape = _random_net(rng)
    x = rng.standard_normal((7,) + shape).astype(np.float32)
    x0 = (0.3 * rng.standard_normal((7 if own_references else 1,) + shape)).astype(np.float32)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "1")
    want = liftir.Explainer(m, method).attribute(x, baselines=x0, target=target, return_convergence_delta=True)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "3")
    ex = liftir.Explainer(m, method, engine="compiled")
    got = ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
    _assert_same(want, got)
    keys = [key for key, compiled in ex._compiled.passes.items() if compiled is not None]
    assert sorted(key[2] for key in keys) == [2, 3] and {key[-1] for key in keys} == {1}, keys
    assert all(p.session.get_session_options().intra_op_num_threads == 1 for p in ex._compiled.passes.values())
    if method != "saliency":  # summation-to-delta
        _assert_conserves(ex, x, x0, got[1])
    # a second call knows the groups compile: no feeds built again to ask
    monkeypatch.setattr(ex, "_sample_compiles", lambda *a: pytest.fail("asked again"))
    ex._compiled.runs_whole.clear()  # however fast the first call ran, groups again
    grouped = []
    run_groups = ex._compiled.run_groups
    monkeypatch.setattr(ex._compiled, "run_groups", lambda *a: grouped.append(1) or run_groups(*a))
    _assert_same(got, ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True))
    assert grouped


@pytest.mark.parametrize("samples, references, own", [(7, 3, False), (1, 5, False), (5, 2, True)])
def test_deeplift_shap_row_groups_split_samples_or_one_samples_references(monkeypatch, samples, references, own):
    """DeepLIFT-SHAP on 3 threads: a pass of several samples is cut into groups of whole
    samples (with all their references), a pass of one sample into groups of its references;
    the averages over references, deltas and per-pair deltas are the interpreter's."""
    rng = np.random.default_rng(13)
    m, shape = _random_net(rng)
    x = rng.standard_normal((samples,) + shape).astype(np.float32)
    refs = (0.3 * rng.standard_normal(((samples,) if own else ()) + (references,) + shape)).astype(np.float32)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "1")
    interp = liftir.Explainer(m, "deeplift_shap")
    want = interp.attribute(x, baselines=refs, target="all", return_convergence_delta=True)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "3")
    ex = liftir.Explainer(m, "deeplift_shap", engine="compiled")
    got = ex.attribute(x, baselines=refs, target="all", return_convergence_delta=True)
    _assert_same(want, got)
    keys = [key for key, compiled in ex._compiled.passes.items() if compiled is not None]
    assert keys and {key[-1] for key in keys} == {1}, keys
    assert max(key[2] * key[5] for key in keys) < samples * references  # (samples, pairs) per pass: cut
    scale = max(1.0, float(np.abs(ex.predict(x)).max()))
    assert np.abs(got[1]).max() <= 1e-4 * scale  # summation-to-delta, averaged over references


@pytest.mark.parametrize("samples, steps, own", [(7, 8, False), (5, 6, True), (1, 9, False)])
def test_integrated_gradients_row_groups_split_samples_or_one_samples_points(monkeypatch, samples, steps, own):
    """Integrated gradients on 3 threads: groups of whole samples (all their points; a shared
    or a per-sample baseline), or of one sample's points; the weighted sums run point by
    point in the quadrature's order after the groups, so they are the interpreter's."""
    rng = np.random.default_rng(14)
    m, shape = _random_net(rng)
    x = rng.standard_normal((samples,) + shape).astype(np.float32)
    x0 = (0.3 * rng.standard_normal((samples if own else 1,) + shape)).astype(np.float32)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "1")
    want = liftir.Explainer(m, "integrated_gradients").attribute(x, baselines=x0, target="all", n_steps=steps,
                                                                 return_convergence_delta=True)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "3")
    ex = liftir.Explainer(m, "integrated_gradients", engine="compiled")
    got = ex.attribute(x, baselines=x0, target="all", n_steps=steps, return_convergence_delta=True)
    _assert_same(want, got)
    keys = [key for key, compiled in ex._compiled.passes.items() if compiled is not None]
    assert keys and {key[-1] for key in keys} == {1} and max(key[2] for key in keys) < samples * steps, keys


def test_row_groups_faster_than_their_dispatch_run_whole_from_then_on(monkeypatch):
    """A pass whose groups took less than SMALL_S runs whole on the next call (one session
    of every thread for the whole shape), with the same attributions."""
    from liftir.compile import engine
    rng = np.random.default_rng(15)
    m, shape = _random_net(rng)
    x = rng.standard_normal((4,) + shape).astype(np.float32)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "2")
    monkeypatch.setattr(engine, "SMALL_S", 1e9)
    ex = liftir.Explainer(m, "deeplift", engine="compiled")
    first = ex.attribute(x, target=1, return_convergence_delta=True)
    assert [(key[2], key[-1]) for key in ex._compiled.passes] == [(2, 1)]
    second = ex.attribute(x, target=1, return_convergence_delta=True)
    assert [(key[2], key[-1]) for key in ex._compiled.passes] == [(2, 1), (4, None)]
    _assert_same(first, second)
    _assert_conserves(ex, x, np.zeros_like(x), second[1])


@pytest.mark.parametrize("method, samples", [("deeplift", 1), ("saliency", 3)])
def test_a_pass_too_small_to_split_runs_whole_on_every_thread(monkeypatch, method, samples):
    """One sample and its reference, or three samples of a method without reference rows
    (a group of one row could not tell the batch axis from other axes of size 1): one pass,
    on a session of every thread."""
    rng = np.random.default_rng(12)
    m, shape = _random_net(rng)
    monkeypatch.setenv("LIFTIR_NUM_THREADS", "2")
    ex = liftir.Explainer(m, method, engine="compiled")
    x = rng.standard_normal((samples,) + shape).astype(np.float32)
    got = ex.attribute(x, target=1, return_convergence_delta=True)
    if method == "deeplift":
        _assert_conserves(ex, x, np.zeros_like(x), got[1])
    keys = list(ex._compiled.passes)
    assert len(keys) == 1 and keys[0][2] == samples, keys
    assert ex._compiled.passes[keys[0]].session.get_session_options().intra_op_num_threads == 2


def test_compiled_nodes_are_named_after_the_model_node_whose_rule_emitted_them():
    """So that onnxruntime's profile of a compiled pass reads per rule
    (benchmarks/profile_compiled.py): every backward node, branches included, carries
    "<model node> (<op>) backward/", and every model node's backward is among them."""
    rng = np.random.default_rng(3)
    m, shape = _random_net(rng)
    ex = liftir.Explainer(m, "deeplift", engine="compiled")
    x = rng.standard_normal((2,) + shape).astype(np.float32)
    x0 = 0.5 * rng.standard_normal((1,) + shape).astype(np.float32)
    _, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    _assert_conserves(ex, x, x0, delta)  # renaming changed nothing the pass computes
    (compiled,) = ex._compiled.passes.values()

    def names(graph):
        for node in graph.node:
            yield node.name
            for attr in node.attribute:
                if attr.type == attr.GRAPH:
                    yield from names(attr.g)
    scopes = {name.rsplit("/", 1)[0] for name in names(compiled.model.graph) if " backward/" in name}
    wanted = {f"liftir/{node.name} ({node.op_type}) backward" for node in ex.graph.nodes.values()}
    assert scopes <= wanted
    assert len(scopes) >= len(wanted) - 1  # the model's first node may have no input to propagate to


# ---- what does not compile runs on the interpreter, and says so ----------------------------
@pytest.mark.parametrize("threads", ["1", "2"])
def test_an_untraceable_rule_falls_back_to_the_interpreter_with_the_node_named(caplog, monkeypatch, threads):
    """A recurrent node whose sequence_lens is a model input: the rule reads the lengths as
    host values (how many steps to run), which a recorded pass does not know. On two threads
    the row group that failed to compile sends the whole pass to the interpreter, said once."""
    from test_recurrent_lengths import LENS, lens_model
    monkeypatch.setenv("LIFTIR_NUM_THREADS", threads)
    m = lens_model("LSTM", layout=1, lens="input", states=False)
    x = np.random.default_rng(5).standard_normal((len(LENS), 5, 2)).astype(np.float32)
    feeds = {"x": x, "lens": LENS}
    with caplog.at_level(logging.WARNING, logger="liftir"):
        ex = liftir.Explainer(m, "deeplift", output="hn", engine="compiled")
        got, delta = ex.attribute(feeds, target=(0, 1), return_convergence_delta=True)
    want = liftir.Explainer(m, "deeplift", output="hn").attribute(feeds, target=(0, 1))
    np.testing.assert_array_equal(got["x"], want["x"])
    assert np.abs(delta).max() < 1e-5
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot compile" in message and "'lstm_node'" in message and "converted to NumPy" in message
    assert "interpreter runs it instead" in message
    assert message.count("cannot compile") == 1
    assert list(ex._compiled.passes.values()) == [None]


def test_array_code_after_the_pass_runs_on_the_interpreter():
    """attribution_func is the user's array code on the multipliers: such calls take the
    interpreter (nothing compiled), with the interpreter's very results."""
    rng = np.random.default_rng(6)
    m, shape = _random_net(rng)
    x = rng.standard_normal((2,) + shape).astype(np.float32)
    func = lambda mult, a, b: mult * (a - b) ** 2  # noqa: E731
    ex = liftir.Explainer(m, "deeplift", engine="compiled")
    np.testing.assert_array_equal(ex.attribute(x, target=0, attribution_func=func),
                                  liftir.Explainer(m, "deeplift").attribute(x, target=0, attribution_func=func))
    assert not ex._compiled.passes


@pytest.mark.parametrize("name", ["all_conv", "vgg_maxpool", "residual_bn", "mlp_relu_sigmoid_tanh"])
def test_integrated_gradients_compiled_equals_the_interpreter(zoo_models, name):
    """The path's gradient passes run compiled (one session per chunk of points): the same
    attributions and the same deltas, for one target and for several, in chunks of points."""
    proto, x, x0 = zoo_models[name]
    interp = liftir.Explainer(proto, "integrated_gradients")
    comp = liftir.Explainer(proto, "integrated_gradients", engine="compiled")
    for target, rows in ((1, None), (np.array([[0, 2]]), 3)):
        a, da = interp.attribute(x, baselines=x0, target=target, n_steps=6, internal_batch_size=rows,
                                 return_convergence_delta=True)
        b, db = comp.attribute(x, baselines=x0, target=target, n_steps=6, internal_batch_size=rows,
                               return_convergence_delta=True)
        assert comp._compiled.passes and all(p is not None for p in comp._compiled.passes.values()), \
            comp._compiled.reasons
        _assert_same((a, da), (b, db))


@pytest.mark.parametrize("name", ["all_conv", "vgg_maxpool", "residual_bn", "mlp_relu_sigmoid_tanh"])
def test_deeplift_shap_compiled_equals_the_interpreter(zoo_models, name):
    """(sample, reference) pairs expanded inside the compiled graph: the same attributions,
    deltas and per-pair multipliers as the interpreter, for references shared by all
    samples and for each sample's own, one target and several, whole and chunked passes;
    and summation-to-delta per pair."""
    proto, x, x0 = zoo_models[name]
    rng = np.random.default_rng(11)
    shared = (x0[None] + 0.3 * rng.standard_normal((5,) + x0.shape)).astype(np.float32)
    own = (x0[None, None] + 0.3 * rng.standard_normal((x.shape[0], 3) + x0.shape)).astype(np.float32)
    interp = liftir.Explainer(proto, "deeplift_shap")
    comp = liftir.Explainer(proto, "deeplift_shap", engine="compiled")
    for refs, target, batch_size in ((shared, 1, None), (own, np.array([[0, 2]]), 1)):
        a = interp.attribute(x, baselines=refs, target=target, batch_size=batch_size, return_convergence_delta=True)
        b = comp.attribute(x, baselines=refs, target=target, batch_size=batch_size, return_convergence_delta=True)
        assert comp._compiled.passes and all(p is not None for p in comp._compiled.passes.values()), \
            comp._compiled.reasons
        _assert_same(a, b)
    m_a, d_a = interp.pair_multipliers(x, shared, target=1)
    m_b, d_b = comp.pair_multipliers(x, shared, target=1)
    _assert_same((m_a, None), (m_b, None))
    np.testing.assert_array_equal(d_a, d_b)  # f(x) - f(r_b): the same forward values
    residual = (m_b.astype(np.float64) * (x[:, None] - shared[None])).reshape(x.shape[0], 5, -1).sum(-1) - d_b
    assert np.abs(residual).max() <= 1e-5 * max(1.0, float(np.abs(d_b).max()))


@pytest.mark.parametrize("name", ["expm1", "expm1_large", "expm1_bounded", "exprel_large", "exprel_nonpositive",
                                  "tanh_half_ratio", "tanh", "log1p", "logaddexp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tracer_functions_without_an_onnx_op_keep_numpys_accuracy(name, dtype):
    """Within a few ulps of the float64 truth (log1p and logaddexp(x, 0) are computed in
    float64: onnxruntime's float32 Log is ~4 ulps off)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-3, 3, 4000), rng.uniform(-1e-3, 1e-3, 2000),
                        rng.uniform(-0.6, 0.6, 2000)]).astype(dtype)
    special = None
    if name == "expm1_large":  # beyond tracer._SMALL elements: Kahan's quotient
        name, x = "expm1", np.concatenate([x * s for s in (1, 0.9, 0.8, 1.1, 1.2)]).astype(dtype)
        assert x.size > tracer._SMALL
        special = np.array([np.inf, -np.inf, np.nan, 1e3, -1e3, 0.0], dtype)
        x = np.concatenate([x, special])
    if name == "expm1_bounded":  # |x| < 1 promised (a softmax's near rows): the tanh route, down to 1e-30
        # and 0 (its stated domain: below, onnxruntime's Tanh is off by up to 1e-5 relative, 1e-42 absolute)
        x = np.concatenate([x[np.abs(x) < 1], [0.0, 1e-30, -1e-30, 1e-20, -1e-20, 0.999999, -0.999999],
                            np.linspace(-0.9999, 0.9999, 4 * tracer._SMALL),
                            10.0 ** rng.uniform(-30, 0, tracer._SMALL) * rng.choice([-1, 1], tracer._SMALL)]).astype(dtype)
    if name == "exprel_large":  # Kahan's route with its guards: below -20, up to 88, and 0
        x = np.concatenate([x, [0.0, -1e-30, 1e-30, 88.0, -200.0], np.linspace(-120, 80, 4 * tracer._SMALL)]).astype(dtype)
    if name == "exprel_nonpositive":  # x <= 0 promised (a softmax's -|dz|): the tanh route, down to tiny and -inf
        x = -np.abs(np.concatenate([x, [0.0, -1e-30, -1e-38, -1e-45, -200.0, -np.inf],
                                    -10.0 ** rng.uniform(-12, 1, 4 * tracer._SMALL),
                                    np.linspace(-120, 0, 4 * tracer._SMALL)])).astype(dtype)
    if name == "tanh_half_ratio":  # a >= 0 promised (a softmax's |dz|): 0, tiny, large and inf
        x = np.abs(np.concatenate([x, [0.0, 1e-45, 1e-38, 1e-30, 2e-30, 1e-29, 1e-20, 300.0, np.inf],
                                   10.0 ** rng.uniform(-30, 2.5, 4 * tracer._SMALL),
                                   np.linspace(0, 40, 4 * tracer._SMALL)])).astype(dtype)
    if name == "log1p":  # its domain, x > -1, down to tiny and up to large x
        x = np.concatenate([x[x > -0.999], rng.uniform(-0.999, 0, 1000), np.exp(rng.uniform(-30, 30, 1000))]).astype(dtype)
    rec = tracer.Recorder(17)
    fn = {"logaddexp": lambda v: tracer.logaddexp(v, 0), "exprel_large": tracer.exprel, "exprel_nonpositive": lambda v: tracer.exprel(v, nonpositive=True)
          }.get(name) or getattr(tracer, name)
    with tracer.recording(rec):
        y = fn(tracer.Traced(rec, "x", x.shape, dtype))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(rec.nodes, "g", [helper.make_tensor_value_info("x", elem, list(x.shape))],
                              [helper.make_tensor_value_info(y.ref, elem, list(x.shape))], rec.initializers)
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    assert got.dtype == dtype
    if special is not None:  # infinities, NaN, overflow and 0 as NumPy has them
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got[-len(special):], np.expm1(special))
        got, x = got[:-len(special)], x[:-len(special)]
    wide = x.astype(np.float64)
    if name == "logaddexp":
        want = np.logaddexp(wide, 0)
    elif name == "expm1_bounded":
        want = np.expm1(wide)
    elif name == "tanh_half_ratio":
        want = np.where(wide == 0, 0.5, np.tanh(wide / 2) / np.where(wide == 0, 1, wide))
    elif name.startswith("exprel"):
        want = np.expm1(wide) / np.where(wide == 0, 1, wide) + (wide == 0)
    else:
        want = getattr(np, name)(wide)
    assert (np.abs(got - want) / np.maximum(np.abs(want), 1e-300)).max() <= 8 * np.finfo(dtype).eps


@pytest.mark.parametrize("scale", [1.0, 2.0])  # the softmax's exp, the sigmoid's and tanh's Rescale
@pytest.mark.parametrize("size", [64, 4 * 4096])  # below and above tracer._SMALL
def test_tracer_exprel_of_negative_is_exprel_of_the_negated_step(scale, size):
    """exprel(-scale a), its negation folded into the tanh identity's halving: bit for bit
    the traced exprel of a * -scale, down to 0, tiny and infinite steps."""
    rng = np.random.default_rng(4)
    a = np.concatenate([[0.0, 1e-38, 1e-30, 1e30, np.inf], 10.0 ** rng.uniform(-12, 2, size)]).astype(np.float32)
    fused = _run_traced(lambda xp, v: xp.exprel_of_negative(v, scale), a)
    np.testing.assert_array_equal(fused, _run_traced(lambda xp, v: xp.exprel(v * -scale, nonpositive=True), a))
    rec = tracer.Recorder(17)
    with tracer.recording(rec):
        tracer.exprel_of_negative(tracer.Traced(rec, "a", a.shape, np.float32), scale)
    if a.size > tracer._SMALL:
        assert rec.ops.count("Mul") == 1


def test_tracer_refuses_what_it_cannot_record():
    rec = tracer.Recorder(17)
    t = tracer.Traced(rec, "a", (2, 3), np.float32)
    with pytest.raises(tracer.TraceError, match="Python branch"):
        bool(t > 0)
    with pytest.raises(tracer.TraceError, match="converted to NumPy"):
        np.asarray(t)
    assert bool(t.any()) and not bool(t.all())  # the branches that handle every element
    view = t[:, :2]
    view + 1  # read: its value is now recorded
    t[:, 2:] = 0.0  # the base written elsewhere: NumPy's view would see it, the recorded one not
    with pytest.raises(tracer.TraceError, match="view was read"):
        view + 1
    lazy = t[:, 1:]  # not read before the write: it reads the base as it is when read
    t[:, :1] = 1.0
    assert (lazy + 1).shape == (2, 2)


def _run_traced(fn, *arrays):
    """fn(xp, *arrays) recorded by the tracer and run by onnxruntime."""
    import onnxruntime as ort

    rec = tracer.Recorder(17)
    with tracer.recording(rec):
        y = fn(tracer, *(tracer.Traced(rec, f"in{k}", a.shape, a.dtype) for k, a in enumerate(arrays)))
    info = [helper.make_tensor_value_info(f"in{k}", helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
            for k, a in enumerate(arrays)]
    graph = helper.make_graph(rec.nodes, "g", info, [helper.make_tensor_value_info(
        y.ref, helper.np_dtype_to_tensor_dtype(y.dtype), list(y.shape))], rec.initializers)
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {f"in{k}": a for k, a in enumerate(arrays)})[0]


def _writes_through_views(xp, a):
    """What the tiled max-pool backward does: a slice of a buffer, reshaped to expose the
    window offsets, written offset by offset with integer indices; and a reshaped view
    read again after its array changed (NumPy's view sees the change)."""
    out = xp.empty((2, 3, 4, 4), dtype=np.float32)
    tiles = out[:, 0:3].reshape((2, 3, 2, 2, 2, 2))
    source = a.reshape((2, 3, 2, 2, 2, 2))
    for i in range(2):
        for j in range(2):
            tiles[..., :, i, :, j] = source[..., :, i, :, j] * (1 + i + 2 * j)
    flat = out.reshape(-1)
    out[:, 1] = 0.5
    return flat.reshape((2, 3, 4, 4)) + out[0, 2, 1]  # int index: a value broadcast along


def _gathers_splits_contracts(xp, a, b):
    """Gather's and Split's forwards (np.take, np.split) and Einsum's (np.einsum), as the
    rules call them (RevealCancel's split forward runs them in the compiled graph)."""
    parts = xp.split(a, [1, 3], axis=1)
    picked = xp.take(a, np.array([[2, 0], [1, 1]]), axis=2)
    mixed = xp.einsum("nij,nkj->nik", a, b)
    return xp.concatenate([parts[0] * 2, parts[2] - 1, parts[1]], axis=1).sum(axis=2)[:, :3] + \
        picked.reshape((a.shape[0], -1))[:, :3] + mixed.reshape((a.shape[0], -1))[:, :3]


def _fills_step_by_step(xp, a):
    """A buffer written one time step at a time (a recurrent backward's per-step gates):
    kept pending and emitted as one Concat; a read in between, an overlapping write and a
    write along another axis emit what is pending first, as NumPy's order of writes asks."""
    buf = xp.zeros((2, 3, 5, 4), dtype=np.float32)
    for t in (4, 0, 2):  # steps out of order, steps 1 and 3 left at the fill
        buf[:, :, t] = a[:, :, t] * (t + 1)
    early = buf.sum(axis=2)  # read while writes are pending
    buf[:, :, 1:3] = a[:, :, 1:3] - 1  # overlaps step 2
    buf[:, 1] = 7.0  # another axis
    ones = xp.ones((2, 3, 5, 4), dtype=np.float32)
    ones[:, :, 3] = a[:, :, 3]  # never read as a whole before being used in arithmetic
    return buf + early[:, :, None] + ones


def _fill_where_case(shape, where):
    """m = a / b with the derivative-like fn(a, row, col) = a * row + col + 1 written where
    `where` (a mask of `shape`); `row` broadcasts along the leading axis (one row, as a
    shared reference does), `col` along an inner one (1 on the middle axis of 3-D shapes,
    a scalar-like (1,) on 1-D ones)."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal(shape).astype(np.float32)
    row = rng.standard_normal((1,) + shape[1:]).astype(np.float32)
    col = rng.standard_normal((shape[0], 1) + shape[2:] if len(shape) > 2 else (1,)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask.reshape(-1, shape[-1])[where] = True

    def fill(xp, a, row, mask):
        out = a * 2
        return fill_where(xp, out, mask, lambda u, r, c: u * r + c + 1, a, row, xp.asarray(col))
    return fill, a, row, mask


# below tracer._SMALL; above it in blocks of 32, of 8 (a size 8 divides, 32 does not), by
# rows of the last axis (an odd size), 1-D in blocks and 1-D whole (odd)
@pytest.mark.parametrize("shape", [(2, 5, 6), (3, 40, 300), (3, 41, 296), (3, 37, 301), (40000,), (33411,)])
@pytest.mark.parametrize("where", ["none", "corners", "scattered", "one row", "every 7th", "most", "all"])
def test_tracer_fill_where_equals_numpy(shape, where):
    """fill_where in a trace: positions from the whole mask (small arrays) or from the blocks (or
    rows) that hold a masked element (large ones), or fn on every element where most are
    masked ("most", "all"; "every 7th" holds one in nearly every block but stays below the
    dense fraction); the same elements, the same values as NumPy."""
    rows, length = int(np.prod(shape[:-1])), shape[-1]
    flat = np.arange(rows * length)
    most = flat[np.random.default_rng(5).random(flat.size) < 0.6]
    picks = {"none": (np.array([], int), np.array([], int)),
             "corners": (np.array([0, 0, rows - 1, rows - 1]), np.array([0, length - 1, 0, length - 1])),
             "scattered": (np.random.default_rng(3).integers(0, rows, 40), np.random.default_rng(4).integers(0, length, 40)),
             "one row": (np.full(length, rows // 2), np.arange(length)),
             "every 7th": (flat[::7] // length, flat[::7] % length),
             "most": (most // length, most % length),
             "all": (slice(None), slice(None))}[where]
    fill, a, row, mask = _fill_where_case(shape, picks)
    np.testing.assert_array_equal(_run_traced(fill, a, row, mask), fill(np, a.copy(), row, mask))


def _row_reduction_case(shape, rows):
    """where(picked rows, log1p(sum(expm1(a) * row)), fallback) over the last axis: a softmax's
    near rows; `row` broadcasts (one leading row), as a shared reference's values do."""
    rng = np.random.default_rng(5)
    a = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    row = rng.random((1,) + shape[1:]).astype(np.float32)
    picked = np.zeros(shape[:-1] + (1,), bool)
    picked.reshape(-1)[rows] = True

    def reduce(xp, a, row, picked):
        fallback = a.max(axis=-1, keepdims=True) * 3
        return reduce_rows_where(xp, picked, lambda u, r: xp.log1p((xp.expm1(u) * r).sum(axis=-1, keepdims=True)),
                                 fallback, a, row)
    return reduce, a, row, picked


@pytest.mark.parametrize("shape", [(2, 5, 6), (3, 40, 300)])  # below and above tracer._SMALL
@pytest.mark.parametrize("rows", ["none", "first and last", "scattered", "all"])
def test_tracer_reduce_rows_where_equals_numpy(shape, rows):
    """reduce_rows_where in a trace: the picked rows gathered (a broadcast argument through
    its own row index), reduced, and scattered into the fallback; NumPy's values. The
    trace's expm1 and log1p are its own (Kahan's, Goldberg's), so equal to a few ulps."""
    count = int(np.prod(shape[:-1]))
    picks = {"none": np.array([], int), "first and last": np.array([0, count - 1]),
             "scattered": np.random.default_rng(2).choice(count, count // 3, replace=False),
             "all": np.arange(count)}[rows]
    reduce, a, row, picked = _row_reduction_case(shape, picks)
    expected = reduce(np, a, row, picked)
    got = _run_traced(reduce, a, row, picked)
    np.testing.assert_allclose(got, expected, rtol=4e-6, atol=0)
    fallback = a.max(axis=-1, keepdims=True) * 3
    np.testing.assert_array_equal(got[~picked], fallback[~picked])  # untouched where not picked


def test_tracer_keeps_step_by_step_writes_as_numpy_does():
    a = np.random.default_rng(2).standard_normal((2, 3, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run_traced(_fills_step_by_step, a), _fills_step_by_step(np, a))


def test_tracer_take_split_and_einsum_equal_numpy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 4, 3)).astype(np.float32)
    b = rng.standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(_run_traced(_gathers_splits_contracts, a, b), _gathers_splits_contracts(np, a, b),
                               rtol=1e-6, atol=1e-6)


def test_tracer_writes_through_reshaped_views_as_numpy_does():
    a = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run_traced(_writes_through_views, a), _writes_through_views(np, a))


def _one_entry_axis(xp, a):
    """An int index into an axis of length 1 (a GRU's one direction of Y), read and written
    through as NumPy's view is."""
    out = a * 1
    step = out[:, :, 0]
    total = step * 2
    step += 1  # reaches `out`, as NumPy's view does
    return xp.concatenate([out.reshape(-1), total.reshape(-1)])


def test_tracer_indexes_an_axis_of_length_one_without_a_copy():
    """out[:, :, 0] of a [N, T, 1, H] tensor is a Reshape (onnxruntime aliases it), not a
    Gather (a copy of the whole tensor), and behaves as NumPy's view."""
    a = np.random.default_rng(1).standard_normal((3, 5, 1, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run_traced(_one_entry_axis, a), _one_entry_axis(np, a))
    rec = tracer.Recorder(17)
    with tracer.recording(rec):
        tracer.Traced(rec, "in0", a.shape, a.dtype)[:, :, 0].ref
    assert "Gather" not in rec.ops and "Reshape" in rec.ops


# ---- export: the explainer as a standalone ONNX model ---------------------------------------
@pytest.mark.parametrize("method,target", [("deeplift", 2), ("deeplift", "all"), ("saliency", [1, 0, 3]),
                                           ("input_x_gradient", np.array([[0, 3]])), ("guided_backprop", 1)])
def test_exported_explainer_runs_in_a_bare_onnxruntime_session(method, target):
    import onnxruntime as ort

    rng = np.random.default_rng(11)
    m, shape = _random_net(rng)
    x = rng.standard_normal((3,) + shape).astype(np.float32)
    x0 = (rng.standard_normal((1,) + shape) * 0.3).astype(np.float32)
    ex = liftir.Explainer(m, method)
    exported = ex.compile(batch_size=3, target=target)
    read = {name for node in exported.graph.node for name in tracer.node_reads(node)}
    assert {t.name for t in exported.graph.initializer} <= read  # onnxruntime warns of any other
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x, "x_baseline": x0} if method == "deeplift" else {"x": x}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    want, delta = ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
    _assert_same((want, None), (got["x_attribution"], None))
    if method == "deeplift":  # summed in float32 in the graph, in float64 by attribute
        assert got["delta"].shape == delta.shape
        assert np.abs(got["delta"] - delta).max() <= 1e-5 * max(1.0, float(np.abs(want).sum()))
    else:
        assert "delta" not in got


def test_liftir_compile_command_writes_a_servable_explainer(tmp_path):
    import onnx
    import onnxruntime as ort

    from liftir.cli import main

    rng = np.random.default_rng(12)
    m, shape = _random_net(rng)
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    out = tmp_path / "explainer.onnx"
    assert main(["compile", str(path), "--method", "deeplift", "--target", "3", "--batch-size", "2",
                   "-o", str(out)]) == 0
    x = rng.standard_normal((2,) + shape).astype(np.float32)
    x0 = np.zeros((1,) + shape, np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["x_attribution"], {"x": x, "x_baseline": x0})[0]
    want = liftir.Explainer(m, "deeplift").attribute(x, target=3)
    _assert_same((want, None), (got, None))


def test_gather_with_repeated_constant_indices_compiles_to_a_scatter_add():
    """Gather's backward sums repeats (bincount in the rule): ScatterElements(add) in the graph."""
    rng = np.random.default_rng(13)
    w = (rng.standard_normal((5, 3)) * 0.5).astype(np.float32)
    idx = np.array([0, 2, 2, 4, 1, 2], np.int64)  # 2 repeated: multipliers must add up
    nodes = [helper.make_node("Tanh", ["x"], ["t"]),
             helper.make_node("Gather", ["t", "idx"], ["g"], axis=1),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    m = model(nodes, {"x": (None, 5)}, ["y"], {"idx": idx, "w": np.tile(w, (2, 1))[:6]})
    x = rng.standard_normal((4, 5)).astype(np.float32)
    for method in ("deeplift", "saliency"):
        interp, comp, a, b = _both(m, method, "cross_max", x, np.zeros((1, 5), np.float32), 1)
        _assert_same(a, b)


@pytest.mark.parametrize("index", [np.array(2, np.int64), np.array([[0, 2], [-1, 1]], np.int64)],
                         ids=["scalar", "unique"])
def test_gather_without_repeats_compiles(index):
    """Gather's backward without repeated indices places the multipliers into zeros (no
    scatter-add): a scalar index (q, k, v taken apart) as a length-1 slice, which traces."""
    rng = np.random.default_rng(14)
    w = (rng.standard_normal((4, 3)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Gather", ["t", "idx"], ["g"], axis=1)]
    last = "g"
    if index.ndim:
        nodes.append(helper.make_node("ReduceMean", ["g", "axes"], ["gm"], keepdims=0))
        nodes.append(helper.make_node("ReduceMean", ["gm", "axes"], ["gm2"], keepdims=0))
        last = "gm2"
    nodes.append(helper.make_node("MatMul", [last, "w"], ["y"]))
    m = model(nodes, {"x": (None, 3, 4)}, ["y"], {"idx": index, "w": w, "axes": np.array([1], np.int64)}, opset=18)
    x = rng.standard_normal((4, 3, 4)).astype(np.float32)
    for method in ("deeplift", "saliency"):
        interp, comp, a, b = _both(m, method, "cross_max", x, np.zeros((1, 3, 4), np.float32), 1)
        _assert_same(a, b)



@pytest.mark.parametrize("op", ["Sigmoid", "Tanh"])
def test_traced_logistic_rescale_keeps_float64_accuracy(op):
    """The compiled Rescale multiplier of sigma and tanh (one formula for every dx:
    scale^2 sigma(hi) sigma(-lo) exprel(-|D|), exprel from tanh's identity, no fill at dx == 0) against the
    float64 divided difference of the same float32 inputs, on an array beyond tracer._SMALL,
    with dx == 0, tiny, just either side of |dx| = 1, moderate and large, and steps between
    two saturated ends (where the quotient of f's float32 values the rule used before kept
    three digits): within a few ulps of the multiplier itself everywhere. The interpreter is
    held to the same bound."""
    from liftir.registry import lookup

    rng = np.random.default_rng(5)
    n = 6000
    saturated = rng.choice([-1.0, 1.0], n) * rng.uniform(4, 14, n)  # both ends saturated: same sign, 1-6 apart
    x0 = np.concatenate([rng.uniform(-8, 8, 8 * n), saturated]).astype(np.float32)
    dx = np.concatenate([np.zeros(n), rng.uniform(-1e-5, 1e-5, n), 1 + rng.uniform(-1e-6, 1e-6, n),
                         -1 + rng.uniform(-1e-6, 1e-6, n), rng.uniform(-1, 1, 2 * n), rng.uniform(-30, 30, 2 * n),
                         np.sign(saturated) * rng.uniform(1, 6, n)])
    x = (x0 + dx).astype(np.float32)
    assert x.size > tracer._SMALL
    rule = lookup(op)

    def rescale(xp, a, b):
        return rule.divided_difference(xp, a, b, None)

    a, b = x.astype(np.float64), x0.astype(np.float64)
    step = a - b  # exact
    # tanh(a) - tanh(b) = sinh(a - b) / (cosh a cosh b), sigma(v) = (1 + tanh(v / 2)) / 2: no
    # cancellation (a float64 difference of the values loses 1e-4 of it at |x| ~ 8, dx ~ 1e-6)
    c = 1.0 if op == "Tanh" else 0.5
    with np.errstate(invalid="ignore"):
        sinhc = np.where(step == 0, 1.0, np.sinh(c * step) / (c * step))
    want = c * c * sinhc / (np.cosh(c * a) * np.cosh(c * b))
    eps = np.finfo(np.float32).eps
    for name, got in (("compiled", _run_traced(rescale, x, x0)), ("interpreter", rescale(np, x, x0))):
        assert got.dtype == np.float32, name
        error = np.abs(got.astype(np.float64) - want)
        assert (error <= 8 * eps * np.abs(want)).all(), (name, (error / np.abs(want)).max())


def test_tracer_split_each_is_one_split_node_of_numpys_slices():
    """A walk over time reads each step of a tensor: one Split node with a part per step
    (each keeping the axis), the same values as NumPy's slices."""
    a = np.random.default_rng(3).standard_normal((2, 5, 3)).astype(np.float32)
    rec = tracer.Recorder(17)
    with tracer.recording(rec):
        parts = tracer.split_each(tracer.Traced(rec, "a", a.shape, np.float32), 1)
        total = tracer.concatenate([p * (i + 1) for i, p in enumerate(parts)], axis=1)
    assert [n.op_type for n in rec.nodes].count("Split") == 1
    assert all(p.shape == (2, 1, 3) for p in parts)
    np.testing.assert_array_equal(_run_traced(lambda xp, a: xp.concatenate(
        [p * (i + 1) for i, p in enumerate(tracer.split_each(a, 1))], axis=1), a), a * np.arange(1, 6, dtype=np.float32)[None, :, None])
    assert total.shape == a.shape


@pytest.mark.parametrize("opset", [13, 17, 18])  # axes as an attribute, then as an input
def test_tracer_any_and_all_of_bools_equal_numpy(opset):
    """Bool reductions run as bytes (uint8) and come back bool."""
    import onnxruntime as ort

    mask = np.random.default_rng(4).random((3, 40, 300)) < 0.001
    mask[1] = False
    mask[2, 5] = True
    rec = tracer.Recorder(opset)
    with tracer.recording(rec):
        t = tracer.Traced(rec, "m", mask.shape, np.bool_)
        outs = [t.any(axis=-1, keepdims=True), t.all(axis=-1, keepdims=True), t.any(axis=(1, 2)), t.any()]
    assert all(o.dtype == np.bool_ for o in outs)
    graph = helper.make_graph(rec.nodes, "g", [helper.make_tensor_value_info("m", helper.np_dtype_to_tensor_dtype(
        np.dtype(bool)), list(mask.shape))], [helper.make_tensor_value_info(o.ref, helper.np_dtype_to_tensor_dtype(
            np.dtype(bool)), list(o.shape)) for o in outs], rec.initializers)
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"m": mask})
    want = [mask.any(axis=-1, keepdims=True), mask.all(axis=-1, keepdims=True), mask.any(axis=(1, 2)), mask.any()]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# (spatial, kernel, strides, pads, dilations, ceil_mode): equal strides above 1 read the
# window offsets from the stride lattices (step-1 slices only); the others keep strided slices
POOL_GEOMETRIES = [((12, 12), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False),  # ResNet's stem pool
                   ((11, 13), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False),  # odd sizes: a partial block
                   ((12, 12), (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), False),  # tiles the input
                   ((11, 11), (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), True),   # ceil mode: overhang
                   ((13, 10), (5, 3), (3, 3), (2, 0, 1, 2), (1, 1), False),  # stride 3, uneven pads
                   ((14, 14), (3, 3), (2, 2), (0, 0, 0, 0), (2, 3), False),  # dilations: odd residues
                   ((12, 12), (3, 3), (1, 2), (1, 1, 1, 1), (1, 1), False),  # unequal strides: slices
                   ((9, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False)]    # stride 1: slices
POOL_GEOMETRIES_1D = [((16,), (2,), (2,), (0, 0), (1,), False),  # an Enformer-style stem's pool
                      ((15,), (3,), (2,), (1, 1), (1,), False),  # overlapping, odd length
                      ((17,), (2,), (2,), (0, 0), (1,), True),   # ceil mode: overhang
                      ((14,), (3,), (3,), (1, 0), (2,), False)]  # dilated, stride 3


def _strided_slices(rec) -> int:
    """Slice nodes a recording holds with a step other than 1."""
    return sum(1 for node in rec.nodes if node.op_type == "Slice" and len(node.input) > 4
               and (rec._const_values[node.input[4]] != 1).any())


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES + POOL_GEOMETRIES_1D,
                         ids=lambda g: "x".join(map(str, g[0])) + f"k{g[1]}s{g[2]}p{g[3]}d{g[4]}c{int(g[5])}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_traced_window_pieces_equal_numpys_strided_views(geometry, dtype):
    from liftir.kernels.windows import Windows, window_pieces
    spatial, kernel, strides, pads, dilations, ceil_mode = geometry
    windows = Windows.make(spatial, kernel, strides, pads, dilations, ceil_mode)
    x = np.random.default_rng(5).standard_normal((2, 3) + spatial).astype(dtype)

    def pieces(xp, a):
        return xp.concatenate([p.reshape((2, -1)) for p in window_pieces(xp, windows, a)], axis=1)

    np.testing.assert_array_equal(_run_traced(pieces, x), pieces(np, x))
    rec = tracer.Recorder(17)
    with tracer.recording(rec):
        pieces(tracer, tracer.Traced(rec, "a", x.shape, dtype))
    lattice = len(set(strides)) == 1 and strides[0] > 1
    assert (_strided_slices(rec) > 0) == (max(strides) > 1 and not lattice)


@pytest.mark.parametrize("nd", [1, 2])
def test_traced_interleave_equals_numpys_strided_writes(nd):
    """A tiling pool's per-offset pieces written back into one input-shaped array: the
    tracer's concatenations (`windows._interleave`) give NumPy's strided writes."""
    from liftir.kernels.windows import Windows, untile
    spatial, kernel = ((12,), (3,)) if nd == 1 else ((6, 8), (3, 2))
    windows = Windows.make(spatial, kernel, kernel, (0, 0) * nd, (1,) * nd)
    rng = np.random.default_rng(9)
    pieces = [rng.standard_normal((2, 3) + windows.out).astype(np.float32) for _ in range(int(np.prod(kernel)))]

    def interleaved(xp, *parts):
        out = xp.zeros((2, 3) + spatial, dtype=np.float32)
        untile(xp, windows, list(parts), out)
        return out

    np.testing.assert_array_equal(_run_traced(interleaved, *pieces), interleaved(np, *pieces))


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES[:6] + POOL_GEOMETRIES_1D, ids=lambda g: "x".join(map(str, g[0])) + f"k{g[1]}s{g[2]}")
@pytest.mark.filterwarnings("ignore::liftir.diagnostics.ConvergenceWarning")  # the paper rule's, expected
def test_compiled_max_pool_equals_the_interpreter_on_every_geometry(geometry):
    """After a ReLU (ties at 0 inside windows, dx == 0 where both passes are <= 0), every
    method's compiled pool backward gives the interpreter's numbers; DeepLIFT conserves."""
    from liftir.kernels.windows import Windows
    spatial, kernel, strides, pads, dilations, ceil_mode = geometry
    rng = np.random.default_rng(17)
    c = 3
    out = Windows.make(spatial, kernel, strides, pads, dilations, ceil_mode).out
    consts = {"w": (rng.standard_normal((4, c * int(np.prod(out)))) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                              dilations=list(dilations), ceil_mode=int(ceil_mode)),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    m = model(nodes, {"x": (None, c) + spatial}, ["y"], consts)
    x = rng.standard_normal((3, c) + spatial).astype(np.float32)
    x0 = (rng.standard_normal((1, c) + spatial) * 0.5).astype(np.float32)
    for method, max_rule in METHODS[:4]:
        interp, comp, a, b = _both(m, method, max_rule, x, x0, 1)
        _assert_same(a, b)
        if method == "deeplift" and max_rule == "cross_max":
            _assert_conserves(comp, x, x0, b[1])

"""Every zoo architecture x exporter, measured against references nobody here wrote, and the
README's supported-architectures table generated from those measurements.

Per row (architecture, exporter): saliency against torch.autograd of the same output
(relative to its max), DeepLIFT's summation-to-delta against onnxruntime's f(x) - f(x0) in
float32 and float64 (relative to max |f(x) - f(x0)|), integrated gradients against Captum's
IntegratedGradients in float64 with the same steps, and DeepLIFT against Captum where its
rules coincide with liftir's (float64): ``DeepLift`` on the conv zoo models Captum gets
right, ``LayerDeepLift`` at the head of the sequence models (tests/zoo_sequence.py).

The README table renders each measurement as a bound one order of magnitude above it
(``≤1e-6`` for 4e-8), and the test accepts a README bound b for a measurement v when
v ≤ b ≤ 1000 v: another CPU or BLAS may move a value tenfold either way without changing the
text. Regenerate the table after a change with

    python tests/test_architectures.py --update      # rewrites README.md's ARCH block

Rows that are known not to hold yet (``PENDING``) are measured too and shown as such; when
they start to hold, the README test fails until the table is regenerated.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

START, END = "<!-- ARCH:START -->", "<!-- ARCH:END -->"
EXPORTS = ("ts14", "ts17", "dynamo")
STEPS = 4  # integrated gradients' steps, liftir and Captum alike
SAL_TOL, DL32_TOL, DL64_TOL, IG_TOL, CAPTUM_TOL = 1e-4, 1e-4, 1e-9, 1e-4, 1e-5

# rows known not to hold yet, and why (the test asserts they still fail, so a fix shows up)
PENDING: dict[tuple[str, str], str] = {}
CAPTUM_CLASH = {  # why Captum's DeepLift is no reference on a family (shown in the table)
    "timm": "no: LayerNorm, GELU and attention products are plain gradients in Captum",
    "transformers": "no: LayerNorm/RMSNorm, GELU/SiLU and attention products are plain gradients in Captum",
    "torch": "no: attention's softmax and products are plain gradients in Captum",
}


@dataclass(frozen=True)
class Arch:
    """One architecture: where its code comes from and how to build, feed and export it."""
    name: str
    source: str                      # "timm", "transformers", "torch", "liftir zoo"
    zoo: Any                         # module with build(name) and MODELS[name] (a Spec)
    captum: str = "none"             # "deeplift" (whole model), "layer" (head input), "none"
    embedding: Callable | None = None  # text models: the word-embedding module of a build


SMALL = {"all_conv": {"width": 8}, "vgg_maxpool": {"widths": (8, 8, 16, 16), "n_classes": 10}}


def _zoo_adapter():
    """tests/zoo.py's CNNs behind the interface of the other two zoos."""
    import zoo

    class Spec:
        text = False

        def __init__(self, name):
            self.name = name

        def inputs(self, n, seed=0):
            return (zoo.make_input(self.name, n, seed=seed),)

        def input_names(self):
            return ["input"]

    class Adapter:
        MODELS = {n: Spec(n) for n in zoo.MODELS}

        @staticmethod
        def build(name):
            return zoo.build(name, **SMALL.get(name, {}))

    return Adapter


def architectures() -> list[Arch]:
    import zoo_sequence as zs
    import zoo_transformers as zt
    cnn = _zoo_adapter()
    archs = [Arch(n, "liftir zoo", cnn, "deeplift") for n in
             ("mlp_relu_sigmoid_tanh", "all_conv", "vgg_maxpool", "residual_bn")]
    archs += [Arch(n, "liftir zoo", cnn) for n in ("maxpool_relu_adjacent", "conv1d_genomics")]
    archs += [Arch(n, "timm", zt) for n in ("vit", "deit", "convnext", "mixer", "swin")]
    archs += [Arch("torch_mha", "torch", zt),
              Arch("bert", "transformers", zt, embedding=lambda m: m.model.bert.embeddings.word_embeddings),
              Arch("gpt2", "transformers", zt, embedding=lambda m: m.model.transformer.wte),
              Arch("llama", "transformers", zt, embedding=lambda m: m.model.model.embed_tokens)]
    archs += [Arch(n, "torch", zs, "layer") for n in ("lstm", "lstm_bi", "gru", "gru_bi")]
    archs += [Arch("enformer_small", "torch", zs, "layer")]
    return archs


ARCHS = {a.name: a for a in architectures()}


# --------------------------------------------------------------------------- measurement
@dataclass
class Row:
    arch: str
    how: str
    opset: int = 0
    values: dict = field(default_factory=dict)  # measurement -> float, or a str saying why not

    def holds(self, key, tol):
        v = self.values.get(key)
        return isinstance(v, float) and v <= tol


_models: dict = {}
_rows: dict = {}


def _model(name):
    if ARCHS[name].zoo.__name__ == "zoo_transformers":
        return ARCHS[name].zoo.exported(name, "ts17")[0]
    if name not in _models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _models[name] = ARCHS[name].zoo.build(name)
    return _models[name]


def exported(name, how):
    """One export per (architecture, exporter) per session (tests/export_cache.py)."""
    import zoo_transformers as zt
    from export_cache import export_once
    arch = ARCHS[name]
    if arch.zoo is zt:
        return zt.exported(name, how)[1]
    module = "zoo" if arch.source == "liftir zoo" else arch.zoo.__name__
    return export_once(module, name, how, lambda: zt.export(_model(name), arch.zoo.MODELS[name], how),
                       sizes=SMALL.get(name))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _feeds(arch, n, seed):
    spec = arch.zoo.MODELS[arch.name]
    xs = spec.inputs(n, seed=seed)
    return xs, {k: v.numpy() for k, v in zip(spec.input_names(), xs)}


def _reference(arch, x):
    """DeepLIFT's reference: [PAD] ids for text, uniform 0.25 for one-hot DNA, else a
    shrunken random input (a zero one hides defects)."""
    if arch.zoo.MODELS[arch.name].text:
        return {"input_ids": np.zeros((1, x["input_ids"].shape[1]), np.int64)}
    if np.isin(x["input"], (0.0, 1.0)).all():
        return {"input": np.full((1,) + x["input"].shape[1:], 0.25, np.float32)}
    _, x0 = _feeds(arch, 1, seed=4)
    return {"input": 0.5 * x0["input"]}


def _saliency(arch, proto, model, n=2, seed=1):
    """liftir's saliency of n samples against torch.autograd of the same output (relative)."""
    import liftir
    xs, feeds = _feeds(arch, n, seed=seed)
    ex = liftir.Explainer(proto, method="saliency")
    if arch.embedding is None:
        got = ex.attribute(feeds["input"], target=_target(arch.name))
        xt = xs[0].clone().requires_grad_(True)
        model(xt)[:, _target(arch.name)].sum().backward()
        return _rel(got, xt.grad.numpy())
    got = ex.attribute(feeds, target=_target(arch.name))[ex.attributed[0]]
    store = {}
    handle = arch.embedding(model).register_forward_hook(lambda m, a, out: (out.retain_grad(), store.update(e=out)) and None)
    try:
        model(*xs)[:, _target(arch.name)].sum().backward()
    finally:
        handle.remove()
    return _rel(got, store["e"].grad.numpy())


def _deeplift(arch, proto, precision):
    import liftir
    _, feeds = _feeds(arch, 2, seed=3)
    base = _reference(arch, feeds)
    out = _ort(proto, feeds)
    target = _target(arch.name)
    # integer inputs the baselines leave out (the attention mask) keep each sample's value
    ref = {**feeds, **{k: np.broadcast_to(v, feeds[k].shape) for k, v in base.items()}}
    diff = out[:, target] - _ort(proto, ref)[:, target]
    if precision == "float64":
        feeds = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
        base = {k: v.astype(np.float64) for k, v in base.items() if v.dtype.kind == "f"} or base
    ex = liftir.Explainer(proto, precision="model" if precision == "float32" else precision)
    one = arch.embedding is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, delta = ex.attribute(feeds["input"] if one else feeds, baselines=base["input"] if one else base,
                                target=target, return_convergence_delta=True)
    rel = float(np.abs(delta).max() / np.abs(diff).max())
    return rel if math.isfinite(rel) else "NaN"


def _target(name, _cache={}):
    """The explained logit: 1, or 0 for a one-output model."""
    if name not in _cache:
        import torch
        xs, _ = _feeds(ARCHS[name], 1, seed=0)
        with torch.no_grad():
            _cache[name] = min(1, _model(name)(*xs).shape[1] - 1)
    return _cache[name]


def _ort(proto, feeds):
    import onnxruntime
    return onnxruntime.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]


def _integrated_gradients(arch, proto, model):
    from captum.attr import IntegratedGradients
    import liftir
    xs, feeds = _feeds(arch, 2, seed=5)
    if arch.embedding is not None:  # ids: the path at the word embeddings, the mask held
        return _layer_integrated_gradients(arch, proto, xs, feeds)
    x0 = _reference(arch, feeds)["input"]
    got = liftir.Explainer(proto, method="integrated_gradients", precision="float64").attribute(
        feeds["input"].astype(np.float64), baselines=x0.astype(np.float64), target=_target(arch.name), n_steps=STEPS)
    import torch
    want = IntegratedGradients(_double(arch.name)).attribute(
        xs[0].double(), baselines=torch.from_numpy(x0).double(), target=_target(arch.name), n_steps=STEPS,
        method="gausslegendre").detach().numpy()
    return _rel(got, want)


def _layer_integrated_gradients(arch, proto, xs, feeds):
    """liftir's integrated gradients of a token-id model against Captum's
    LayerIntegratedGradients at the word embeddings, float64, the same steps."""
    import torch
    from captum.attr import LayerIntegratedGradients
    import liftir
    pad = _reference(arch, feeds)
    ex = liftir.Explainer(proto, method="integrated_gradients", precision="float64")
    got = ex.attribute(feeds, baselines=pad, target=_target(arch.name), n_steps=STEPS)[ex.attributed[0]]
    double = _double(arch.name)
    want = LayerIntegratedGradients(double, arch.embedding(double)).attribute(
        xs[0], baselines=torch.from_numpy(np.repeat(pad["input_ids"], xs[0].shape[0], 0)),
        additional_forward_args=(xs[1],), target=_target(arch.name), n_steps=STEPS,
        method="gausslegendre").detach().numpy()
    return _rel(got, want)


def _double(name, _cache={}):
    if name not in _cache:
        _cache[name] = copy.deepcopy(_model(name)).double()
    return _cache[name]


def _captum_deeplift(arch, proto):
    """liftir DeepLIFT vs Captum's in float64, where their rules coincide."""
    import torch
    from captum.attr import DeepLift, LayerDeepLift
    import liftir
    xs, feeds = _feeds(arch, 2, seed=6)
    x0 = _reference(arch, feeds)["input"]
    double = _double(arch.name)
    x, b = xs[0].double(), torch.from_numpy(x0).double()
    ex = liftir.Explainer(proto, precision="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch.captum == "deeplift":
            want = DeepLift(double).attribute(x, baselines=b, target=_target(arch.name)).detach().numpy()
            got = ex.attribute(x.numpy(), baselines=b.numpy(), target=_target(arch.name))
        else:
            import zoo_sequence as zs
            want = LayerDeepLift(double, double.pool).attribute(x, baselines=b, target=_target(arch.name)).detach().numpy()
            got = ex.attribute(x.numpy(), baselines=b.numpy(), target=_target(arch.name), layer=zs.head_input(proto, double))
    return _rel(got, want)


TIMES: dict = {}


def measure(name, how) -> Row:
    """Every measurement of one row; a liftir refusal is recorded as its message."""
    if (name, how) in _rows:
        return _rows[name, how]
    from liftir.errors import LiftirError
    arch = ARCHS[name]
    row = Row(name, how)
    import time
    t0 = time.perf_counter()
    try:
        proto = exported(name, how)
    except Exception as e:  # an exporter that cannot export this model
        row.values = {k: f"export failed: {type(e).__name__}" for k in ("saliency", "dl32", "dl64")}
        _rows[name, how] = row
        return row
    row.opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    model = _model(name)
    jobs = {"saliency": lambda: _saliency(arch, proto, model),
            "dl32": lambda: _deeplift(arch, proto, "float32"),
            "dl64": lambda: _deeplift(arch, proto, "float64")}
    jobs["ig"] = lambda: _integrated_gradients(arch, proto, model)
    if arch.captum != "none":
        jobs["captum"] = lambda: _captum_deeplift(arch, proto)
    TIMES[name, how, "export"] = time.perf_counter() - t0
    for key, job in jobs.items():
        t0 = time.perf_counter()
        try:
            row.values[key] = job()
        except LiftirError as e:
            row.values[key] = f"refused: {type(e).__name__}"
        TIMES[name, how, key] = time.perf_counter() - t0
    _rows[name, how] = row
    return row


# --------------------------------------------------------------------------- the table
#: below this a relative float64 delta is round-off of a few terms (eps64 is 2.2e-16): values
#: under it count as it, so that another CPU's summation order cannot fail the table
FLOOR = 1e-16


def bound(v: float) -> str:
    """A bound one order of magnitude above v, e.g. 4e-8 -> '≤1e-6' (v is at least FLOOR)."""
    return f"≤1e{math.ceil(math.log10(10 * max(v, FLOOR))):d}"


def _cell(row, key, name):
    v = row.values.get(key)
    if (name, row.how) in PENDING and key in ("dl32", "dl64") and not isinstance(v, float):
        return f"not yet ({v})"
    if v is None:
        return "—"
    return bound(v) if isinstance(v, float) else str(v)


def _methods(row) -> str:
    held = [m for m, keys, tol in (("deeplift", ("dl32", "dl64"), (DL32_TOL, DL64_TOL)),
                                   ("saliency", ("saliency",), (SAL_TOL,)),
                                   ("integrated_gradients", ("ig",), (IG_TOL,)))
            if all(row.holds(k, t) for k, t in zip(keys, tol))]
    return ", ".join(held) or "—"


def _captum_cell(row, arch):
    if arch.captum == "none":
        if arch.source == "liftir zoo":
            import zoo
            return "no: " + zoo.captum_caveat(arch.name)
        if arch.source == "torch" and arch.name != "torch_mha":
            return CAPTUM_CLASH["torch"]
        return CAPTUM_CLASH[arch.source]
    how = "DeepLift" if arch.captum == "deeplift" else "LayerDeepLift at the head"
    return f"{how}: {_cell(row, 'captum', arch.name)}"


HEAD = ("| architecture | code | exporter | opset | methods that hold | saliency vs autograd | "
        "DeepLIFT \\|delta\\| float32 | float64 | IG vs Captum (float64) | DeepLIFT vs Captum (float64) |")


def cells(row: Row) -> list[tuple[str, float | None]]:
    """The row's cells, each with the measurement its bound stands for (None: plain text)."""
    arch = ARCHS[row.arch]

    def measured(key):
        v = row.values.get(key)
        return _cell(row, key, row.arch), (v if isinstance(v, float) else None)

    captum_text, captum_v = measured("captum")
    captum = (_captum_cell(row, arch), captum_v if arch.captum != "none" else None)
    return [(row.arch, None), (arch.source, None), (row.how, None), (str(row.opset or "—"), None),
            (_methods(row), None), measured("saliency"), measured("dl32"), measured("dl64"), measured("ig"), captum]


def table(rows: list[Row]) -> str:
    lines = [HEAD, "|" + "---|" * HEAD.count(" | ") + "---|"]
    lines += ["| " + " | ".join(text for text, _ in cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def all_rows() -> list[Row]:
    return [measure(a, h) for a in ARCHS for h in EXPORTS]


_BOUND = re.compile(r"≤1e-?[0-9]+")


def _bound_value(cell: str) -> float | None:
    m = _BOUND.search(cell)
    return float(m.group(0)[1:]) if m else None


def tables_agree(readme: str, rows: list[Row]) -> list[str]:
    """Differences between the README table and the measurements: the text must be equal,
    except that a README bound b holds for a measurement v whenever v ≤ b. No lower limit:
    a float32 error is rounding, and the same export measures 6e-8 on one CPU and 1e-5 on
    another, so a bound written on one machine must stay true, not tight, on the next."""
    lines = readme.strip().splitlines()
    want = table(rows).splitlines()
    if lines[:2] != want[:2] or len(lines) != len(want):
        return [f"header or row count differs ({len(lines)} README lines, {len(want)} measured)"]
    problems = []
    for line, row in zip(lines[2:], rows):
        got = [c.strip() for c in line.strip().strip("|").split(" | ")]
        expected = cells(row)
        if len(got) != len(expected):
            problems.append(f"cell count differs in: {line}")
            continue
        for text, (want_text, v) in zip(got, expected):
            b = _bound_value(text)
            if v is not None and b is not None and _BOUND.sub("≤b", text) == _BOUND.sub("≤b", want_text):
                if not max(v, FLOOR) <= b:
                    problems.append(f"{row.arch} {row.how}: README {text!r}, measured {v:.1e}")
            elif text != want_text:
                problems.append(f"{row.arch} {row.how}: README {text!r}, measured {want_text!r}")
    return problems


# --------------------------------------------------------------------------- tests
pytest.importorskip("captum")
pytest.importorskip("transformers")
if importlib.util.find_spec("timm") is None:  # installed with --no-deps (see .ci/run)
    pytest.skip("timm is not installed: pip install --no-deps timm", allow_module_level=True)
ROWS = [(a, h) for a in ARCHS for h in EXPORTS]


@pytest.mark.parametrize("name,how", ROWS)
def test_architecture(name, how):
    row = measure(name, how)
    v = row.values
    assert isinstance(v["saliency"], float) and v["saliency"] <= SAL_TOL, v
    for key, tol in (("dl32", DL32_TOL), ("dl64", DL64_TOL)):
        if (name, how) in PENDING:
            assert not row.holds(key, tol), f"{name} {how}: DeepLIFT holds now: drop it from PENDING, --update"
        else:
            assert isinstance(v[key], float) and v[key] <= tol, (key, v)
    if "ig" in v:
        assert isinstance(v["ig"], float) and v["ig"] <= IG_TOL, v
    if "captum" in v:
        assert isinstance(v["captum"], float) and v["captum"] <= CAPTUM_TOL, v


@pytest.mark.parametrize("name", ["enformer_small", "torch_mha", "vit", "swin", "bert", "gpt2", "lstm_bi"])
def test_one_sample_saliency_and_prediction(name):
    """A gradient method on one sample, and `predict` of one, run one row through the graph,
    where every axis of length 1 could hold the samples: the batch is located from two
    copies of the row (scheduler._locate_one_row_by_two). The Enformer-style net's
    sequence-major attention was refused before as mixing samples. Saliency equals
    torch.autograd of the same output; the prediction equals onnxruntime's."""
    import liftir
    arch = ARCHS[name]
    proto, model = exported(name, "ts17"), _model(name)
    _, feeds = _feeds(arch, 1, seed=5)
    ex = liftir.Explainer(proto, method="saliency")
    np.testing.assert_allclose(ex.predict(feeds if arch.embedding is not None else feeds["input"]),
                               _ort(proto, feeds), rtol=1e-5, atol=1e-6)
    assert _saliency(arch, proto, model, n=1, seed=5) <= SAL_TOL


@pytest.mark.parametrize("name", ["lstm_bi", "gru"])
def test_captum_deeplift_through_recurrent_gates_is_gradient_times_delta(name):
    """Why Captum's DeepLift is compared only at the head of the recurrent models: nn.LSTM /
    nn.GRU compute their gates inside one module Captum does not hook, so its DeepLift is
    (x - x0) times the plain gradient at x of the head's DeepLIFT multipliers (checked here to
    1e-10 in float64), and misses summation-to-delta, which liftir's unrolled rule keeps."""
    import torch
    from captum.attr import DeepLift, LayerDeepLift
    import liftir
    arch = ARCHS[name]
    xs, feeds = _feeds(arch, 2, seed=7)
    x0 = _reference(arch, feeds)["input"]
    model, target = _double(name), _target(name)
    x, b = xs[0].double(), torch.from_numpy(x0).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = DeepLift(model).attribute(x, baselines=b, target=target).detach()
        m_head = LayerDeepLift(model, model.pool, multiply_by_inputs=False).attribute(
            x, baselines=b, target=target).detach()
    xt = x.clone().requires_grad_(True)
    (model.pool(model.rnn(model.front(xt))[0]) * m_head).sum().backward()
    chained = (x - b) * xt.grad
    assert torch.allclose(captum, chained, rtol=0, atol=1e-10 * float(chained.abs().max()))
    with torch.no_grad():
        diff = (model(x)[:, target] - model(b)[:, target]).numpy()
    assert np.abs(captum.numpy().reshape(2, -1).sum(1) - diff).max() > 1e-2 * np.abs(diff).max()
    _, delta = liftir.Explainer(exported(name, "ts17"), precision="float64").attribute(
        x.numpy(), baselines=x0.astype(np.float64), target=target, return_convergence_delta=True)
    assert np.abs(delta).max() <= DL64_TOL * np.abs(diff).max()


def test_readme_architectures_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert START in readme, "README has no ARCH block: python tests/test_architectures.py --update"
    block = readme.split(START, 1)[1].split(END, 1)[0]
    problems = tables_agree(block, all_rows())
    assert not problems, "run: python tests/test_architectures.py --update\n" + "\n".join(problems[:10])


def _keep_looser_bounds(old: str, new: str) -> str:
    """The new table, except that a README bound looser than the new one is kept: a bound
    written on a machine that rounds worse must not be tightened by one that rounds better."""
    old_rows = {line.split(" | ")[0] + line.split(" | ")[2]: line for line in old.splitlines()[2:]}
    out = new.splitlines()[:2]
    for line in new.splitlines()[2:]:
        cells_new = line.split(" | ")
        before = old_rows.get(cells_new[0] + cells_new[2], "").split(" | ")
        if len(before) == len(cells_new):
            for i, (was, now) in enumerate(zip(before, cells_new)):
                b_was, b_now = _bound_value(was), _bound_value(now)
                same_text = _BOUND.sub("≤b", was) == _BOUND.sub("≤b", now)
                if b_was is not None and b_now is not None and same_text and b_was > b_now:
                    cells_new[i] = was
        out.append(" | ".join(cells_new))
    return "\n".join(out)


def _update() -> None:
    readme_path = ROOT / "README.md"
    text = readme_path.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    assert pattern.search(text), f"README.md needs the markers {START} ... {END}"
    old_block = text.split(START, 1)[1].split(END, 1)[0].strip()
    block = _keep_looser_bounds(old_block, table(all_rows()))
    readme_path.write_text(pattern.sub(lambda _: f"{START}\n{block}\n{END}", text))
    print(block)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--update" in sys.argv:
        _update()
    else:
        print(table(all_rows()))
        import collections
        by = collections.defaultdict(float)
        for (n, h, k), t in TIMES.items():
            by[k] += t
            by[h] += t
            by[n] += t
        print({k: round(v, 1) for k, v in sorted(by.items(), key=lambda kv: -kv[1])})

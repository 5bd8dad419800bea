"""Loading a model reads no file it should not: a model in memory reads none, a model from
a path reads external tensor data only from inside its own folder. And a corpus of broken
models: each is refused with a liftir error that says what is wrong, and nothing changes
(no file written, the input files untouched, the caller's ModelProto untouched).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.errors import InputError, ModelLoadError
from onnx_builders import model

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
X = RNG.standard_normal((2, 4)).astype(np.float32)


def gemm_model() -> onnx.ModelProto:
    return model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")], {"x": (1, 4)}, ["y"],
                 {"W": W}, opset=13)


def with_external_weight(m: onnx.ModelProto, location: str, offset: int | None = None,
                         length: int | None = None) -> onnx.ModelProto:
    """Point the weight's data at an external file (the data itself removed from the proto)."""
    weight = m.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = weight.external_data.add()
            entry.key, entry.value = key, str(value)
    return m


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- external data ----------------------------------------------------------------------

@pytest.fixture
def cwd_with_weights(tmp_path, monkeypatch):
    """The process's cwd holds a file matching the model's external-data location."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "weights.bin").write_bytes(W.tobytes())
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("form", ["bytes", "ModelProto", "bytearray"])
def test_a_model_in_memory_never_reads_external_data_from_the_cwd(cwd_with_weights, form, monkeypatch):
    m = with_external_weight(gemm_model(), "weights.bin")
    source = {"bytes": m.SerializeToString(), "ModelProto": m,
              "bytearray": bytearray(m.SerializeToString())}[form]
    before = m.SerializeToString()
    opened = []
    real_open = open

    def watching_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)
    with pytest.raises(ModelLoadError, match="external data.*never allowed to read files"):
        liftir.Explainer(source)
    monkeypatch.undo()
    assert not [f for f in opened if isinstance(f, str) and "weights.bin" in f]
    assert m.SerializeToString() == before  # the caller's proto is untouched


def test_a_model_path_reads_its_own_external_data(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "data").mkdir()
    payload = b"\0" * 16 + W.tobytes()
    (folder / "data" / "weights.bin").write_bytes(payload)
    path = folder / "m.onnx"
    path.write_bytes(with_external_weight(gemm_model(), "data/weights.bin", offset=16,
                                          length=W.nbytes).SerializeToString())
    got = liftir.Explainer(path).predict(X)
    np.testing.assert_allclose(got, X @ W, rtol=1e-6)
    explainer = liftir.Explainer(path)
    assert all(t.data_location != TensorProto.EXTERNAL for t in explainer.model.graph.initializer)
    from liftir.check import check_model  # its onnxruntime comparison runs the loaded proto
    assert check_model(path, samples=2).ok


@pytest.mark.parametrize("location, match", [
    ("../weights.bin", "relative path inside the model's folder"),
    ("data/../../weights.bin", "relative path inside the model's folder"),
    ("ABSOLUTE", "relative path inside the model's folder"),
    ("link.bin", "resolves outside the model's folder"),
    ("linkdir/weights.bin", "resolves outside the model's folder"),
    ("missing.bin", "does not exist"),
    ("", "relative path"),
])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location, match):
    outside = tmp_path / "weights.bin"  # next to the model's folder, not in it
    outside.write_bytes(W.tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside, folder / "link.bin")
    os.symlink(tmp_path, folder / "linkdir")
    if location == "ABSOLUTE":
        location = str(outside)
    path = folder / "m.onnx"
    path.write_bytes(with_external_weight(gemm_model(), location).SerializeToString())
    before = snapshot(tmp_path)
    with pytest.raises(ModelLoadError, match=match):
        liftir.Explainer(path)
    assert snapshot(tmp_path) == before


def test_external_data_with_a_range_past_the_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(W.tobytes())
    path = tmp_path / "m.onnx"
    path.write_bytes(with_external_weight(gemm_model(), "weights.bin", offset=8,
                                          length=W.nbytes).SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the file"):
        liftir.Explainer(path)


def test_external_data_in_a_constant_attribute_is_refused_from_memory(cwd_with_weights):
    tensor = numpy_helper.from_array(W, "Wc")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    nodes = [helper.make_node("Constant", [], ["W"], value=tensor),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelLoadError, match="external data"):
        liftir.Explainer(m.SerializeToString())


# ---- a corpus of broken models --------------------------------------------------------------

def _graph_model(nodes, inputs=("x",), outputs=("y",), opset=13, consts=None):
    graph = helper.make_graph(
        nodes, "bad", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _corpus():
    good = gemm_model().SerializeToString()
    cycle = _graph_model([helper.make_node("Relu", ["b"], ["a"], name="r1"),
                          helper.make_node("Relu", ["a"], ["b"], name="r2"),
                          helper.make_node("Add", ["x", "a"], ["y"], name="add")])
    return {
        "truncated": (good[: len(good) // 2], "not a readable ONNX model|no graph|does not pass"),
        "truncated-by-one": (good[:-1], "not a readable ONNX model|no graph|does not pass"),
        "empty": (b"", "no graph"),
        "garbage": (b"\x08\x07\x12\x03abc\xff\xff\xff", "not a readable ONNX model|no graph"),
        "opset-from-the-future": (_graph_model([helper.make_node("Relu", ["x"], ["y"])], opset=999),
                                  "opset 999 of the ONNX domain 'ai.onnx'.*knows opsets 1 to"),
        "opset-zero": (_graph_model([helper.make_node("Relu", ["x"], ["y"])], opset=0), "opset 0|onnx.checker"),
        "opset-too-old-for-op": (_graph_model([helper.make_node("Gelu", ["x"], ["y"])], opset=13), "onnx.checker"),
        "graph-cycle": (cycle, "onnx.checker|cycle"),
        "missing-input": (_graph_model([helper.make_node("Add", ["x", "nowhere"], ["y"])]), "onnx.checker"),
        "output-never-produced": (_graph_model([helper.make_node("Relu", ["x"], ["z"])]), "onnx.checker"),
        "no-nodes": (_graph_model([], outputs=("x",)), "empty graph"),
    }


@pytest.mark.parametrize("name, form", [(name, form) for name, (source, _) in _corpus().items()
                                        for form in ("bytes", "path") + (() if isinstance(source, bytes)
                                                                         else ("ModelProto",))])
def test_broken_models_get_a_clear_model_load_error_and_change_nothing(tmp_path, monkeypatch, name, form):
    source, match = _corpus()[name]
    data = source if isinstance(source, bytes) else source.SerializeToString()
    if form == "ModelProto":
        arg = source
    elif form == "path":
        arg = tmp_path / "bad.onnx"
        arg.write_bytes(data)
    else:
        arg = data
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ModelLoadError, match=match) as caught:
        liftir.Explainer(arg)
    assert len(str(caught.value)) < 2000  # a message, not a dump
    assert snapshot(tmp_path) == before
    if form == "ModelProto":
        assert source.SerializeToString() == data
    assert liftir.Explainer(gemm_model()).predict(X).shape == (2, 3)  # nothing else broke


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "absent.onnx", "no ONNX model file.*nothing there"),
    (lambda d: d, "no ONNX model file.*a directory"),
    (lambda d: str(d) + "/", "no ONNX model file.*a directory"),
    (lambda d: str(d / "a\0b.onnx"), "no ONNX model file|cannot read"),
    (lambda d: "", "no ONNX model file"),
    (lambda d: _write(d / "empty.onnx", b""), "no graph"),
    (lambda d: _write(d / "text.onnx", b"not a protobuf\n" * 50), "not a readable ONNX model|no graph"),
    (lambda d: (os.symlink(d / "loop", d / "loop") or d / "loop"), "no ONNX model file"),
], ids=["absent", "directory", "directory-slash", "nul-byte", "empty-string", "empty-file", "text-file",
        "symlink-loop"])
def test_bad_paths(tmp_path, make, match):
    path = make(tmp_path)
    before = snapshot(tmp_path) if not os.path.islink(tmp_path / "loop") else None
    with pytest.raises(ModelLoadError, match=match):
        liftir.Explainer(path)
    if before is not None:
        assert snapshot(tmp_path) == before


# ---- example:NAME from Python ----------------------------------------------------------------

def test_shipped_examples_from_python():
    ex = liftir.Explainer("example:digits")
    from liftir.data import resolve_input
    x = resolve_input("example:digits")
    attr, delta = ex.attribute("example:digits", target=3, return_convergence_delta=True)
    assert attr.shape == x.shape
    np.testing.assert_array_equal(attr, ex.attribute(x, target=3))
    np.testing.assert_allclose(delta, 0, atol=1e-4)
    from liftir.check import check_model
    from liftir.testing import assert_summation_to_delta
    assert_summation_to_delta("example:digits")  # every entry point takes the same names
    assert check_model("example:digits", samples=2).ok


@pytest.mark.parametrize("name", ["example:nope", "example:", "example:../data/digits", "example:/etc/passwd"])
def test_unknown_examples_are_named(name):
    with pytest.raises(InputError, match="no shipped example.*available: example:digits"):
        liftir.Explainer(name)

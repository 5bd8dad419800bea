"""The exported explainer (Explainer.compile / `liftir compile`) for models with token-id
inputs: Hugging Face BERT and GPT-2 (random weights, tests/zoo_transformers.py), run in a
bare onnxruntime session without liftir.

The ids are held as `attribute` holds them: every input takes one baseline row per sample
(all-[PAD] ids; the sample's own attention mask, which keeps it), the attributions come for
the embeddings (`NAME_attribution` per tensor of `Explainer.attributed`), and the exported
delta is summation-to-delta against onnxruntime's own f(ids) - f(pad) of the model.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime
import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("timm") is None:  # installed with --no-deps (see .ci/run)
    pytest.skip("timm is not installed", allow_module_level=True)

import liftir  # noqa: E402
from liftir.errors import InputError  # noqa: E402

import zoo_transformers as zt  # noqa: E402

N = 3


def _session(model):
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(name):
    ids, mask = zt.MODELS[name].inputs(N, seed=21)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


@pytest.mark.parametrize("name,how", [("bert", "ts17"), ("gpt2", "dynamo")])
@pytest.mark.parametrize("method", ["deeplift", "saliency"])
def test_exported_text_explainer_equals_attribute_and_conserves(name, how, method):
    _, proto = zt.exported(name, how)
    feeds = _feeds(name)
    assert not feeds["attention_mask"].all()  # a padded sample: the mask matters
    seq = feeds["input_ids"].shape[1]
    ex = liftir.Explainer(proto, method)
    exported = ex.compile(batch_size=N, target=2, shapes={"input_ids": (seq,), "attention_mask": (seq,)})
    onnx.checker.check_model(exported)
    pad = np.zeros_like(feeds["input_ids"])
    call = dict(feeds)
    if method == "deeplift":
        call.update(input_ids_baseline=pad, attention_mask_baseline=feeds["attention_mask"])
    session = _session(exported)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, call)))
    if method == "deeplift":
        want, delta = ex.attribute(feeds, baselines={"input_ids": pad[:1]}, target=2, return_convergence_delta=True)
    else:
        want = ex.attribute(feeds, target=2)
    assert sorted(got) == sorted([f"{w}_attribution" for w in ex.attributed] + ["delta"] * (method == "deeplift"))
    for w, a in want.items():
        g = got[f"{w}_attribution"]
        assert g.shape == a.shape
        assert np.abs(g - a).max() <= 1e-5 * max(float(np.abs(want[ex.attributed[0]]).max()), 1e-30)
    if method == "deeplift":
        model = _session(proto)
        diff = model.run(None, feeds)[0][:, 2] - model.run(None, {**feeds, "input_ids": pad})[0][:, 2]
        scale = float(np.abs(diff).max())
        assert np.abs(got["delta"]).max() <= 1e-4 * scale  # summed in float32 in the graph
        assert np.abs(got["delta"] - delta).max() <= 1e-4 * scale
        word = got[f"{ex.attributed[0]}_attribution"].reshape(N, -1).sum(1)
        assert np.abs(word - diff).max() <= 1e-4 * scale  # the masks' tensors get nothing


def test_export_names_every_input_whose_shape_is_open():
    _, proto = zt.exported("bert", "ts17")
    ex = liftir.Explainer(proto, "saliency")
    with pytest.raises(InputError, match=r"shapes=.*input_ids \(N, \?\).*attention_mask \(N, \?\)"):
        ex.compile(batch_size=2)
    with pytest.raises(InputError, match="names no input"):
        ex.compile(batch_size=2, shapes={"ids": (8,)})
    with pytest.raises(InputError, match="does not fit"):
        ex.compile(batch_size=2, shapes={"input_ids": (8, 2), "attention_mask": (8,)})


def test_liftir_compile_takes_open_shapes_on_the_command_line(tmp_path, capsys):
    from liftir.cli import main

    _, proto = zt.exported("bert", "ts17")
    path, out = tmp_path / "bert.onnx", tmp_path / "explainer.onnx"
    onnx.save(proto, str(path))
    feeds = _feeds("bert")
    seq = feeds["input_ids"].shape[1]
    assert main(["compile", str(path), "--target", "1", "--batch-size", str(N), "--shape", f"input_ids={seq}",
                 "--shape", f"attention_mask={seq}", "-o", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[N, seq]] * 4
    assert main(["compile", str(path), "--shape", "input_ids=x", "-o", str(out)]) != 0
    assert "--shape takes NAME=D1" in capsys.readouterr().err

"""The `liftir` command through `main([...])`: explain / check / ops on small models, the
files they write, and exit codes (0 ok, 1 finding, 2 usage or input error, no traceback)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

import cli_models as cm
import liftir
from liftir.cli import main


@pytest.fixture
def files(tmp_path):
    """Model files and inputs on disk."""
    rng = np.random.default_rng(0)
    paths = {}
    for name, builder in [("mlp", cm.mlp), ("two", cm.two_inputs), ("cnn", cm.small_cnn),
                          ("dna", cm.dna_cnn), ("unknown", cm.unknown_op), ("twoout", cm.two_outputs),
                          ("norm", cm.norm_over_batch)]:
        paths[name] = str(tmp_path / f"{name}.onnx")
        onnx.save(builder(), paths[name])
    paths["x"] = str(tmp_path / "x.npy")
    np.save(paths["x"], rng.standard_normal((10, 6)).astype(np.float32))
    paths["ab"] = str(tmp_path / "ab.npz")
    np.savez(paths["ab"], a=rng.standard_normal((5, 4)).astype(np.float32),
             b=rng.standard_normal((5, 4)).astype(np.float32))
    paths["img"] = str(tmp_path / "img.npy")
    np.save(paths["img"], rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    paths["seq"] = str(tmp_path / "seq.npy")
    np.save(paths["seq"], cm.onehot_dna(3))
    paths["dir"] = tmp_path
    return paths


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ---- explain ----------------------------------------------------------------------------------

def test_explain_writes_attributions_and_deltas(files, capsys):
    out_path = files["dir"] / "attr.npz"
    code, out, err = run(capsys, "explain", files["mlp"], "--input", files["x"], "--target", 1,
                         "--batch-size", 3, "--out", out_path)
    assert code == 0, err
    with np.load(out_path) as d:
        assert d["x"].shape == (10, 6) and d["delta"].shape == (10,)
        assert np.abs(d["delta"]).max() < 1e-4
        assert int(d["targets"]) == 1 and str(d["method"]) == "deeplift" and str(d["output"]) == "prob"
        expected = liftir.Explainer(files["mlp"]).attribute(np.load(files["x"]), target=1)
        np.testing.assert_allclose(d["x"], expected, rtol=1e-5, atol=1e-6)
    assert "method      deeplift" in out and "max |delta|" in out and "'x' (10, 6)" in out
    assert err == ""  # no progress bar: stderr is not a terminal (see test_progress.py)


def test_explain_several_targets_and_per_sample_targets(files, capsys):
    d = files["dir"]
    code, out, _ = run(capsys, "explain", files["mlp"], "-i", files["x"], "--target", "all",
                       "--out", d / "all.npz", "--no-progress")
    assert code == 0 and "all classes" in out
    with np.load(d / "all.npz") as all_:
        assert all_["x"].shape == (10, 3, 6) and all_["delta"].shape == (10, 3)
        code, _, _ = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", "0,2",
                         "-o", d / "some", "--no-progress")  # .npz appended
        assert code == 0
        with np.load(d / "some.npz") as some:
            np.testing.assert_allclose(some["x"], all_["x"][:, [0, 2]], rtol=1e-5, atol=1e-6)
    labels = np.arange(10) % 3
    np.save(d / "labels.npy", labels)
    code, out, err = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", d / "labels.npy",
                         "-o", d / "per.npz", "--no-progress")
    assert code == 0, err
    assert "one class per sample" in out and err == ""


def test_explain_baselines_and_gradient_methods(files, capsys):
    d = files["dir"]
    np.save(d / "b.npy", np.full((1, 6), 0.5, np.float32))
    a = {}
    for spec in ("0.5", d / "b.npy", "zeros"):
        code, _, err = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", 0, "-b", spec,
                           "-o", d / "b_out.npz", "--no-progress")
        assert code == 0, err
        with np.load(d / "b_out.npz") as f:
            a[str(spec)] = f["x"]
    np.testing.assert_allclose(a["0.5"], a[str(d / "b.npy")])
    assert not np.allclose(a["0.5"], a["zeros"])
    code, out, _ = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", 0, "-m", "saliency",
                       "-o", d / "s.npz", "--no-progress")
    assert code == 0 and "n/a" in out
    with np.load(d / "s.npz") as f:
        assert "delta" not in f.files and str(f["method"]) == "saliency"


def test_npz_inputs_round_trip_by_name(files, capsys):
    d = files["dir"]
    code, out, err = run(capsys, "explain", files["two"], "-i", files["ab"], "-t", 1,
                         "-b", files["ab"], "-o", d / "ab_attr.npz", "--no-progress")
    assert code == 0, err
    with np.load(d / "ab_attr.npz") as f, np.load(files["ab"]) as x:
        assert f["a"].shape == f["b"].shape == (5, 4)
        assert np.abs(f["a"]).max() == 0 and np.abs(f["b"]).max() == 0  # baseline == input
        assert set(f.files) >= {"a", "b", "delta"}
        np.testing.assert_array_equal(x["a"].shape, (5, 4))
    np.savez(d / "wrong.npz", a=np.ones((2, 4), np.float32), c=np.ones((2, 4), np.float32))
    code, _, err = run(capsys, "explain", files["two"], "-i", d / "wrong.npz", "-t", 0, "-o", d / "w.npz")
    assert code == 2
    assert "liftir: error:" in err and "['a', 'b']" in err and "missing ['b']" in err
    code, _, err = run(capsys, "explain", files["two"], "-i", files["x"], "-t", 0, "-o", d / "w.npz")
    assert code == 2 and "2 inputs" in err and ".npz" in err


@pytest.mark.parametrize("argv, message", [
    (["explain", "{missing}", "-i", "{x}", "-o", "{dir}/o.npz"], "no ONNX model file"),
    (["explain", "{garbage}", "-i", "{x}", "-o", "{dir}/o.npz"], "not a readable ONNX model"),
    (["explain", "{mlp}", "-i", "{dir}/nope.npy", "-o", "{dir}/o.npz"], "does not exist"),
    (["explain", "{mlp}", "-i", "{garbage}", "-o", "{dir}/o.npz"], "not a readable .npy/.npz"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "abc", "-o", "{dir}/o.npz"], "--target must be"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "7", "-o", "{dir}/o.npz"], "out of range"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "-1", "-o", "{dir}/o.npz"], "-1 is negative"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "1,2000", "-o", "{dir}/o.npz"],
     "2000 at position 1 is out of range for 3 outputs"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "0", "-o", "{x}.npz", "--plot", "{x}.npz"], "same file"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "0", "-o", "{dir}/o.npz", "--plot", "{dir}/no/p.png"],
     "does not exist"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "0", "-o", "{dir}/o.npz", "--precision", "half"],
     "invalid choice"),
    (["explain", "{mlp}", "-i", "{x}", "-o", "{dir}/o.npz"], "--target all"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "0", "-o", "{dir}/no/such/dir/o.npz"], "does not exist"),
    (["explain", "{mlp}", "-i", "{x}", "-t", "0", "--output", "nope", "-o", "{dir}/o.npz"], "no tensor named"),
    (["explain", "{cnn}", "-i", "{x}", "-t", "0", "-o", "{dir}/o.npz"], "expects rank 4"),
    (["explain", "{unknown}", "-i", "{x}", "-o", "{dir}/o.npz"], "mystery1"),
    (["explain", "{twoout}", "-i", "{x}", "-o", "{dir}/o.npz"], "--output NAME"),
    (["explain", "{mlp}", "-i", "{x}", "--batch-size", "0", "-o", "{dir}/o.npz"], "positive integer"),
    (["explain", "{mlp}", "-o", "{dir}/o.npz"], "--input"),
    (["explain", "{mlp}", "-i", "{x}", "-m", "lime", "-o", "{dir}/o.npz"], "invalid choice"),
    (["check", "{mlp}", "--rtol", "-1"], "positive number"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_exit_2_with_a_clear_message(files, capsys, argv, message):
    garbage = files["dir"] / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf or numpy \xff" * 3)
    fmt = {**{k: str(v) for k, v in files.items()}, "missing": str(files["dir"] / "missing.onnx"),
           "garbage": str(garbage)}
    code, _, err = run(capsys, *[a.format(**fmt) for a in argv])
    assert code == 2
    assert message in err
    assert "error:" in err


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "examples:" in out and "exit codes" in out
    for cmd in ("explain", "check", "ops"):
        code, out, _ = run(capsys, cmd, "--help")
        assert code == 0 and "examples:" in out and f"liftir {cmd}" in out
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err
    proc = subprocess.run([sys.executable, "-m", "liftir", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("liftir ")


# ---- plots ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, inputs, target", [("mlp", "x", "1"), ("cnn", "img", "2"),
                                                    ("dna", "seq", None)])
def test_plot_writes_a_png(files, capsys, model, inputs, target):
    pytest.importorskip("matplotlib")
    pytest.importorskip("liftir.plots")
    png = files["dir"] / f"{model}.png"
    argv = ["explain", files[model], "-i", files[inputs], "-o", files["dir"] / "p.npz",
            "--plot", png, "--no-progress"] + (["-t", target] if target else [])
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert f"plot        {png}" in out


# ---- check ------------------------------------------------------------------------------------------

def test_check_ok_and_failing(files, capsys):
    code, out, err = run(capsys, "check", files["cnn"], "--samples", 3)
    assert code == 0, out + err
    assert "OK: every node conserves" in out and "forward vs onnxruntime: ok" in out
    assert "3 sample(s)" in out
    cm.register_broken_relu()
    try:
        code, out, err = run(capsys, "check", files["cnn"])
    finally:
        liftir.unregister_rule("Relu")
    assert code == 1
    assert "'relu1' (Relu) loses conservation: residual" in out and "FAIL" in out
    assert "check failed" in err


def test_check_with_given_inputs_and_errors(files, capsys):
    code, out, _ = run(capsys, "check", files["mlp"], "--input", files["x"], "--baseline", "0.1",
                       "--rtol", "1e-5", "--max-rule", "paper")
    assert code == 0 and "10 sample(s)" in out and "max_rule=paper" in out
    code, out, _ = run(capsys, "check", files["two"], "--input", files["ab"], "--final-activation", "strip")
    assert code == 0
    code, _, err = run(capsys, "check", files["unknown"])
    assert code == 2 and "mystery1" in err and "com.example::Mystery" in err


# ---- ops ---------------------------------------------------------------------------------------------

def test_ops_lists_rules_per_method(capsys):
    code, out, _ = run(capsys, "ops")
    assert code == 0
    relu = next(line for line in out.splitlines() if line.split()[:1] == ["Relu"])
    assert "built-in" in relu and "rescale" in relu
    code, out, _ = run(capsys, "ops", "--method", "guided_backprop")
    relu = next(line for line in out.splitlines() if line.split()[:1] == ["Relu"])
    assert code == 0 and "guided" in relu


def test_ops_model_coverage(files, capsys):
    code, out, _ = run(capsys, "ops", files["cnn"])
    assert code == 0 and "OK: every op type" in out
    conv = next(line for line in out.splitlines() if line.split()[:1] == ["Conv"])
    assert conv.split()[1] == "1" and "built-in" in conv
    code, out, _ = run(capsys, "ops", files["unknown"])
    assert code == 2  # explain and check refuse it too (exit 2 in all three)
    assert "NOT covered" in out and "com.example::Mystery" in out and "'mystery1'" in out
    assert "Gemm" in out  # the covered part is still listed


# ---- output files: checked first, written whole or not at all ------------------------------------

def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_bad_output_path_is_refused_before_anything_is_computed(files, capsys, monkeypatch):
    import liftir.cli as cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(cli, "_load_model_explainer", no_model)
    d = files["dir"]
    np.savez(d / "xin.npz", x=np.load(files["x"]))
    before = _listing(d)
    for extra, message in ((["-o", d / "missing" / "o.npz"], "does not exist"),
                           (["-o", d / "o.npz", "--plot", d / "missing" / "p.png"], "does not exist"),
                           (["-o", d / "xin.npz"], "also a file this run reads"),
                           (["-o", d / "o.npz", "--plot", d / "xin.npz"], "also a file this run reads")):
        code, _, err = run(capsys, "explain", files["mlp"], "-i", d / "xin.npz", "-t", 0, *extra)
        assert code == 2 and message in err, (extra, err)
    assert _listing(d) == before  # nothing written, not even o.npz
    (d / "folder.npz").mkdir()
    code, _, err = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", 0, "-o", d / "folder.npz")
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize("which", ["out", "plot"])
def test_a_run_failing_while_writing_leaves_the_old_file_untouched(files, capsys, monkeypatch, which):
    pytest.importorskip("matplotlib")
    d = files["dir"]
    old_npz, old_png = d / "attr.npz", d / "attr.png"
    old_npz.write_bytes(b"old attributions " * 1000)
    old_png.write_bytes(b"old figure " * 1000)
    before = _listing(d)

    def half_written(target, *args, **kwargs):  # writes garbage, then the disk fills up
        opened = open(target, "wb") if isinstance(target, str) else target
        opened.write(b"\x00garbage" * 4000)
        opened.flush()
        raise OSError(28, "No space left on device")

    if which == "out":
        monkeypatch.setattr(np, "savez", half_written)
    else:
        import liftir.plots
        monkeypatch.setattr(liftir.plots, "feature_bars", lambda a, **kw: half_written(kw["path"]))
    code, _, err = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", 0, "-o", old_npz,
                       "--plot", old_png, "--no-progress")
    assert code == 2 and "No space left" in err
    if which == "out":  # the plot comes after the .npz: with the .npz lost it is not drawn
        assert old_npz.read_bytes() == b"old attributions " * 1000
    assert old_png.read_bytes() == b"old figure " * 1000
    assert _listing(d) == before  # no temporary file left behind


def test_outputs_replace_existing_files_whole(files, capsys):
    d = files["dir"]
    (d / "attr.npz").write_bytes(b"x" * 50_000)  # larger than the new file: no stale tail
    code, _, err = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", 0, "-o", d / "attr.npz",
                       "--no-progress")
    assert code == 0, err
    with np.load(d / "attr.npz") as f:
        assert f["x"].shape == (10, 6)
    assert not [p for p in d.iterdir() if p.name.startswith(".attr.npz")]


# ---- options -----------------------------------------------------------------------------------

def test_precision_float64(files, capsys):
    d = files["dir"]
    code, out, err = run(capsys, "explain", files["cnn"], "-i", files["img"], "-t", 1, "-b", "0.3",
                         "--precision", "float64", "-o", d / "f64.npz", "--no-progress")
    assert code == 0, err
    assert "in float64" in out
    x = np.load(files["img"])
    expected, delta = liftir.Explainer(files["cnn"], precision="float64").attribute(
        x, baselines=0.3, target=1, return_convergence_delta=True)
    with np.load(d / "f64.npz") as f:
        assert f["x"].dtype == np.float64
        np.testing.assert_allclose(f["x"], expected, rtol=1e-12, atol=1e-14)
        assert np.abs(f["delta"]).max() < 1e-10  # summation-to-delta in double precision
    code, out, _ = run(capsys, "check", files["cnn"], "--precision", "float64", "--rtol", "1e-9")
    assert code == 0 and "OK: every node conserves" in out


@pytest.mark.parametrize("model, inputs, baseline", [("cnn", "img", "0.3"), ("mlp", "x", "zeros")])
def test_engine_compiled_gives_the_interpreters_attributions(files, capsys, caplog, model, inputs, baseline):
    """--engine compiled runs each pass as one onnxruntime session (no pass left to the
    interpreter: no fallback warning) and writes the interpreter's attributions."""
    d = files["dir"]
    argv = ["explain", files[model], "-i", files[inputs], "-t", 1, "-b", baseline, "--no-progress"]
    code, out, err = run(capsys, *argv, "--engine", "compiled", "-o", d / "compiled.npz")
    assert code == 0, err
    assert "engine      compiled" in out
    assert "cannot compile" not in caplog.text
    code, out, err = run(capsys, *argv, "-o", d / "interpreted.npz")
    assert code == 0 and "engine      interpreter" in out
    with np.load(d / "compiled.npz") as c, np.load(d / "interpreted.npz") as i:
        name = "input" if "input" in c.files else "x"
        scale = np.abs(i[name]).max()
        assert np.abs(c[name] - i[name]).max() <= 1e-6 * scale
        assert np.abs(c["delta"]).max() < 1e-4 * max(1.0, scale)  # summation-to-delta


def test_target_help_says_how_the_cli_list_differs_from_python(capsys):
    code, out, _ = run(capsys, "explain", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "'--target 1,2,3' is NOT Python's target=[1, 2, 3]" in flat
    assert "target=[[1, 2, 3]]" in flat and "--target labels.npy" in flat


def test_cli_list_target_equals_python_2d_target(files, capsys):
    d = files["dir"]
    code, _, err = run(capsys, "explain", files["mlp"], "-i", files["x"], "-t", "2,0", "-o", d / "k.npz",
                       "--no-progress")
    assert code == 0, err
    x = np.load(files["x"])
    expected, delta = liftir.Explainer(files["mlp"]).attribute(x, target=[[2, 0]], return_convergence_delta=True)
    with np.load(d / "k.npz") as f:
        np.testing.assert_allclose(f["x"], expected, rtol=1e-5, atol=1e-6)
        assert f["delta"].shape == (10, 2) and np.abs(f["delta"]).max() < 1e-4


# ---- a model whose op types all have rules, but one rule's requirement is not met ---------------

def test_ops_explain_and_check_agree_on_a_rule_that_refuses_at_run_time(files, capsys):
    code, out, err = run(capsys, "ops", files["norm"])
    assert code == 2  # refused when the Explainer is built: its probe runs the rules
    assert "norm_over_batch" in out + err and "batch axis" in out + err
    assert "OK" not in out
    np.save(files["dir"] / "x3.npy", np.ones((4, 3), np.float32))
    code, _, err_explain = run(capsys, "explain", files["norm"], "-i", files["dir"] / "x3.npy", "-t", 0,
                               "-o", files["dir"] / "o.npz", "--no-progress")
    assert code == 2 and "norm_over_batch" in err_explain
    code, _, err_check = run(capsys, "check", files["norm"])
    assert code == 2 and "norm_over_batch" in err_check


def test_ops_runs_the_rules_of_a_supported_model(files, capsys):
    code, out, _ = run(capsys, "ops", files["cnn"], "--method", "guided_backprop")
    assert code == 0 and "every rule on the way to 'y' ran (guided_backprop" in out
    code, out, _ = run(capsys, "ops", files["two"], "--input", files["ab"])
    assert code == 0 and "ran" in out


def test_auto_batch_size_lets_a_visible_bar_move():
    from liftir.cli import _auto_batch_size

    assert _auto_batch_size(1000, bar_possible=False) == 128
    assert _auto_batch_size(128, bar_possible=True) == 13  # ~10 updates
    assert _auto_batch_size(20, bar_possible=True) == 8
    assert _auto_batch_size(100_000, bar_possible=True) == 128

"""Plots: smoke tests plus checks on what the returned figures contain."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from liftir.plots import dna_logo, feature_bars, image_heatmaps  # noqa: E402

RNG = np.random.default_rng(0)


def test_image_heatmaps_grid_titles_and_symmetric_limits(tmp_path):
    imgs = RNG.random((2, 16, 16, 3))
    attrs = {"gradient": RNG.normal(size=imgs.shape), "DeepLIFT": RNG.normal(size=imgs.shape) + 0.5}
    path = tmp_path / "maps.png"
    fig = image_heatmaps(imgs, attrs, path=str(path), title="demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 rows x (input + 2 methods) panels, plus one colorbar per map.
    assert len(fig.axes) == 2 * 3 + 2 * 2
    assert [a.get_title() for a in fig.axes[:3]] == ["input", "gradient", "DeepLIFT"]
    maps = [a for a in fig.axes if a.images and a.images[-1].get_cmap().name == "RdBu_r"]
    assert len(maps) == 4
    for a, (i, name) in zip(maps, [(0, "gradient"), (0, "DeepLIFT"), (1, "gradient"),
                                  (1, "DeepLIFT")]):
        im = a.images[-1]
        lo, hi = im.get_clim()
        assert lo == pytest.approx(-hi)
        summed = attrs[name][i].sum(-1)  # channels are summed per pixel
        np.testing.assert_allclose(np.asarray(im.get_array()), summed)
        assert hi == pytest.approx(np.abs(summed).max())


def test_image_heatmaps_layouts_scales_overlay_and_given_axes():
    img = RNG.random((3, 12, 10))  # one channels-first image
    attr = RNG.normal(size=img.shape)
    a = image_heatmaps(img, {"m": attr}, show_image=False)
    b = image_heatmaps(img.transpose(1, 2, 0), {"m": attr.transpose(1, 2, 0)}, show_image=False)
    np.testing.assert_allclose(a.axes[0].images[0].get_array(), b.axes[0].images[0].get_array())
    # Per-pixel maps are accepted as they are; "global" shares one limit.
    fig = image_heatmaps(img, {"p": attr.sum(0), "q": 3 * attr.sum(0)}, scale="global",
                         overlay=True)
    lims = [ax.images[-1].get_clim() for ax in fig.axes if len(ax.images) == 2]
    assert len(lims) == 2 and lims[0] == lims[1]
    assert lims[0][1] == pytest.approx(np.abs(3 * attr.sum(0)).max())
    from matplotlib.figure import Figure

    host = Figure()
    axes = host.subplots(1, 2)
    assert image_heatmaps(img, {"m": attr}, ax=axes) is host


def test_image_heatmaps_errors():
    img = RNG.random((8, 8, 3))
    with pytest.raises(ValueError, match="expected"):
        image_heatmaps(img, {"m": np.zeros((7, 8, 3))})
    with pytest.raises(ValueError, match="non-empty"):
        image_heatmaps(img, {})
    with pytest.raises(ValueError, match="channel"):
        image_heatmaps(RNG.random((8, 8, 8)), {"m": np.zeros((8, 8, 8))})


def _logo_patches(fig):
    return [p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("logo:")]


def test_dna_logo_letters_heights_and_orientation(tmp_path):
    contrib = np.zeros((6, 4))
    contrib[0, 2] = 1.5  # G up
    contrib[1, 0] = -0.8  # A down
    contrib[3] = [0.2, -0.3, 0.6, -0.1]  # a hypothetical-style column
    fig = dna_logo(contrib, start=100, title="logo", path=str(tmp_path / "logo.png"))
    patches = _logo_patches(fig)
    assert len(patches) == np.count_nonzero(contrib)
    ext = {p.get_gid(): p.get_path().get_extents() for p in patches}
    assert ext["logo:G:100"].y0 == pytest.approx(0) and ext["logo:G:100"].y1 == pytest.approx(1.5)
    assert ext["logo:A:101"].y1 == pytest.approx(0) and ext["logo:A:101"].y0 == pytest.approx(-0.8)
    # Stacks: positives upwards with the largest on top, negatives downwards.
    assert ext["logo:A:103"].y0 == pytest.approx(0) and ext["logo:G:103"].y0 == pytest.approx(0.2)
    assert ext["logo:T:103"].y1 == pytest.approx(0) and ext["logo:C:103"].y0 == pytest.approx(-0.4)
    # Each letter fills its own slot around its position.
    assert 99.5 < ext["logo:G:100"].x0 < ext["logo:G:100"].x1 < 100.5
    ax = fig.axes[0]
    assert ax.get_xlim() == (99.5, 105.5) and ax.get_title() == "logo"
    assert ax.get_xlabel() == "position"
    # Glyphs are upright, not mirrored, even below the axis: the negative A has the same
    # shape as a positive A of the same height.
    up = _logo_patches(dna_logo(-contrib[:2]))
    v_neg = _norm_vertices(next(p for p in patches if p.get_gid() == "logo:A:101"))
    v_pos = _norm_vertices(next(p for p in up if p.get_gid() == "logo:A:1"))
    np.testing.assert_allclose(v_neg, v_pos, atol=1e-9)


def _norm_vertices(patch):
    v = patch.get_path().vertices
    return (v - v.min(0)) / (v.max(0) - v.min(0))


def test_dna_logo_onehot_and_errors():
    hyp = RNG.normal(size=(30, 4))
    onehot = np.eye(4)[RNG.integers(0, 4, 30)]
    assert len(_logo_patches(dna_logo(hyp, onehot=onehot))) == 30
    assert len(_logo_patches(dna_logo(hyp))) == 120
    with pytest.raises(ValueError, match="transpose"):
        dna_logo(hyp.T)


def test_feature_bars_top_k_order_and_colours():
    values = np.array([0.1, -2.0, 0.5, 3.0, -0.05])
    names = ["a", "b", "c", "d", "e"]
    fig = feature_bars(values, names, top_k=3)
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["d", "b", "c"]
    assert ax.yaxis_inverted()  # the first label is drawn on top
    widths = [p.get_width() for p in ax.patches]
    assert widths == [3.0, -2.0, 0.5]
    colours = [p.get_facecolor() for p in ax.patches]
    assert colours[0] == colours[2] != colours[1]
    assert "top 3 of 5" in ax.get_title()
    with pytest.raises(ValueError, match="names"):
        feature_bars(values, names[:2])


def test_missing_matplotlib_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"liftir\[plot\]"):
        feature_bars([1.0, 2.0])


def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, liftir.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"

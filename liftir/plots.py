"""Figures for attributions: image heatmaps, DNA sequence logos, feature bar charts.

matplotlib is an optional dependency (``pip install 'liftir[plot]'``) imported only
when a plot is drawn. Figures are built with ``matplotlib.figure.Figure`` rather than
pyplot, so they work on any backend (Agg included) and do not pile up in pyplot's
figure registry; each function returns the Figure and saves it when given `path`.
Colour convention everywhere: positive evidence red, negative blue, zero white.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["image_heatmaps", "dna_logo", "feature_bars"]

DNA_COLORS = {"A": "#109648", "C": "#255C99", "G": "#F7B32B", "T": "#D62839"}
POSITIVE, NEGATIVE = "#d6604d", "#4393c3"  # the ends of RdBu_r, as in the heatmaps


def _matplotlib():
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency, imported on demand
        import matplotlib.figure  # noqa: F401,PLC0415
    except ImportError as exc:
        raise ImportError("liftir.plots needs matplotlib; install it with "
                          "`pip install 'liftir[plot]'` (or `pip install matplotlib`)") from exc
    return matplotlib


def _finish(fig, path, dpi):
    if path is not None:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def _symmetric_limit(*arrays: np.ndarray) -> float:
    m = max((float(np.nanmax(np.abs(a))) for a in arrays if np.size(a)), default=0.0)
    return m if m > 0 and np.isfinite(m) else 1.0


# --------------------------------------------------------------------------------------
# Image heatmaps
# --------------------------------------------------------------------------------------

def _channel_axis(shape: tuple[int, ...], channels_last: bool | None) -> int | None:
    """Channel axis of one image (H, W), (H, W, C) or (C, H, W); None for grayscale 2-D."""
    if len(shape) == 2:
        return None
    if channels_last is None:
        if shape[-1] in (1, 3, 4):
            return len(shape) - 1
        if shape[0] in (1, 3, 4):
            return 0
        raise ValueError(f"cannot tell the channel axis of an image of shape {shape}; "
                         "pass channels_last=True or False")
    return len(shape) - 1 if channels_last else 0


def _display_image(img: np.ndarray, caxis: int | None) -> np.ndarray:
    """Scale to [0, 1] for display (inputs are often normalized) and put channels last."""
    if caxis is not None:
        img = np.moveaxis(img, caxis, -1)
        if img.shape[-1] == 1:
            img = img[..., 0]
        elif img.shape[-1] == 4:
            img = img[..., :3]
    lo, hi = float(np.min(img)), float(np.max(img))
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img, dtype=float)


def image_heatmaps(images: np.ndarray, attributions: Mapping[str, np.ndarray], *,
                   channels_last: bool | None = None, show_image: bool = True,
                   overlay: bool = False, scale: str = "panel", cmap: str = "RdBu_r",
                   row_labels: Sequence[str] | None = None, title: str | None = None,
                   ax: Any = None, path: str | None = None, figsize=None, dpi: int = 120):
    """Signed per-pixel attribution maps of several methods side by side.

    As in the DeepLIFT paper's Figure 2, per-channel scores are summed into one score per
    pixel. Maps use a diverging colormap centred at 0 with symmetric limits, so white is
    "no contribution" and colours compare across pixels.

    Parameters
    ----------
    images : (H, W), (H, W, C), (C, H, W) for one image, or (N, H, W, C) / (N, C, H, W).
    attributions : method name -> array shaped like `images` (channels are summed) or
        already per pixel ((H, W) or (N, H, W)).
    channels_last : layout of `images`; guessed from a channel count of 1, 3 or 4.
    show_image : first column shows the image itself.
    overlay : draw each map over a grayscale copy of the image, opacity growing with |score|.
    scale : "panel" (each map its own limits), "row" (shared per image), "column" (per
        method) or "global".
    ax : optional sequence of Axes, one per panel in row-major order.

    Returns
    -------
    matplotlib.figure.Figure
    """
    mpl = _matplotlib()
    if not isinstance(attributions, Mapping) or not attributions:
        raise ValueError("attributions must be a non-empty dict of method name -> array")
    if scale not in ("panel", "row", "column", "global"):
        raise ValueError(f"scale must be 'panel', 'row', 'column' or 'global', got {scale!r}")
    imgs = np.asarray(images, dtype=float)
    if imgs.ndim not in (2, 3, 4):
        raise ValueError(f"images must have 2 to 4 dims, got shape {imgs.shape}")
    batch = imgs.ndim == 4
    if not batch:
        imgs = imgs[None]
    caxis = _channel_axis(imgs.shape[1:], channels_last)
    n = imgs.shape[0]
    pixel_shape = tuple(s for i, s in enumerate(imgs.shape[1:]) if i != caxis)

    maps: dict[str, np.ndarray] = {}
    for name, a in attributions.items():
        a = np.asarray(a, dtype=float)
        if not batch:
            a = a[None]
        if a.shape == imgs.shape and caxis is not None:
            a = a.sum(axis=caxis + 1)
        if a.shape != (n,) + pixel_shape:
            raise ValueError(f"attributions[{name!r}] has shape {np.shape(attributions[name])}, "
                             f"expected the images' shape {np.shape(images)} or per-pixel "
                             f"{((n,) if batch else ()) + pixel_shape}")
        maps[name] = a
    names = list(maps)
    cols = len(names) + int(show_image)
    if ax is None:
        fig = mpl.figure.Figure(figsize=figsize or (2.6 * cols + 0.6, 2.4 * n + 0.5),
                                layout="constrained")
        axes = fig.subplots(n, cols, squeeze=False)
    else:
        flat = np.ravel(np.asarray(ax, dtype=object))
        if flat.size != n * cols:
            raise ValueError(f"ax must hold {n * cols} Axes ({n} rows x {cols} columns), "
                             f"got {flat.size}")
        axes = flat.reshape(n, cols)
        fig = axes[0, 0].figure

    for i in range(n):
        shown = _display_image(imgs[i], caxis)
        gray = shown if shown.ndim == 2 else shown @ np.array([0.299, 0.587, 0.114])
        if show_image:
            a0 = axes[i, 0]
            a0.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
            a0.set_axis_off()
            if i == 0:
                a0.set_title("input")
            if row_labels is not None:
                a0.text(-0.05, 0.5, row_labels[i], transform=a0.transAxes, rotation=90,
                        ha="right", va="center")
        for j, name in enumerate(names):
            a = axes[i, j + int(show_image)]
            m = maps[name][i]
            if scale == "panel":
                lim = _symmetric_limit(m)
            elif scale == "row":
                lim = _symmetric_limit(*(maps[k][i] for k in names))
            elif scale == "column":
                lim = _symmetric_limit(maps[name])
            else:
                lim = _symmetric_limit(*maps.values())
            if overlay:
                a.imshow(gray, cmap="gray", vmin=0, vmax=1)
                im = a.imshow(m, cmap=cmap, vmin=-lim, vmax=lim,
                              alpha=np.clip(np.abs(m) / lim, 0, 1) ** 0.5)
            else:
                im = a.imshow(m, cmap=cmap, vmin=-lim, vmax=lim)
            a.set_xticks([])
            a.set_yticks([])
            if i == 0:
                a.set_title(name)
            cb = fig.colorbar(im, ax=a, fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=7)
            cb.formatter.set_powerlimits((-2, 3))
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi)


# --------------------------------------------------------------------------------------
# DNA logo
# --------------------------------------------------------------------------------------

_GLYPHS: dict[tuple[str, str], Any] = {}


def _glyph(letter: str, family: str):
    """The outline of a bold letter, moved to its bounding box origin (cached)."""
    key = (letter, family)
    if key not in _GLYPHS:
        from matplotlib.font_manager import FontProperties  # noqa: PLC0415
        from matplotlib.textpath import TextPath  # noqa: PLC0415
        path = TextPath((0, 0), letter, size=1, prop=FontProperties(family=family, weight="bold"))
        ext = path.get_extents()
        _GLYPHS[key] = (path, ext.x0, ext.y0, ext.width, ext.height)
    return _GLYPHS[key]


def dna_logo(contributions: np.ndarray, *, onehot: np.ndarray | None = None,
             alphabet: str = "ACGT", colors: Mapping[str, str] | None = None,
             start: int = 0, highlight: Sequence[tuple[int, int]] = (),
             title: str | None = None, ylabel: str = "contribution", font: str = "DejaVu Sans",
             ax: Any = None, path: str | None = None, figsize=None, dpi: int = 120):
    """Sequence logo of per-base scores: letter height = score, negatives below the axis.

    The DeepLIFT paper's Figure 3 view. Give contributions (L, 4), or hypothetical
    contributions with `onehot` to keep only the bases present. At each position the
    positive letters are stacked upwards (largest on top), the negative ones downwards;
    glyphs stay upright and are stretched to fill one position's width.

    Parameters
    ----------
    contributions : (L, len(alphabet)).
    start : coordinate of the first position on the x axis.
    highlight : (begin, end) spans, in the same coordinates, shaded behind the letters
        (e.g. the true motif positions).

    Returns
    -------
    matplotlib.figure.Figure. Each letter is a PathPatch with gid "logo:<letter>:<pos>".
    """
    mpl = _matplotlib()
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    c = np.asarray(contributions, dtype=float)
    k = len(alphabet)
    if c.ndim != 2 or c.shape[1] != k:
        hint = " (transpose a (4, L) array)" if c.ndim == 2 and c.shape[0] == k else ""
        raise ValueError(f"contributions must have shape (L, {k}), got {c.shape}{hint}")
    if onehot is not None:
        c = c * np.asarray(onehot, dtype=float).reshape(c.shape)
    colors = {**DNA_COLORS, **(colors or {})}
    length = c.shape[0]
    if ax is None:
        fig = mpl.figure.Figure(figsize=figsize or (float(np.clip(0.1 * length, 6, 20)), 2.6),
                                layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure

    width = 0.92
    top, bottom = 0.0, 0.0
    for b0, b1 in highlight:
        ax.axvspan(b0 - 0.5, b1 - 0.5, color="#f2e6a0", alpha=0.6, lw=0, zorder=0)
    for i in range(length):
        x = start + i
        order = np.argsort(c[i])
        up, down = 0.0, 0.0
        for b in order:  # positives, smallest first, so the largest ends on top
            if c[i, b] > 0:
                _draw_letter(ax, alphabet[b], x, up, c[i, b], width, colors, font)
                up += c[i, b]
        for b in order[::-1]:  # negatives, closest to zero first, the largest at the bottom
            if c[i, b] < 0:
                down += c[i, b]
                _draw_letter(ax, alphabet[b], x, down, -c[i, b], width, colors, font)
        top, bottom = max(top, up), min(bottom, down)
    span = (top - bottom) or 1.0
    ax.set_xlim(start - 0.5, start + length - 0.5)
    ax.set_ylim(bottom - 0.05 * span, top + 0.05 * span)
    ax.axhline(0.0, color="0.3", lw=0.6, zorder=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position")
    ax.set_ylabel(ylabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    return _finish(fig, path, dpi)


def _draw_letter(ax, letter, x, y, height, width, colors, font):
    from matplotlib.patches import PathPatch  # noqa: PLC0415
    from matplotlib.transforms import Affine2D  # noqa: PLC0415

    path, x0, y0, w, h = _glyph(letter.upper(), font)
    transform = (Affine2D().translate(-x0, -y0).scale(width / w, height / h)
                 .translate(x - width / 2, y))
    patch = PathPatch(transform.transform_path(path), facecolor=colors.get(letter.upper(), "0.4"),
                      edgecolor="none", zorder=2)
    patch.set_gid(f"logo:{letter}:{x}")
    ax.add_patch(patch)


# --------------------------------------------------------------------------------------
# Feature bars
# --------------------------------------------------------------------------------------

def feature_bars(values: np.ndarray, feature_names: Sequence[str] | None = None,
                 top_k: int | None = 20, *, title: str | None = None,
                 xlabel: str = "attribution", ax: Any = None, path: str | None = None,
                 figsize=None, dpi: int = 120):
    """Horizontal bars of the `top_k` features by |value|, largest on top, signed colours.

    For tabular models: one bar per input feature, red for positive contributions and
    blue for negative, with the value printed at the end of each bar.

    Returns
    -------
    matplotlib.figure.Figure
    """
    mpl = _matplotlib()
    v = np.asarray(values, dtype=float).ravel()
    names = [f"x{i}" for i in range(v.size)] if feature_names is None else list(feature_names)
    if len(names) != v.size:
        raise ValueError(f"{len(names)} feature names for {v.size} values")
    if v.size == 0:
        raise ValueError("no values to plot")
    k = v.size if top_k is None else max(1, min(int(top_k), v.size))
    order = np.argsort(-np.abs(v), kind="stable")[:k]
    vals = v[order]
    labels = [str(names[i]) for i in order]
    if ax is None:
        fig = mpl.figure.Figure(figsize=figsize or (6.4, 0.8 + 0.32 * k), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    ypos = np.arange(k)
    ax.barh(ypos, vals, color=[POSITIVE if x >= 0 else NEGATIVE for x in vals], height=0.7)
    ax.set_yticks(ypos, labels)
    ax.invert_yaxis()  # largest |value| on top
    ax.axvline(0.0, color="0.3", lw=0.8)
    lim = _symmetric_limit(vals)
    lo = min(0.0, float(vals.min())) - 0.22 * lim
    hi = max(0.0, float(vals.max())) + 0.22 * lim
    ax.set_xlim(lo, hi)
    for y, x in zip(ypos, vals):
        ax.text(x + (0.02 if x >= 0 else -0.02) * lim, y, f"{x:.3g}", va="center",
                ha="left" if x >= 0 else "right", fontsize=8)
    ax.set_xlabel(xlabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"top {k} of {v.size} features by |{xlabel}|")
    return _finish(fig, path, dpi)

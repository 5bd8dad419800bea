"""What users pass as inputs and baselines, validated and put in the model's input order.

Every problem is an InputError naming the input, raised before anything runs (so nothing
fails deep inside NumPy). The validated rows go through the engine stacked as one batch,
[actual rows; reference rows] per input (`stack`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from .backend import to_host
from .data import resolve_input
from .errors import InputError, ModelLoadError
from .graph import FLOAT_DTYPES


class Batch(NamedTuple):
    """Validated inputs and baselines in model-input order (what `prepare` returns): NumPy
    arrays (N, ...) per input, the baselines (1 or N, ...) per input or None, or for a
    distribution (B, ...) / (N, B, ...); and how results are packed like the inputs.
    `Explainer.forward` takes one without validating it again."""

    inputs: list
    baselines: list | None
    kind: tuple

    @property
    def n(self) -> int:
        """Samples in the batch."""
        return self.inputs[0].shape[0]

    def samples(self, start: int, stop: int) -> Batch:
        """Samples start:stop, with their own baselines where each sample has one (not for a
        distribution of references, whose first axis may count references)."""
        n = self.n
        refs = None if self.baselines is None else [r[start:stop] if r.shape[0] == n and n > 1 else r
                                                    for r in self.baselines]
        return Batch([x[start:stop] for x in self.inputs], refs, self.kind)

    def actual(self) -> Batch:
        """The inputs alone, without baselines (a forward of the actual rows only)."""
        return Batch(self.inputs, None, self.kind)


def model_inputs(graph) -> list:
    """The graph's inputs. Float inputs are attributed; integer and bool ones (token ids,
    masks) are held; anything else is refused."""
    bad = [i for i in graph.inputs if i.dtype is None or
           (i.dtype.type not in FLOAT_DTYPES and i.dtype.kind not in "biu")]
    if bad:
        names = ", ".join(f"{i.name!r} ({i.dtype})" for i in bad)
        raise ModelLoadError(f"liftir reads float, integer and bool inputs; this model has "
                             f"other inputs: {names}")
    if not graph.inputs:
        raise ModelLoadError("the model has no inputs to attribute to")
    return list(graph.inputs)


def unpack(names: list[str], inputs, what: str):
    """Inputs as a list in model-input order, plus how to pack results the same way."""
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - set(names)
        missing = [n for n in names if n not in inputs]
        if unknown or missing:
            raise InputError(f"{what}: keys must be the model inputs {names}; "
                             f"unknown {sorted(unknown)}, missing {missing}")
        return [inputs[n] for n in names], ("dict", names)
    if isinstance(inputs, (tuple, list)) and len(names) > 1:
        if len(inputs) != len(names):
            raise InputError(f"{what}: the model has {len(names)} inputs {names}, got {len(inputs)} arrays")
        return list(inputs), ("tuple", None)
    if isinstance(inputs, tuple) and len(names) == 1 and len(inputs) == 1:
        return [inputs[0]], ("tuple", None)
    if len(names) > 1:
        raise InputError(f"{what}: the model has {len(names)} inputs {names}; pass a tuple or a dict")
    return [inputs], ("array", None)


def pack(values, kind):
    """Results in the container the inputs came in (see `unpack`)."""
    form, names = kind
    if form == "dict":
        return dict(zip(names, values))
    if form == "tuple":
        return tuple(values)
    return values[0]


def as_array(value, info, what: str) -> np.ndarray:
    """`value` as a NumPy array of the input's dtype; InputError for anything else."""
    if hasattr(value, "__cuda_array_interface__"):  # a CuPy (or other GPU) array
        value = to_host(value)
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"{what} for input {info.name!r} is not an array: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} for input {info.name!r} has dtype {arr.dtype}; "
                         f"expected real numbers (float, int or bool)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InputError(f"{what} for input {info.name!r} contains {bad} NaN/Inf value(s)")
    return arr.astype(info.dtype, copy=False)


def check_shape(arr: np.ndarray, info, what: str) -> None:
    """The model's declared non-batch dimensions, where known, must match."""
    if info.shape is None:
        return
    if arr.ndim != len(info.shape):
        raise InputError(f"{what} for input {info.name!r} has shape {arr.shape}; the model expects "
                         f"rank {len(info.shape)} ({shape_str(info.shape)})")
    for axis, (got, want) in enumerate(zip(arr.shape[1:], info.shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and got != want:
            raise InputError(f"{what} for input {info.name!r} has shape {arr.shape}; the model expects "
                             f"{shape_str(info.shape)} (axis {axis} must be {want})")


def prepare(infos, inputs, baselines, need_reference: bool, distribution: bool = False,
            own_references: bool = False):
    """Validated inputs and baselines as lists of NumPy arrays in model-input order.

    Returns a Batch (inputs, baselines or None, how to pack results like `inputs`). Every
    problem is an InputError naming the input. `infos`: the model's inputs (name, dtype,
    shape); `own_references`: every sample needs its own reference row
    (liftir.rule.Rule.needs_own_references), so one shared row is broadcast to all.
    """
    names = [info.name for info in infos]
    inputs, baselines = resolve_input(inputs), resolve_input(baselines)  # `example:NAME`
    xs, kind = unpack(names, inputs, "inputs")
    xs = [as_array(x, info, "inputs") for x, info in zip(xs, infos)]
    for x, info in zip(xs, infos):
        if x.ndim == 0:
            raise InputError(f"inputs for {info.name!r} must have a batch axis, got a scalar")
        check_shape(x, info, "inputs")
    n = xs[0].shape[0]
    if any(x.shape[0] != n for x in xs):
        raise InputError(f"all inputs must have the same batch size, got {[x.shape[0] for x in xs]}")
    if n == 0:
        raise InputError("inputs have an empty batch")
    if not need_reference:
        return Batch(xs, None, kind)
    held = [info.dtype.kind != "f" for info in infos]
    if baselines is None:
        bs = [None] * len(xs)
    elif len(infos) == 1 and not isinstance(baselines, (Mapping, tuple)):
        bs = [baselines]
    elif isinstance(baselines, (int, float)):
        bs = [None if h else baselines for h in held]  # a scalar reference is for float inputs
    elif isinstance(baselines, Mapping) and any(held):  # held inputs may be left out
        bs, _ = unpack(names, {**{i.name: None for i, h in zip(infos, held) if h}, **baselines}, "baselines")
    else:
        bs, _ = unpack(names, baselines, "baselines")
    # default reference: zeros; an integer input not given is held at its actual value
    refs = [(x if h else np.zeros((1,) + x.shape[1:], x.dtype)) if b is None else
            baseline(b, x, info, distribution) for b, x, info, h in zip(bs, xs, infos, held)]
    if distribution:
        left_out = [h and b is None for h, b in zip(held, bs)]
        # (B,) for references shared by the batch, (N, B) for each sample's own; each input
        # counted against its own rank (a (N,) lengths input beside (N, T, F) features)
        counts = {r.shape[:r.ndim - x.ndim + 1] for r, x, lo in zip(refs, xs, left_out) if not lo}
        if len(counts) > 1:
            raise InputError(f"all baselines must hold the same number of references, got shapes "
                             f"{[r.shape for r, lo in zip(refs, left_out) if not lo]}")
        if any(left_out):
            # an integer input the baselines leave out keeps each sample's own value for all of
            # its references, so every input's references become the sample's own, (N, B, ...)
            pairs = next(iter(counts))[-1] if counts else 1
            refs = [np.broadcast_to(x[:, None], (n, pairs) + x.shape[1:]) if lo else
                    r if r.ndim == x.ndim + 1 else np.broadcast_to(r[None], (n,) + r.shape)
                    for r, x, lo in zip(refs, xs, left_out)]
        return Batch(xs, refs, kind)
    own = own_references
    if n > 1 and not own and any(r.shape[0] == n for r in refs) and all(
            r.shape[0] == 1 or (r == r[:1]).all() for r in refs):
        # zeros_like(x) & co., or a held input equal in every sample (a text model's all-ones
        # attention mask beside one row of [PAD] ids): one reference row, forwarded once
        refs = [r[:1] for r in refs]
    if n > 1 and (own or any(r.shape[0] == n for r in refs)):  # per-sample references: all to N rows
        refs = [np.broadcast_to(r, (n,) + r.shape[1:]) for r in refs]
    return Batch(xs, refs, kind)


def baseline(b, x: np.ndarray, info, distribution: bool = False) -> np.ndarray:
    """One input's baselines, checked against its inputs `x`: (1 or N, ...), or for a
    distribution (B, ...) / (N, B, ...)."""
    if np.isscalar(b):
        return np.full((1,) + x.shape[1:], as_array(b, info, "baselines"), dtype=x.dtype)
    arr = as_array(b, info, "baselines")
    if arr.shape == x.shape[1:]:
        arr = arr[None]
    if distribution and arr.ndim == x.ndim and arr.shape[1:] == x.shape[1:] and arr.shape[0] >= 1:
        return arr  # (B, ...): one distribution shared by the batch
    if distribution and arr.ndim == x.ndim + 1 and arr.shape[0] == x.shape[0] and arr.shape[2:] == x.shape[1:]:
        return arr  # (N, B, ...): each sample's own references (e.g. its dinucleotide shuffles)
    if arr.ndim != x.ndim or arr.shape[0] not in (1, x.shape[0]):
        raise InputError(f"baselines for input {info.name!r} have shape {arr.shape}; expected "
                         f"{x.shape}, (1, {', '.join(map(str, x.shape[1:]))}) or {x.shape[1:]}")
    try:
        return np.broadcast_to(arr, (arr.shape[0],) + x.shape[1:])
    except ValueError:
        raise InputError(f"baselines for input {info.name!r} of shape {arr.shape} do not broadcast "
                         f"to the inputs' shape {x.shape}") from None


def stack(xp, names: list[str], xs, refs=None) -> dict:
    """The batch one pass runs, per model input: [actual rows; reference rows] on `xp`."""
    return {name: xp.asarray(x if ref is None else np.concatenate([x, ref]))
            for name, x, ref in zip(names, xs, refs or [None] * len(xs))}


def shape_str(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape) + ")"

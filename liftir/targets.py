"""What a call explains: the tensor (a final Softmax/Sigmoid stripped, paper 2.4/2.5) and
the targets, as the initial multipliers (the seed) of the backward pass.

Targets are validated here, before any pass runs: an index out of range or a target of
the wrong form is an InputError naming it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError
from .methods import FinalActivation

STRIPPED_FINAL_OPS = ("Softmax", "LogSoftmax", "Sigmoid")
PASS_THROUGH_OPS = ("Identity", "Cast", "Dropout")


def final_activation(graph, output: str):
    """The Softmax/LogSoftmax/Sigmoid node a model output comes from, or None.

    Looks through Identity, Cast and Dropout (skl2onnx ends Softmax -> Identity).
    """
    if output not in {o.name for o in graph.outputs}:
        return None  # an intermediate neuron (output=...) is explained as it is
    node = graph.nodes.get(graph.producer.get(output, ""))
    while node is not None and node.op_type in PASS_THROUGH_OPS:
        node = graph.nodes.get(graph.producer.get(node.inputs[0], ""))
    return node if node is not None and node.op_type in STRIPPED_FINAL_OPS else None


def explained_tensor(graph, output: str, final: FinalActivation) -> tuple[str, str | None]:
    """(tensor whose value is explained, final op stripped or None)."""
    if final is not FinalActivation.STRIP:
        return output, None
    node = final_activation(graph, output)
    if node is None:
        return output, None
    if node.op_type != "Sigmoid" and node.opset < 13 and len(_shape_hint(graph, node.outputs[0])) > 2:
        return output, None  # old-opset softmax over flattened trailing axes: keep it
    return node.inputs[0], node.op_type


def _shape_hint(graph, name: str):
    info = graph.tensor_info(name)
    return info.shape if info is not None and info.shape is not None else (None, None)


def n_targets(rest: tuple[int, ...], target) -> int:
    """K, the number of targets explained together: 1 unless "all" or an (N, K) array."""
    if isinstance(target, str) and target == "all":
        return int(np.prod(rest)) if rest else 1
    if isinstance(target, np.ndarray) and target.ndim == 2:
        return target.shape[1]
    return 1


def seed(out_shape: tuple[int, ...], target, stripped: str | None, axis: int,
         targets: slice = slice(None), dtype=np.float64) -> np.ndarray:
    """The initial multipliers (k, N, *out_shape[1:]) selecting the explained quantity,
    for the targets `targets` of the K the call asks for.

    K is 1 for one target per sample; K > 1 for several (target="all" or an (N, K) /
    (1, K) array of class indices). Only the slice asked for is built: for "all" the
    full seed is K * N * K numbers, 13 GiB for 30,000 outputs.
    """
    n = out_shape[0]
    rest = out_shape[1:]
    size = int(np.prod(rest)) if rest else 1
    if stripped in ("Softmax", "LogSoftmax"):
        dtype = np.float64  # the mean-normalized weights are built in double, then cast once
    if isinstance(target, str):
        if target != "all":
            raise InputError(f"target must be an int, a sequence, a tuple or 'all', got {target!r}")
        picked = np.arange(size)[targets]
        mask = np.zeros((len(picked), n, size), dtype=dtype)
        mask[np.arange(len(picked)), :, picked] = 1.0
        mask = mask.reshape((len(picked), n) + rest)
    elif isinstance(target, np.ndarray) and target.ndim == 2:
        if len(rest) != 1:
            raise InputError(f"several class targets per sample need an (N, C) output; this one is "
                             f"{('N',) + rest}")
        if target.shape[0] not in (1, n) or target.dtype.kind not in "iu":
            raise InputError(f"a 2-D target must be ints of shape (N, K) or (1, K), got {target.shape}")
        check_indices(target, rest[0], "targets")
        t = np.broadcast_to(target, (n, target.shape[1]))[:, targets]
        mask = np.zeros((t.shape[1], n) + rest, dtype=dtype)
        mask[np.arange(t.shape[1])[None, :], np.arange(n)[:, None], t] = 1.0
    elif target is None:
        if size != 1:
            raise InputError(f"the explained output has shape {('N',) + rest}: pass target= "
                             f"(an index, one index per sample, a tuple over the non-batch axes, or 'all')")
        mask = np.ones((1, n) + rest, dtype=dtype)
    else:
        mask = np.zeros((1, n) + rest, dtype=dtype)
        mask[(0, np.arange(n)) + target_index(target, n, rest)] = 1.0
    if stripped in ("Softmax", "LogSoftmax"):
        ax = axis if axis >= 0 else len(out_shape) + axis
        if ax == 0:
            raise InputError("a Softmax over the batch axis cannot be explained per sample")
        mask = mask - mask.sum(axis=ax + 1, keepdims=True) / out_shape[ax]  # paper 2.5
    return mask


def target_index(target, n: int, rest: tuple[int, ...]) -> tuple:
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if len(rest) != 1:
            raise InputError(f"an int target indexes axis 1 of an (N, C) output; this output is "
                             f"{('N',) + rest}: pass a tuple with one index per non-batch axis")
        check_indices(np.asarray([target]), rest[0], "target")
        return (np.full(n, int(target)),)
    if isinstance(target, tuple):
        if len(target) != len(rest) or not all(isinstance(t, (int, np.integer)) for t in target):
            raise InputError(f"a tuple target needs one int per non-batch axis of the output "
                             f"{('N',) + rest}, got {target!r}")
        for t, size in zip(target, rest):
            if not 0 <= t < size:
                raise InputError(f"target {target!r} is out of range for output shape {('N',) + rest} "
                                 f"(indices count from 0; negative indices are not accepted)")
        return tuple(np.full(n, int(t)) for t in target)
    if isinstance(target, (Sequence, np.ndarray)) and not isinstance(target, str):
        arr = np.asarray(target)
        if arr.ndim != 1 or arr.shape[0] != n or arr.dtype.kind not in "iu":
            raise InputError(f"a sequence target needs one int per sample ({n}), got shape {arr.shape}")
        if len(rest) != 1:
            raise InputError(f"per-sample int targets index axis 1 of an (N, C) output; this output is "
                             f"{('N',) + rest}")
        check_indices(arr, rest[0], "targets")
        return (arr,)
    raise InputError(f"target must be None, an int, a tuple of ints or a sequence of ints, got {target!r}")


def softmax_axis(graph, output: str) -> int:
    """The axis of the final Softmax/LogSoftmax `output` comes from (-1 for none or a Sigmoid)."""
    node = final_activation(graph, output)
    if node is None or node.op_type == "Sigmoid":
        return -1
    return int(node.attrs.get("axis", -1 if node.opset >= 13 else 1))


def several(k: int, target) -> bool:
    """Whether results get a target axis, (N, K, ...): several targets, "all", or an (N, K) array."""
    return k > 1 or isinstance(target, str) or (isinstance(target, np.ndarray) and target.ndim == 2)


def sequence_target(target, n: int):
    """A list or array target as an array of one int per sample (N,) or several (N, K)."""
    if isinstance(target, (Sequence, np.ndarray)) and not isinstance(target, (str, tuple)):
        target = np.asarray(target)
        if target.ndim not in (1, 2) or (target.ndim == 1 and target.shape[0] != n):
            raise InputError(f"a sequence target needs one int per sample ({n}), got shape {target.shape}")
    return target


def rows_of(target, start: int, stop: int, n: int):
    """The part of a per-sample target (N,) / (N, K) that belongs to samples start:stop."""
    if isinstance(target, np.ndarray) and target.shape[0] == n:
        return target[start:stop]
    return target


def check_indices(indices: np.ndarray, size: int, what: str) -> None:
    """Class indices must lie in [0, size): name the first offender and where it sits.

    Negative indices are refused rather than wrapped as in Python, so that a typo such as
    `-t -1` cannot silently explain the last class.
    """
    flat = indices.reshape(-1)
    bad = np.flatnonzero((flat < 0) | (flat >= size))
    if not bad.size:
        return
    value = int(flat[bad[0]])
    where = ""
    if flat.size > 1:
        position = tuple(int(i) for i in np.unravel_index(bad[0], indices.shape))
        if len(position) == 2 and indices.shape[0] == 1:  # (1, K): the same classes for every sample
            position = position[1:]
        where = f" at position {position[0] if len(position) == 1 else position}"
    why = ("negative (class indices count from 0; negative indices are not accepted)" if value < 0
           else f"out of range for {size} outputs (0 to {size - 1})")
    more = ""
    if bad.size > 1:
        others = sorted({int(v) for v in flat[bad]} - {value})
        more = (f"; {bad.size} of the {flat.size} entries are out of range"
                + (f" (also {', '.join(map(str, others[:5]))}{', ...' if len(others) > 5 else ''})" if others else ""))
    raise InputError(f"{what}: {value}{where} is {why}{more}")

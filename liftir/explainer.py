"""The public entry point: `Explainer(model, method=...).attribute(inputs, baselines, target)`.

This module validates what the user passes (so nothing fails deep inside NumPy),
stacks actual and reference inputs into one batch, asks the scheduler for a forward and
a backward pass, and turns multipliers into attributions and convergence deltas.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import revealcancel, scheduler
from .backend import array_module, to_host
from .batch_axis import samples_first
from .errors import BatchAxisError, InputError, ModelLoadError, RuleError
from .folding import fold_constants
from .graph import FLOAT_DTYPES, Graph, build_graph, promote_to_float64, read_model
from .methods import Method, get_method, integration_points

MAX_RULES = ("cross_max", "paper")
FINAL_ACTIVATIONS = ("strip", "keep")
STRIPPED_FINAL_OPS = ("Softmax", "LogSoftmax", "Sigmoid")
PASS_THROUGH_OPS = ("Identity", "Cast", "Dropout")


class Explainer:
    """Attributions for an ONNX model.

    Parameters
    ----------
    model : path, bytes or onnx.ModelProto
        The model. It is parsed and checked, never executed as code.
    method : str
        "deeplift" (default), "saliency", "input_x_gradient", "guided_backprop", "deconvnet".
    backend : "numpy" (default), "cupy" or "auto".
    max_rule : "cross_max" (default) or "paper"
        DeepLIFT rule for MaxPool/GlobalMaxPool/ReduceMax; see README, "Max rules".
    final_activation : "strip" (default) or "keep"
        With "strip", a target read from a final Softmax/LogSoftmax is explained at its
        logits with mean-normalized weights (paper 2.5), and a final Sigmoid at its input
        (paper 2.4). "keep" explains the activation itself.
    rules : mapping op type -> Rule, optional
        Rules for this Explainer only, overriding registered and built-in ones.
    output : str, optional
        Default tensor to explain (any tensor of the graph); the model's only output if omitted.
    precision : "model" (default) or "float64"
        "float64" runs the whole graph in double precision (slower: no onnxruntime kernels).
    """

    def __init__(self, model: Any, method: str = "deeplift", *, backend: str = "numpy",
                 max_rule: str = "cross_max", final_activation: str = "strip",
                 rules: Mapping | None = None, output: str | None = None, precision: str = "model"):
        self.method: Method = get_method(method)
        if max_rule not in MAX_RULES:
            raise InputError(f"max_rule must be one of {MAX_RULES}, got {max_rule!r}")
        if final_activation not in FINAL_ACTIVATIONS:
            raise InputError(f"final_activation must be one of {FINAL_ACTIVATIONS}, got {final_activation!r}")
        self.xp = array_module(backend)
        self.model = read_model(model)
        self.graph: Graph = build_graph(self.model)
        fold_constants(self.graph)
        if precision not in ("model", "float64"):
            raise InputError(f"precision must be 'model' or 'float64', got {precision!r}")
        if precision == "float64":
            promote_to_float64(self.graph)
        self.options = {"max_rule": max_rule, "final_activation": final_activation}
        self.inputs = self._model_inputs()
        held = tuple(i.name for i in self.inputs if i.dtype.kind != "f")
        self.plan = scheduler.Plan(self.graph, self.method.mode, self.method.name, rules, integer_inputs=held)
        #: what attributions are returned for: the float inputs, then the float tensors computed
        #: directly from integer inputs (embedding lookups, casts of masks; liftir/held.py)
        self.attributed: list[str] = [i.name for i in self.inputs if i.dtype.kind == "f"] + self.plan.embeddings
        if held and method in ("integrated_gradients", "deeplift_shap"):
            raise InputError(f"method {method!r} is not available yet for models with integer inputs "
                             f"({', '.join(held)}); use deeplift, saliency or input_x_gradient, which "
                             f"attribute to their embeddings")
        if not self.attributed:
            raise ModelLoadError("the model computes no float tensor from its inputs: nothing to attribute to")
        self.output = self._check_output(output) if output else self._default_output()
        # every unsupported op on the way to what will be explained, all at once, up front
        # (with several outputs and none chosen: the float ones; integer label heads are not explained)
        self.plan.require((self.output,) if self.output else tuple(
            o.name for o in self.graph.outputs if o.dtype is None or o.dtype.kind == "f"))
        self._probe()

    def _probe(self) -> None:
        """Forward one actual and one reference row of zeros now, so that an op mixing samples
        (BatchAxisError) or one a rule refuses in its forward (division by an activation) is
        reported when the Explainer is built, by node name. Symbolic non-batch dimensions (a
        sequence length) get 3; if the probe fails for any other reason (a batch size frozen
        into the graph, a size the model does not take) the first call reports it instead."""
        guessed = False
        feeds = {}
        for info in self.inputs:
            if info.shape is None or (isinstance(info.shape[0], int) and info.shape[0] > 0):
                return  # unknown rank or a fixed batch size: nothing to probe with
            dims = []
            for d in info.shape[1:]:
                known = isinstance(d, int) and d > 0
                guessed |= not known
                dims.append(d if known else 3)
            feeds[info.name] = self.xp.asarray(np.zeros([2] + dims, dtype=info.dtype))
        outputs = (self.output,) if self.output else tuple(
            o.name for o in self.graph.outputs if o.dtype is None or o.dtype.kind == "f")
        try:
            scheduler.forward(self.plan, self.xp, feeds, 1, 1, outputs, self.method.mode, self.options,
                              engine="rules")  # the rules' forwards, which hold their refusals
        except BatchAxisError:
            raise
        except RuleError:
            if not guessed:
                raise
        except Exception:  # noqa: BLE001 - a probe, not the user's call
            pass

    # ---- model inspection ------------------------------------------------------------------
    def _model_inputs(self):
        """Float inputs are attributed; integer and bool ones (token ids, masks) are held."""
        bad = [i for i in self.graph.inputs if i.dtype is None or
               (i.dtype.type not in FLOAT_DTYPES and i.dtype.kind not in "biu")]
        if bad:
            names = ", ".join(f"{i.name!r} ({i.dtype})" for i in bad)
            raise ModelLoadError(f"liftir reads float, integer and bool inputs; this model has "
                                 f"other inputs: {names}")
        if not self.graph.inputs:
            raise ModelLoadError("the model has no inputs to attribute to")
        return list(self.graph.inputs)

    def _default_output(self) -> str | None:
        """The model's only output; None when it has several (then each call names one)."""
        outs = [o.name for o in self.graph.outputs]
        return outs[0] if len(outs) == 1 else None

    def _output_for_call(self, output: str | None) -> str:
        out = self._check_output(output) if output else self.output
        if out is None:
            outs = [o.name for o in self.graph.outputs]
            raise InputError(f"the model has {len(outs)} outputs ({', '.join(outs)}); pass output=NAME")
        self.plan.require((out,))
        return out

    def _check_output(self, name: str) -> str:
        if name not in self.graph.tensor_names():
            known = sorted(self.graph.producer)[:20]
            raise InputError(f"no tensor named {name!r} in the model; tensors include: {', '.join(known)}")
        if name in self.graph.constants:
            raise InputError(f"tensor {name!r} is a constant of the model; it has no attribution")
        return name

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    # ---- input validation --------------------------------------------------------------------
    def _unpack(self, inputs, what: str):
        """Inputs as a list in model-input order, plus how to pack results the same way."""
        names = self.input_names
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

    @staticmethod
    def _pack(values, kind):
        form, names = kind
        if form == "dict":
            return dict(zip(names, values))
        if form == "tuple":
            return tuple(values)
        return values[0]

    def _as_array(self, value, info, what: str) -> np.ndarray:
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

    def _check_shape(self, arr: np.ndarray, info, what: str) -> None:
        if info.shape is None:
            return
        if arr.ndim != len(info.shape):
            raise InputError(f"{what} for input {info.name!r} has shape {arr.shape}; the model expects "
                             f"rank {len(info.shape)} ({_shape_str(info.shape)})")
        for axis, (got, want) in enumerate(zip(arr.shape[1:], info.shape[1:]), start=1):
            if isinstance(want, int) and want > 0 and got != want:
                raise InputError(f"{what} for input {info.name!r} has shape {arr.shape}; the model expects "
                                 f"{_shape_str(info.shape)} (axis {axis} must be {want})")

    def prepare_inputs(self, inputs, baselines, need_reference: bool, distribution: bool = False):
        """Validated inputs and baselines as lists of NumPy arrays in model-input order.

        Returns (inputs, baselines or None, how to pack results like `inputs`). Every
        problem is an InputError naming the input; used by `liftir check` and the CLI too.
        """
        xs, kind = self._unpack(inputs, "inputs")
        xs = [self._as_array(x, info, "inputs") for x, info in zip(xs, self.inputs)]
        for x, info in zip(xs, self.inputs):
            if x.ndim == 0:
                raise InputError(f"inputs for {info.name!r} must have a batch axis, got a scalar")
            self._check_shape(x, info, "inputs")
        n = xs[0].shape[0]
        if any(x.shape[0] != n for x in xs):
            raise InputError(f"all inputs must have the same batch size, got {[x.shape[0] for x in xs]}")
        if n == 0:
            raise InputError("inputs have an empty batch")
        if not need_reference:
            return xs, None, kind
        held = [info.dtype.kind != "f" for info in self.inputs]
        if baselines is None:
            bs = [None] * len(xs)
        elif len(self.inputs) == 1 and not isinstance(baselines, (Mapping, tuple)):
            bs = [baselines]
        elif isinstance(baselines, (int, float)):
            bs = [None if h else baselines for h in held]  # a scalar reference is for float inputs
        elif isinstance(baselines, Mapping) and any(held):  # held inputs may be left out
            bs, _ = self._unpack({**{i.name: None for i, h in zip(self.inputs, held) if h}, **baselines},
                                 "baselines")
        else:
            bs, _ = self._unpack(baselines, "baselines")
        # default reference: zeros; an integer input not given is held at its actual value
        refs = [(x if h else np.zeros((1,) + x.shape[1:], x.dtype)) if b is None else
                self._baseline(b, x, info, distribution) for b, x, info, h in zip(bs, xs, self.inputs, held)]
        if distribution:
            if len({r.shape[:r.ndim - xs[0].ndim + 1] for r in refs}) != 1:
                raise InputError(f"all baselines must hold the same number of references, got shapes "
                                 f"{[r.shape for r in refs]}")
            return xs, refs, kind
        if n > 1 and all(r.shape[0] == n and (r == r[:1]).all() for r in refs):
            refs = [r[:1] for r in refs]  # zeros_like(x) & co.: one reference row, forwarded once
        if any(r.shape[0] == n and n > 1 for r in refs):  # per-sample references: all to N rows
            refs = [np.broadcast_to(r, (n,) + r.shape[1:]) for r in refs]
        return xs, refs, kind

    def _baseline(self, b, x: np.ndarray, info, distribution: bool = False) -> np.ndarray:
        if np.isscalar(b):
            return np.full((1,) + x.shape[1:], self._as_array(b, info, "baselines"), dtype=x.dtype)
        arr = self._as_array(b, info, "baselines")
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

    # ---- targets -----------------------------------------------------------------------------
    def _final_activation(self, output: str):
        """The Softmax/LogSoftmax/Sigmoid node a model output comes from, or None.

        Looks through Identity, Cast and Dropout (skl2onnx ends Softmax -> Identity).
        """
        if output not in {o.name for o in self.graph.outputs}:
            return None  # an intermediate neuron (output=...) is explained as it is
        node = self.graph.nodes.get(self.graph.producer.get(output, ""))
        while node is not None and node.op_type in PASS_THROUGH_OPS:
            node = self.graph.nodes.get(self.graph.producer.get(node.inputs[0], ""))
        return node if node is not None and node.op_type in STRIPPED_FINAL_OPS else None

    def explained_tensor(self, output: str) -> tuple[str, str | None]:
        """(tensor whose value is explained, final op stripped or None)."""
        if self.options["final_activation"] != "strip":
            return output, None
        node = self._final_activation(output)
        if node is None:
            return output, None
        if node.op_type != "Sigmoid" and node.opset < 13 and len(self._shape_hint(node.outputs[0])) > 2:
            return output, None  # old-opset softmax over flattened trailing axes: keep it
        return node.inputs[0], node.op_type

    def _shape_hint(self, name: str):
        info = self.graph.tensor_info(name)
        return info.shape if info is not None and info.shape is not None else (None, None)

    def _seed(self, out_shape: tuple[int, ...], target, stripped: str | None, axis: int):
        """The initial multipliers (K, N, *out_shape[1:]) selecting the explained quantity.

        K is 1 for one target per sample; K > 1 for several (target="all" or an (N, K) /
        (1, K) array of class indices), explained together in one backward pass.
        """
        n = out_shape[0]
        rest = out_shape[1:]
        size = int(np.prod(rest)) if rest else 1
        if isinstance(target, str):
            if target != "all":
                raise InputError(f"target must be an int, a sequence, a tuple or 'all', got {target!r}")
            mask = np.zeros((size, n, size), dtype=np.float64)
            mask[np.arange(size), :, np.arange(size)] = 1.0
            mask = mask.reshape((size, n) + rest)
        elif isinstance(target, np.ndarray) and target.ndim == 2:
            if len(rest) != 1:
                raise InputError(f"several class targets per sample need an (N, C) output; this one is "
                                 f"{('N',) + rest}")
            if target.shape[0] not in (1, n) or target.dtype.kind not in "iu":
                raise InputError(f"a 2-D target must be ints of shape (N, K) or (1, K), got {target.shape}")
            if (target < -rest[0]).any() or (target >= rest[0]).any():
                raise InputError(f"targets out of range for {rest[0]} outputs")
            t = np.broadcast_to(target % rest[0], (n, target.shape[1]))
            mask = np.zeros((t.shape[1], n) + rest, dtype=np.float64)
            mask[np.arange(t.shape[1])[None, :], np.arange(n)[:, None], t] = 1.0
        elif target is None:
            if size != 1:
                raise InputError(f"the explained output has shape {('N',) + rest}: pass target= "
                                 f"(an index, one index per sample, a tuple over the non-batch axes, or 'all')")
            mask = np.ones((1, n) + rest, dtype=np.float64)
        else:
            mask = np.zeros((1, n) + rest, dtype=np.float64)
            mask[(0, np.arange(n)) + self._target_index(target, n, rest)] = 1.0
        if stripped in ("Softmax", "LogSoftmax"):
            ax = axis if axis >= 0 else len(out_shape) + axis
            if ax == 0:
                raise InputError("a Softmax over the batch axis cannot be explained per sample")
            mask = mask - mask.sum(axis=ax + 1, keepdims=True) / out_shape[ax]  # paper 2.5
        return mask

    @staticmethod
    def _target_index(target, n: int, rest: tuple[int, ...]) -> tuple:
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            if len(rest) != 1:
                raise InputError(f"an int target indexes axis 1 of an (N, C) output; this output is "
                                 f"{('N',) + rest}: pass a tuple with one index per non-batch axis")
            if not -rest[0] <= target < rest[0]:
                raise InputError(f"target {target} is out of range for {rest[0]} outputs")
            return (np.full(n, int(target) % rest[0]),)
        if isinstance(target, tuple):
            if len(target) != len(rest) or not all(isinstance(t, (int, np.integer)) for t in target):
                raise InputError(f"a tuple target needs one int per non-batch axis of the output "
                                 f"{('N',) + rest}, got {target!r}")
            for t, size in zip(target, rest):
                if not -size <= t < size:
                    raise InputError(f"target {target!r} is out of range for output shape {('N',) + rest}")
            return tuple(np.full(n, int(t) % size) for t, size in zip(target, rest))
        if isinstance(target, (Sequence, np.ndarray)) and not isinstance(target, str):
            arr = np.asarray(target)
            if arr.ndim != 1 or arr.shape[0] != n or arr.dtype.kind not in "iu":
                raise InputError(f"a sequence target needs one int per sample ({n}), got shape {arr.shape}")
            if len(rest) != 1:
                raise InputError(f"per-sample int targets index axis 1 of an (N, C) output; this output is "
                                 f"{('N',) + rest}")
            if (arr < -rest[0]).any() or (arr >= rest[0]).any():
                raise InputError(f"targets {arr.tolist()} out of range for {rest[0]} outputs")
            return (arr % rest[0],)
        raise InputError(f"target must be None, an int, a tuple of ints or a sequence of ints, got {target!r}")

    # ---- running ---------------------------------------------------------------------------------
    def predict(self, inputs, output: str | None = None):
        """The value of `output` (default: the explained output) for `inputs`, as NumPy.

        Computed by the rules' own forwards (the interpreter), never by onnxruntime, so that
        comparing it with onnxruntime tests liftir.
        """
        xs, _, _ = self.prepare_inputs(inputs, None, need_reference=False)
        out = self._output_for_call(output)
        feeds = {name: self.xp.asarray(x) for name, x in zip(self.input_names, xs)}
        run = scheduler.forward(self.plan, self.xp, feeds, xs[0].shape[0], 0, (out,), "gradient", self.options,
                                engine="rules")
        return to_host(run.device(out))

    def attribute(self, inputs, baselines=None, target=None, *, output: str | None = None,
                  layer: str | None = None, return_convergence_delta: bool = False,
                  batch_size: int | None = None, progress: bool = False, n_steps: int = 50,
                  integration: str = "gausslegendre", internal_batch_size: int | None = None,
                  abs: bool = False):  # noqa: A002 - Captum's Saliency names it so
        """Attributions of the target output to each input feature, shaped like `inputs`.

        Parameters
        ----------
        inputs : array (N, ...), or a tuple / dict (by input name) for several inputs.
        baselines : the reference input(s): same container, each (N, ...), (1, ...), (...)
            or a scalar; default zeros. For "deeplift_shap": a distribution (B, ...) shared by
            the batch, or (N, B, ...) with each sample's own references.
        target : int (index into axis 1 of an (N, C) output), a sequence of N ints, a tuple
            over all non-batch axes, None for one number per sample, or several at once:
            "all" or an (N, K) / (1, K) int array, giving results of shape (N, K, ...).
        output : tensor to explain (any tensor of the graph); default: the Explainer's.
        layer : attribute to this hidden tensor instead of the inputs (like Captum's
            LayerDeepLift): one array of the layer's shape is returned.
        return_convergence_delta : also return delta (N,) or (N, K): the sum of attributions
            minus f(x)_t - f(x0)_t (~0 for DeepLIFT; the completeness residual for
            integrated gradients; None for gradient methods).
        batch_size : explain this many samples per pass (memory); progress shows a bar.
        n_steps, integration, internal_batch_size : integrated gradients' quadrature and the
            most rows one of its forward passes may take.
        abs : saliency only: return |gradient| (Simonyan et al. 2013), as Captum's default.
        """
        method = self.method
        out = self._output_for_call(output)
        xs, refs, kind = self.prepare_inputs(inputs, baselines, method.uses_reference,
                                       distribution=method.name == "deeplift_shap")
        if layer is not None:
            layer = self._check_output(layer)
            if layer in self.input_names and len(self.attributed) == len(self.input_names):
                layer = None
        n = xs[0].shape[0]
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        if method.name == "integrated_gradients":
            alphas, weights = integration_points(n_steps, integration)
            if internal_batch_size is not None and (not isinstance(internal_batch_size, int)
                                                    or internal_batch_size < 1):
                raise InputError(f"internal_batch_size must be a positive int, got {internal_batch_size!r}")
            quadrature = (alphas, weights, internal_batch_size)
        else:
            quadrature = None
        if isinstance(target, (Sequence, np.ndarray)) and not isinstance(target, (str, tuple)):
            target = np.asarray(target)
            if target.ndim not in (1, 2) or (target.ndim == 1 and target.shape[0] != n):
                raise InputError(f"a sequence target needs one int per sample ({n}), got shape {target.shape}")
        step = batch_size or n
        chunks = range(0, n, step)
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, total=len(chunks), desc=f"liftir {method.name}", unit="batch")
        if method.name == "deeplift_shap":  # chunk (N, B, ...) references with their samples
            per_sample_refs = refs[0].ndim == xs[0].ndim + 1
        else:
            per_sample_refs = refs is not None and refs[0].shape[0] == n and n > 1
        parts, delta_parts = [], []
        for start in chunks:
            sl = slice(start, start + step)
            sub_target = target[sl] if isinstance(target, np.ndarray) and target.shape[0] == n else target
            sub_refs = None if refs is None else [r[sl] if per_sample_refs else r for r in refs]
            a, d = self._attribute_batch([x[sl] for x in xs], sub_refs, sub_target, out, layer, quadrature)
            parts.append(a)
            delta_parts.append(d)
        attrs = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        if abs:
            if method.name != "saliency":
                raise InputError(f"abs=True is an option of method 'saliency', not {method.name!r}")
            attrs = [np.abs(a) for a in attrs]
        if layer is not None:
            result = attrs[0]
        elif len(self.attributed) != len(self.input_names) or self.plan.embeddings:
            result = dict(zip(self.attributed, attrs))  # integer inputs: by attributed tensor
        else:
            result = self._pack(attrs, kind)
        if return_convergence_delta:
            delta = None if delta_parts[0] is None else np.concatenate(delta_parts)
            return result, delta
        return result

    def _forward(self, xs, refs, tensor: str) -> scheduler.Run:
        """One batched forward over [actual; reference] rows, up to `tensor`."""
        xp = self.xp
        n = xs[0].shape[0]
        r = 0 if refs is None else refs[0].shape[0]
        feeds = {}
        for name, x, ref in zip(self.input_names, xs, refs or [None] * len(xs)):
            feeds[name] = xp.asarray(x if ref is None else np.concatenate([x, ref]))
        return scheduler.forward(self.plan, xp, feeds, n, r, (tensor,), self.method.mode, self.options)

    def _targets_chunk(self, k: int, rows_per_target: int, run) -> int:
        """How many targets to push through one backward pass (bounds memory)."""
        per_row = max(int(np.prod(v.shape[1:])) for v in run.values.values())
        budget = 2 ** 25  # elements of the largest multiplier array: 128 MB in float32
        return max(1, min(k, budget // max(1, per_row * rows_per_target)))

    def _attribute_batch(self, xs, refs, target, output: str, layer: str | None = None, quadrature=None):
        if quadrature is not None:
            return self._integrated_gradients_batch(xs, refs, target, output, layer, quadrature)
        xp = self.xp
        n = xs[0].shape[0]
        method = self.method
        explained, stripped = self.explained_tensor(output)
        pairs = 1
        if method.name == "deeplift_shap":
            own = refs[0].ndim == xs[0].ndim + 1  # (n, B, ...): already in pair order once flattened
            pairs = refs[0].shape[1] if own else refs[0].shape[0]
            if own:
                refs = [r.reshape((-1,) + r.shape[2:]) for r in refs]
            run = scheduler.PairedRun(self._forward(xs, refs, explained), pairs, tile_references=not own)
        else:
            run = self._forward(xs, refs, explained)
        value = run.device(explained)
        _require_samples_first(run, explained)
        axis = self._softmax_axis(output) if stripped else -1
        seed = self._seed((n,) + tuple(value.shape[1:]), target, stripped, axis)  # (K, n, ...)
        if pairs > 1:
            seed = np.repeat(seed, pairs, axis=1)
        wrt = (layer,) if layer else tuple(self.attributed)
        k = seed.shape[0]
        chunk = self._targets_chunk(k, run.n_actual, run)
        pieces = {w: [] for w in wrt}
        spread, node_backward = None, None
        if method.name == "deeplift_revealcancel":
            spread = revealcancel.split_forward(run, self.plan.order_for((explained,)), tuple(self.attributed))
            node_backward = revealcancel.node_backward(spread)
        for start in range(0, k, chunk):
            part = seed[start:start + chunk]
            if spread is not None:  # multipliers of d+ and d- travel stacked
                part = np.concatenate([part, part])
            seed_dev = xp.asarray(part.astype(value.dtype))
            grads = scheduler.backward(run, {explained: seed_dev}, wrt, (explained,), node_backward=node_backward)
            for w in wrt:
                if spread is not None:
                    pieces[w].append(self._finish_split(run, w, grads[w], spread, part.shape[0] // 2))
                else:
                    pieces[w].append(self._finish(run, w, grads[w], seed_dev.shape[0]))
        attributions = []
        for w in wrt:
            a = np.concatenate(pieces[w])  # (K, P, ...)
            if pairs > 1:
                a = a.reshape((k, n, pairs) + a.shape[2:]).mean(axis=2)
            attributions.append(a)
        delta = None
        if method.uses_reference:
            f_act = self._selected(seed, run.actual(explained))
            f_ref = self._selected(seed, run.reference(explained))
            total = sum(a.astype(np.float64).reshape(k, a.shape[1], -1).sum(axis=2) for a in attributions)
            diff = f_act - f_ref
            if pairs > 1:
                diff = diff.reshape(k, n, pairs).mean(axis=2)
            delta = (total - diff).T  # (n, K)
        return self._per_target(attributions, delta, target)

    @staticmethod
    def _per_target(attributions, delta, target):
        """(K, N, ...) results as (N, K, ...) for several targets, (N, ...) for one."""
        k = attributions[0].shape[0]
        if k > 1 or isinstance(target, str) or (isinstance(target, np.ndarray) and target.ndim == 2):
            return [np.moveaxis(a, 0, 1) for a in attributions], delta
        return [a[0] for a in attributions], None if delta is None else delta[:, 0]

    def _finish(self, run, tensor: str, m, k: int) -> np.ndarray:
        """Multipliers (K, P, ...) of `tensor` turned into the method's attributions, on the host,
        with the samples first (a layer whose batch the exporter moved: each sample's own slice)."""
        dtype = run.device(tensor).dtype
        if m is None:
            m = self.xp.zeros((k,) + run.actual_shape(tensor), dtype=dtype)
        elif self.method.attribution == "delta":
            m = m * (run.actual(tensor) - run.reference(tensor))
        elif self.method.attribution == "input":
            m = m * run.actual(tensor)
        if tensor in run.values:
            m = samples_first(self.xp, m, run.loc(tensor), lead=1)
        return to_host(m).astype(dtype, copy=False)

    def _finish_split(self, run, tensor: str, m, spread, k: int) -> np.ndarray:
        """RevealCancel: m+ d+ + m- d- with d+- = (d +- D) / 2."""
        if m is None:
            return self._finish(run, tensor, None, k)
        delta = run.actual(tensor) - run.reference(tensor)
        pos, neg = (delta + spread[tensor]) * 0.5, (delta - spread[tensor]) * 0.5
        a = m[:k] * pos + m[k:] * neg
        if tensor in run.values:
            a = samples_first(self.xp, a, run.loc(tensor), lead=1)
        return to_host(a).astype(run.device(tensor).dtype, copy=False)

    @staticmethod
    def _selected(seed: np.ndarray, value) -> np.ndarray:
        """sum over output neurons of seed * value: the explained scalar, (K, rows)."""
        value = to_host(value).astype(np.float64)
        value = np.broadcast_to(value, seed.shape[1:])
        return (seed * value[None]).reshape(seed.shape[0], seed.shape[1], -1).sum(axis=2)

    def _integrated_gradients_batch(self, xs, refs, target, output, layer, quadrature):
        """Gradients at points x0 + alpha (x - x0), weighted and multiplied by x - x0."""
        if layer is not None:
            raise InputError("layer attribution is not available for integrated_gradients")
        alphas, weights, max_rows = quadrature
        xp = self.xp
        n = xs[0].shape[0]
        explained, stripped = self.explained_tensor(output)
        axis = self._softmax_axis(output) if stripped else -1
        steps_per_pass = len(alphas) if max_rows is None else max(1, max_rows // n)
        averaged: list = [None] * len(xs)  # weighted sums of gradients, (K, n, ...) per input
        seed = None
        for start in range(0, len(alphas), steps_per_pass):
            a = alphas[start:start + steps_per_pass]
            w = weights[start:start + steps_per_pass]
            points = [(r[None] + a.reshape((-1,) + (1,) * x.ndim) * (x - r)[None]).reshape((-1,) + x.shape[1:])
                      .astype(x.dtype) for x, r in zip(xs, refs)]  # (S*n, ...) alpha-major
            run = self._forward(points, None, explained)
            value = run.device(explained)
            _require_samples_first(run, explained)
            if seed is None:
                seed = self._seed((n,) + tuple(value.shape[1:]), target, stripped, axis)
            k = seed.shape[0]
            seed_rows = np.tile(seed, (1, len(a)) + (1,) * (seed.ndim - 2))
            grads = scheduler.backward(run, {explained: xp.asarray(seed_rows.astype(value.dtype))},
                                       tuple(self.input_names), (explained,))
            for i, name in enumerate(self.input_names):
                if grads[name] is None:
                    continue
                g = to_host(grads[name]).astype(np.float64).reshape((k, len(a), n) + xs[i].shape[1:])
                part = np.tensordot(w, g, axes=([0], [1]))  # (k, n, ...)
                averaged[i] = part if averaged[i] is None else averaged[i] + part
        k = seed.shape[0]
        attributions = [(np.zeros((k,) + x.shape) if avg is None else avg * (x - r).astype(np.float64)[None])
                        .astype(x.dtype) for x, r, avg in zip(xs, refs, averaged)]
        ends = self._forward(xs, refs, explained)  # f(x) and f(x0), for the completeness residual
        f_act = self._selected(seed, ends.actual(explained))
        f_ref = self._selected(seed, ends.reference(explained))
        summed = sum(a.astype(np.float64).reshape(k, n, -1).sum(axis=2) for a in attributions)
        return self._per_target(attributions, (summed - (f_act - f_ref)).T, target)

    def _softmax_axis(self, output: str) -> int:
        node = self._final_activation(output)
        if node is None or node.op_type == "Sigmoid":
            return -1
        return int(node.attrs.get("axis", -1 if node.opset >= 13 else 1))

def _require_samples_first(run, tensor: str) -> None:
    """Targets index an explained tensor (N, ...): its samples must be on axis 0, alone."""
    loc = run.loc(tensor)
    if tensor in run.values and not (loc.axis == 0 and loc.plain):
        raise BatchAxisError(f"the explained tensor {tensor!r} (shape {tuple(run.device(tensor).shape)}) holds "
                             f"the samples on axis {loc.axis}" + ("" if loc.plain else " merged with other axes")
                             + "; explain a tensor with the samples on axis 0 (output=...)")


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape) + ")"

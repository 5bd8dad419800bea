"""The public entry point: `Explainer(model, method=...).attribute(inputs, baselines, target)`.

This module runs a call: it cuts the work into passes, each a forward over the stacked
batch [actual; reference] and a backward from the targets' seed, and turns multipliers into
attributions and convergence deltas as the method (liftir/methods.py) says. What users pass
is validated before: inputs and baselines in liftir/inputs.py, outputs and targets in
liftir/targets.py.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import diagnostics, revealcancel, scheduler, targets
from .backend import array_module, to_host
from .batch_axis import samples_first
from .cut import cut_at
from .errors import BatchAxisError, InputError, ModelLoadError, RuleError
from .folding import fold_constants
from .fusion import fuse_gelu
from .pruning import prune_unread_positions
from .layout import batch_first
from .graph import Graph, build_graph, promote_to_float64, read_model
from .inputs import Batch, model_inputs, pack, prepare, stack
from .memory import DEFAULT_MAX_MEMORY, PassSize, RowCost, parse_memory, plan_pass
from .methods import (Attribution, Engine, FinalActivation, MaxRule, Method, Passes, Precision, Reference,
                      get_method, integration_points, methods_where)
from .registry import check_overrides
from .rule import difference
from .progress import Progress
from .training_mode import refuse_training_mode
from .compile.engine import CompiledEngine

logger = logging.getLogger("liftir")


class Explainer:
    """Attributions for an ONNX model.

    Parameters
    ----------
    model : path, bytes, onnx.ModelProto or "example:NAME"
        The model. It is parsed and checked, never executed as code. A model in memory
        must embed its tensors; from a path, external data is read from its folder only.
    method : str or liftir.methods.Method
        One of `liftir.methods.METHODS` (README, table under "Use it from Python"):
        "deeplift" (default, Rescale rule), "deeplift_revealcancel", "deeplift_shap",
        "integrated_gradients", "saliency", "input_x_gradient", "guided_backprop",
        "deconvnet".
    backend : "numpy" (default), "cupy" or "auto".
    max_rule : "cross_max" (default) or "paper"
        DeepLIFT rule for MaxPool/GlobalMaxPool/ReduceMax; see README, "The rules, and
        where they differ from other tools" (Max, 2.3.2).
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
    engine : "interpreter" (default) or "compiled"
        "compiled" records each pass (forward and multipliers) as one ONNX graph run by one
        onnxruntime session, cached per input shapes and number of targets (liftir/compile);
        what does not compile runs on the interpreter, said in a log line. On several CPU
        threads (LIFTIR_NUM_THREADS, else the process's cores) a pass runs as one group of
        rows per thread at once. README, "The compiled engine".
    prune : bool, default True
        Compute only the positions of intermediate tensors that the output reads: a class
        token's or a last token's selection moves above the per-position layers before it
        (liftir/pruning.py), which then run on that token alone. The shortened tensors
        cannot be named as `layer`, `output` or target tensor; False keeps every tensor whole.

    Memory: `attribute` cuts its work into passes under `max_memory` (default 1 GiB);
    see its docstring and README, "Memory". After a call, `last_pass`
    (`liftir.memory.PassSize`) says how: rows and targets per pass, how many passes.

    Options are given as strings or as the enums of `liftir.methods` (`MaxRule`, ...),
    parsed here once; a bad value is an InputError listing the choices. One pass at a time:
    `batch` (inputs validated once), `forward` and `backward`, what `liftir check`, the CLI
    and `liftir.testing` run.
    """

    def __init__(self, model: Any, method: str | Method = "deeplift", *, backend: str = "numpy",
                 max_rule: str | MaxRule = "cross_max", final_activation: str | FinalActivation = "strip",
                 rules: Mapping | None = None, output: str | None = None, precision: str | Precision = "model",
                 engine: str | Engine = "interpreter", prune: bool = True):
        self.method: Method = get_method(method)
        # every option parsed once, here: the rest of liftir reads the enums
        self.engine = Engine.parse(engine, "engine")
        self.max_rule = MaxRule.parse(max_rule, "max_rule")
        self.final_activation = FinalActivation.parse(final_activation, "final_activation")
        self.precision = Precision.parse(precision, "precision")
        self.xp = array_module(backend)
        self.model = read_model(model)
        rules = check_overrides(rules)  # before function expansion asks them for their ops
        self.graph: Graph = build_graph(self.model, rules)
        fold_constants(self.graph)
        refuse_training_mode(self.graph)
        batch_first(self.graph)
        if prune:  # after batch_first, whose patterns are the exporters' node chains
            prune_unread_positions(self.graph, rules, keep={output} if output else set())
        if self.precision is Precision.FLOAT64:
            promote_to_float64(self.graph)
        else:
            fuse_gelu(self.graph, rules)
        #: what rules read of the options (`ctx.options`)
        self.options = {"max_rule": self.max_rule, "final_activation": self.final_activation}
        self.rule_overrides = rules
        self.inputs = model_inputs(self.graph)
        held = tuple(i.name for i in self.inputs if i.dtype.kind != "f")
        self.plan = scheduler.Plan(self.graph, self.method.mode, self.method.name, rules, integer_inputs=held)
        #: what attributions are returned for: the float inputs, then the float tensors computed
        #: directly from integer inputs (embedding lookups, casts of masks; liftir/held.py)
        self.attributed: list[str] = [i.name for i in self.inputs if i.dtype.kind == "f"] + self.plan.embeddings
        #: integrated gradients of a model with integer inputs walks its path at the embeddings
        #: of the ids whose reference differs: an Explainer of the model cut there
        #: (liftir/cut.py), one per set of cut tensors, as LayerIntegratedGradients does
        self._cuts: dict[tuple[str, ...], Explainer] = {}
        #: set on those cut Explainers: their integer inputs stay at their actual values
        self._path_holds_integers = False
        self._build_options = dict(backend=backend, max_rule=self.max_rule, final_activation=self.final_activation,
                                   rules=rules, output=output, precision=self.precision, engine=self.engine,
                                   prune=prune)
        if not self.attributed:
            raise ModelLoadError("the model computes no float tensor from its inputs: nothing to attribute to")
        self.output = self._check_output(output) if output else self._default_output()
        # every unsupported op on the way to what will be explained, all at once, up front
        self.plan.require(self._explained_outputs())
        self._row_costs: dict[tuple, tuple[RowCost, tuple[int, ...]]] = {}
        self._explained_dtypes: dict[str, np.dtype] = {}
        #: how the last `attribute` call was cut into passes (rows and targets per pass)
        self.last_pass: PassSize | None = None
        self._probe()
        #: compiled passes (liftir/compile), None for the interpreter
        self._compiled = CompiledEngine(self) if self.engine is Engine.COMPILED else None
        #: per pass shapes: the forward tensors the interpreter's pass exposes (None: all)
        self._exposures: dict[tuple, frozenset[str] | None] = {}
        self._expose_all = False

    def _probe(self) -> None:
        """Forward one actual and one reference row of zeros now, so that an op mixing samples
        (BatchAxisError) or one a rule refuses in its forward (division by an activation) is
        reported when the Explainer is built, by node name. Symbolic non-batch dimensions (a
        sequence length) get 3; if the probe fails for any other reason (a batch size frozen
        into the graph, a size the model does not take) the first call reports it instead."""
        guessed = False
        zeros = []
        for info in self.inputs:
            if info.shape is None or (isinstance(info.shape[0], int) and info.shape[0] > 0):
                return  # unknown rank or a fixed batch size: nothing to probe with
            dims = []
            for d in info.shape[1:]:
                known = isinstance(d, int) and d > 0
                guessed |= not known
                dims.append(d if known else 3)
            zeros.append(np.zeros([1] + dims, dtype=info.dtype))
        try:  # the rules' forwards, which hold their refusals
            self._forward(zeros, zeros, self._explained_outputs(), onnxruntime=False)
        except BatchAxisError:
            raise
        except RuleError:
            if not guessed:
                raise
        except Exception:  # noqa: BLE001 - a probe, not the user's call
            pass

    # ---- model inspection ------------------------------------------------------------------
    def _explained_outputs(self) -> tuple[str, ...]:
        """The Explainer's output; with several outputs and none chosen, the float ones
        (integer label heads are not explained)."""
        return (self.output,) if self.output else tuple(
            o.name for o in self.graph.outputs if o.dtype is None or o.dtype.kind == "f")

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
        if name in self.graph.pruned_tensors:
            raise InputError(f"tensor {name!r} is computed only at the positions {self.graph.pruned_tensors[name]!r} "
                             f"reads (liftir/pruning.py): build the Explainer with prune=False to name it")
        if name in self.graph.fused_tensors:
            raise InputError(f"tensor {name!r} lies inside {self.graph.fused_tensors[name]!r}, an exported GELU that "
                             f"liftir explains as one op (liftir/fusion.py): name its input or its output, or use "
                             f"precision='float64', which keeps the model's nodes as written")
        if name not in self.graph.tensor_names():
            known = sorted(self.graph.producer)[:20]
            raise InputError(f"no tensor named {name!r} in the model; tensors include: {', '.join(known)}")
        if name in self.graph.constants:
            raise InputError(f"tensor {name!r} is a constant of the model; it has no attribution")
        return name

    def _check_layer(self, name: str) -> str:
        """A tensor that can carry attributions: one that moves with the inputs' values."""
        name = self._check_output(name)
        producer = self.graph.producer.get(name)
        if producer is not None and producer in self.plan.static:
            node = self.graph.nodes[producer]
            raise InputError(f"layer {name!r} is computed from the model's constants and shapes only (node "
                             f"{producer!r}, {node.op_type}): it does not depend on the inputs' values, so it has "
                             f"no attributions; name an activation")
        info = self.graph.tensor_info(name)
        if info is not None and info.dtype is not None and np.dtype(info.dtype).kind not in "fc":
            raise InputError(f"layer {name!r} is a tensor of {np.dtype(info.dtype)}: attributions are for "
                             f"floating-point tensors (integer ones, such as token ids, are held as given); name "
                             f"the float tensor computed from it, e.g. an embedding's output")
        return name

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def prepare_inputs(self, inputs, baselines, need_reference: bool, distribution: bool = False) -> Batch:
        """Validated inputs and baselines as lists of NumPy arrays in model-input order.

        Returns a `liftir.inputs.Batch` (inputs, baselines or None, how to pack results like
        `inputs`), which `forward` takes as it is; every problem is an InputError naming the
        input (liftir/inputs.py).
        """
        return prepare(self.inputs, inputs, baselines, need_reference, distribution, self.plan.own_references)

    def batch(self, inputs, baselines=None) -> Batch:
        """`inputs` and `baselines` validated once, as `attribute` validates them for this
        method, for several calls: `attribute`, `forward` and `predict` take the Batch as it
        is (the CLI validates its files this way, once)."""
        return self.prepare_inputs(inputs, baselines, self.method.uses_reference,
                                   self.method.reference is Reference.DISTRIBUTION)

    def _batch(self, inputs, baselines, need_reference: bool, distribution: bool = False) -> Batch:
        """`inputs` validated; a Batch already is, and is taken as it is."""
        if not isinstance(inputs, Batch):
            return self.prepare_inputs(inputs, baselines, need_reference, distribution)
        if baselines is not None:
            raise InputError("a Batch holds its baselines: pass them to Explainer.batch (or prepare_inputs)")
        if need_reference and inputs.baselines is None:
            raise InputError(f"method {self.method.name!r} needs reference rows: make the Batch with "
                             f"Explainer.batch, not without baselines")
        return inputs if need_reference else inputs.actual()

    def explained_tensor(self, output: str) -> tuple[str, str | None]:
        """(tensor whose value is explained, final op stripped or None): liftir/targets.py."""
        return targets.explained_tensor(self.graph, output, self.final_activation)

    # ---- the run API: one forward and one backward pass, as `attribute` runs them ---------------
    def forward(self, inputs, baselines=None, *, outputs: str | Sequence[str] | None = None,
                reference: bool | None = None, onnxruntime: bool = True) -> scheduler.Run:
        """One forward pass over the stacked batch [actual rows; reference rows].

        What `liftir check`, the CLI and `liftir.testing` run (and `attribute` inside its
        passes), so that none of them stacks inputs or calls the scheduler itself.

        Parameters
        ----------
        inputs : as for `attribute`, or a `liftir.inputs.Batch` (`batch`, `prepare_inputs`):
            already validated, it is not validated again.
        baselines : as for `attribute` (default zeros); ignored without reference rows.
        outputs : tensor name(s) to compute; default the Explainer's output, or every float
            output when it has several and none was chosen.
        reference : run reference rows (`baselines`, or the Batch's); default: when the method
            compares against a reference.
        onnxruntime : False runs every rule's own forward, never one onnxruntime session
            (what is compared with onnxruntime, and where rules refuse what they cannot do).

        Returns
        -------
        liftir.scheduler.Run : the activations: ``run.actual(name)``, ``run.reference(name)``
        (None without reference rows), ``run.loc(name)`` (where the samples are), for `backward`.
        """
        batch = self._batch(inputs, baselines, self.method.uses_reference if reference is None else reference)
        if outputs is None:
            outputs = self._explained_outputs()
        else:
            outputs = tuple(self._check_output(o) for o in ((outputs,) if isinstance(outputs, str) else outputs))
        return self._forward(batch.inputs, batch.baselines, outputs, onnxruntime)

    def backward(self, run: scheduler.Run, seeds: Mapping[str, Any], wrt: str | Sequence[str] | None = None, *,
                 observer: Callable | None = None) -> dict[str, Any]:
        """Multipliers from `seeds` back to `wrt`, each rule's own backward in the method's mode.

        Parameters
        ----------
        run : a `forward` of this Explainer.
        seeds : the multipliers (K, P, ...) of explained tensors, by name (K targets, P actual rows).
        wrt : tensor name(s) to return multipliers of; default what `attribute` attributes to
            (the float inputs, and the embeddings of integer ones).
        observer : ``f(node, ctx, grad_outs, grad_ins)`` sees every node's multipliers
            (`liftir check` tests each rule's local summation-to-delta with it).

        Returns {name: (K, P, ...) multipliers on the array backend, or None where none arrive}.
        RevealCancel's split is `attribute`'s; here every rule runs its Rescale-family backward.
        """
        seeds = {name: self.xp.asarray(seed) for name, seed in seeds.items()}
        wrt = tuple(self.attributed if wrt is None else (wrt,) if isinstance(wrt, str) else wrt)
        return scheduler.backward(run, seeds, wrt, tuple(seeds), observer=observer)

    def predict(self, inputs, output: str | None = None):
        """The value of `output` (default: the explained output) for `inputs`, as NumPy.

        Computed by the rules' own forwards (the interpreter), never by onnxruntime, so that
        comparing it with onnxruntime tests liftir.
        """
        batch = self._batch(inputs, None, need_reference=False)
        out = self._output_for_call(output)
        return to_host(self.forward(batch, outputs=out, reference=False, onnxruntime=False).device(out))

    def attribute(self, inputs, baselines=None, target=None, *, output: str | None = None,
                  layer: str | None = None, return_convergence_delta: bool = False,
                  batch_size: int | None = None, max_memory: int | str | None = DEFAULT_MAX_MEMORY,
                  multiply_by_inputs: bool = True, attribution_func: Callable | None = None,
                  progress: bool = False, n_steps: int = 50, integration: str = "gausslegendre",
                  internal_batch_size: int | None = None,
                  abs: bool = False):  # noqa: A002 - Captum's Saliency names it so
        """Attributions of the target output to each input feature, shaped like `inputs`.

        Parameters
        ----------
        inputs : array (N, ...), or a tuple / dict (by input name) for several inputs, or a
            `liftir.inputs.Batch` from `batch` (validated once, with its baselines).
        baselines : the reference input(s): same container, each (N, ...), (1, ...), (...)
            or a scalar; default zeros. For "deeplift_shap": a distribution (B, ...) shared by
            the batch, or (N, B, ...) with each sample's own references.
        target : int (index into axis 1 of an (N, C) output), a sequence of N ints, a tuple
            over all non-batch axes, None for one number per sample, or several at once:
            "all" or an (N, K) / (1, K) int array, giving results of shape (N, K, ...).
            Indices count from 0; negative ones are refused (InputError naming the index).
        output : tensor to explain (any tensor of the graph); default: the Explainer's.
        layer : attribute to this hidden tensor instead of the inputs (like Captum's
            LayerDeepLift): one array of the layer's shape is returned. Integrated gradients
            then walks its path at the layer, the inputs held at their actual values
            (Captum's LayerIntegratedGradients).
        return_convergence_delta : also return delta (N,) or (N, K): the sum of attributions
            minus f(x)_t - f(x0)_t (~0 for DeepLIFT; the completeness residual for
            integrated gradients; None for gradient methods). It always refers to the
            attributions m * (x - x0), whatever `multiply_by_inputs` and `attribution_func`.
        batch_size : at most this many samples per pass.
        max_memory : the budget of one pass, in bytes or as a string ("2GiB", "512MB");
            default 1 GiB (`liftir.memory.DEFAULT_MAX_MEMORY`); None for no bound (one pass).
            Samples (DeepLIFT-SHAP: sample-reference pairs; integrated gradients: points
            of the path) and targets per pass are chosen so that the pass's estimated
            memory (activations kept for the backward, multipliers of every target in
            flight, measured on a one-row forward) stays under it; `last_pass` records the
            choice. Results do not depend on it. Below one row and one target, liftir runs
            one of each and warns (`liftir.memory.MemoryBudgetWarning`).
        multiply_by_inputs : False returns the multipliers instead of the attributions
            (Captum's name): DeepLIFT's m with m * (x - x0) the attribution (DeepLIFT-SHAP:
            their mean over the references), the path-averaged gradient for integrated
            gradients, the gradient for input_x_gradient. Not defined for RevealCancel,
            which keeps separate multipliers for positive and negative differences.
        attribution_func : deeplift and deeplift_shap only: ``f(m, x, x0)`` turns the
            multipliers m (K, P, ...) of each input and its actual and reference values
            (P, ...) into what is returned instead of m * (x - x0), for every pair of sample
            and reference (then averaged over references, as DeepLIFT-SHAP averages).
            Array-module code (NumPy or CuPy arrays come in). Used by
            `liftir.genomics.hypothetical_contributions`.
        progress : show a bar on stderr counting samples (integrated gradients: sample-steps;
            DeepLIFT-SHAP: sample-reference pairs), once a run has lasted a second and only
            when stderr is a terminal.
        n_steps, integration, internal_batch_size : integrated gradients' quadrature and the
            most rows one of its forward passes may take.
        abs : saliency only: return |gradient| (Simonyan et al. 2013), as Captum's default.
        """
        if self.method.passes is Passes.PATH and not self._path_holds_integers and (
                layer is not None or self.plan.embeddings):
            return self._attribute_on_a_cut(
                inputs, baselines, target, output=output, layer=layer,
                return_convergence_delta=return_convergence_delta, batch_size=batch_size,
                max_memory=max_memory, multiply_by_inputs=multiply_by_inputs, progress=progress,
                n_steps=n_steps, integration=integration, internal_batch_size=internal_batch_size)
        method = self.method
        out = self._output_for_call(output)
        xs, refs, kind = self._batch(inputs, baselines, method.uses_reference,
                                     distribution=method.reference is Reference.DISTRIBUTION)
        if layer is not None:
            layer = self._check_layer(layer)
            if layer in self.input_names and len(self.attributed) == len(self.input_names):
                layer = None
        n = xs[0].shape[0]
        _check_batch_size(batch_size)
        budget = parse_memory(max_memory)
        self._check_attribution_options(multiply_by_inputs, attribution_func, abs)
        quadrature = None
        if method.passes is Passes.PATH:
            alphas, weights = integration_points(n_steps, integration)
            if internal_batch_size is not None and (not isinstance(internal_batch_size, int)
                                                    or internal_batch_size < 1):
                raise InputError(f"internal_batch_size must be a positive int, got {internal_batch_size!r}")
            quadrature = (alphas, weights, internal_batch_size)
        call, cost = self._call(out, xs, target, wrt=(layer,) if layer else tuple(self._wrt()),
                                multiply=multiply_by_inputs, func=attribution_func, progress=progress)
        target = call.target
        cap = min(n, batch_size or n)
        if method.passes is Passes.PAIRS:
            attrs, delta = self._exposing(self._run_pairs, call, xs, refs, cost, budget, cap)
        elif method.passes is Passes.PATH:
            attrs, delta = self._exposing(self._run_path, call, xs, refs, cost, budget, cap, quadrature)
        else:
            attrs, delta = self._exposing(self._run_samples, call, xs, refs, cost, budget, cap)
        attrs, delta = self._per_target(attrs, delta, target)
        if abs:
            attrs = [np.abs(a) for a in attrs]
        if layer is not None:
            result = attrs[0]
        elif len(self.attributed) != len(self.input_names) or self.plan.embeddings:
            result = dict(zip(call.wrt, attrs))  # integer inputs: by attributed tensor
        else:
            result = pack(attrs, kind)
        diagnostics.warn_if_not_conserving(self, xs, refs, attrs, delta, output=out, layer=layer)
        if return_convergence_delta:
            return result, delta
        return result

    def _attribute_on_a_cut(self, inputs, baselines, target, *, layer, return_convergence_delta, **options):
        """Integrated gradients walking its path at hidden tensors: the model cut there.

        With `layer`: along the path between the layer's values for the reference and the
        actual inputs, every input held at its actual value (Captum's
        LayerIntegratedGradients). Else, for a model with integer inputs (ids have no path
        between them): between the embeddings of the ids whose reference differs, the
        other float inputs on their own paths, integer ones held at their actual values
        (LayerIntegratedGradients on those embeddings)."""
        xs, refs, _ = self._batch(inputs, baselines, need_reference=True)
        given = dict(zip(self.input_names, xs))
        given_refs = dict(zip(self.input_names, refs))
        if layer is not None:
            cut = (self._check_layer(layer),)
            if cut[0] in given:
                raise InputError(f"layer {layer!r} is an input of the model: attribute to it without layer=")
            given_refs = dict(given)  # every input held at its actual value
        else:
            moving = {i.name for i in self.inputs if i.dtype.kind != "f" and not np.array_equal(
                np.broadcast_to(given_refs[i.name], given[i.name].shape), given[i.name])}
            cut = tuple(e for e in self.plan.embeddings if moving & self._integer_sources(e))
        if cut not in self._cuts:
            inner = Explainer(cut_at(self.model, list(cut)), self.method, **self._build_options)
            inner._path_holds_integers = True
            self._cuts[cut] = inner
        inner = self._cuts[cut]
        actual, reference = self._values(xs, cut), self._values(refs, cut)
        feeds = {name: actual[name] if name in actual else given[name] for name in inner.input_names}
        floats = [i.name for i in inner.inputs if i.dtype.kind == "f"]
        base = {name: reference[name] if name in reference else given_refs[name] for name in floats}
        result, delta = inner.attribute(feeds, base, target, return_convergence_delta=True, **options)
        if not isinstance(result, Mapping):
            result = dict(zip(floats, result if isinstance(result, tuple) else (result,)))
        if layer is not None:
            result = result[cut[0]]
        else:
            zeros = self._values(xs, [e for e in self.attributed if e not in result and e not in given])
            result = {name: result[name] if name in result else np.zeros_like(zeros.get(name, given.get(name)))
                      for name in self.attributed}
        return (result, delta) if return_convergence_delta else result

    def _integer_sources(self, tensor: str) -> set[str]:
        """The integer inputs whose values `tensor` is computed from (a Shape reads none)."""
        integers = {i.name for i in self.inputs if i.dtype.kind != "f"}
        found, seen, stack = set(), set(), [tensor]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in integers:
                found.add(name)
            producer = self.graph.producer.get(name)
            if producer is not None and self.graph.nodes[producer].op_type not in ("Shape", "Size"):
                stack.extend(i for i in self.graph.nodes[producer].inputs if i)
        return found

    def _values(self, xs, names: list[str]) -> dict[str, np.ndarray]:
        """The tensors `names` for the rows `xs`, as NumPy (the rules' forwards)."""
        run = self._forward(xs, None, tuple(names), onnxruntime=False)
        for name in names:
            loc = run.loc(name)
            if not (loc.axis == 0 and loc.plain):
                raise BatchAxisError(f"integrated gradients cannot walk its path at {name!r}: the exporter "
                                     f"put its samples on axis {loc.axis}" + ("" if loc.plain else " merged with "
                                     "other axes") + "; name a tensor with the samples on axis 0")
        return {name: to_host(run.device(name)) for name in names}

    def _wrt(self) -> list[str]:
        """What a call attributes to: integrated gradients on a path that holds the integer
        inputs moves no embedding of theirs, so it attributes to the float inputs only."""
        if self._path_holds_integers:
            return [i.name for i in self.inputs if i.dtype.kind == "f"]
        return self.attributed

    def compile(self, path=None, *, batch_size: int = 1, target=None, output: str | None = None,
                shapes: dict | None = None):
        """The explainer as a standalone ONNX model (onnx.ModelProto), also written to `path`.

        It runs in any onnxruntime (or other ONNX runtime) without liftir: inputs are the
        model's inputs with the batch fixed to `batch_size` and, for reference methods, one
        baseline row per input (`NAME_baseline`); outputs `NAME_attribution` per input (what
        `attribute(x, baselines, target)` returns) and, for DeepLIFT, `delta`. `target` is
        fixed in the model (any form `attribute` takes, for batches of `batch_size`).
        `shapes` gives inputs' per-sample shapes the model leaves open ({"input_ids": (128,)}).
        Integer inputs (token ids, masks) are held as `attribute` holds them: their baselines
        come one row per sample (pad ids; a mask's own values), and the attributions are
        those of the embeddings (`NAME_attribution` for each of `self.attributed`).
        README, "The compiled engine".
        """
        from .compile.export import export  # noqa: PLC0415 - onnx graph building, on demand

        model = export(self, batch_size, target, output, shapes)
        if path is not None:
            import onnx  # noqa: PLC0415

            onnx.save(model, str(path))
        return model

    def pair_multipliers(self, inputs, references, target=None, *, output: str | None = None,
                         batch_size: int | None = None,
                         max_memory: int | str | None = DEFAULT_MAX_MEMORY, progress: bool = False):
        """DeepLIFT multipliers of every (sample, reference) pair, before DeepLIFT-SHAP averages them.

        What TF-MoDISco's hypothetical scores need (`liftir.genome` computes them from these):
        the multipliers m of each pair, not only their mean times (x - r). The pairs run
        through the same passes as ``attribute`` with method "deeplift_shap" (one forward over
        the samples and all their references, the backward over every pair, cut under
        `max_memory` / `batch_size`), so ``mean over b of m * (x - r_b)`` is what
        ``attribute`` returns, to round-off.

        Parameters
        ----------
        inputs : as for ``attribute``: array (N, ...), tuple or dict for several inputs.
        references : each sample's own references (N, B, ...) or B shared ones (B, ...).
        target, output, batch_size, max_memory, progress : as for ``attribute``
            (batch_size caps the samples of a pass, each with all its references when they
            fit; max_memory bounds the pass's bytes; the progress bar counts pairs).

        Returns
        -------
        (multipliers, differences) : multipliers (N, B, ...) per input, packed like
        `inputs` ((N, K, B, ...) for several targets), in the model's float type;
        differences (N, B) (or (N, K, B)) float64: f(x)_t - f(r_b)_t, so that each pair's
        summation-to-delta residual is ``sum(m * (x - r_b)) - differences``.
        """
        if not self.method.rescale_multipliers:
            raise InputError(f"pair_multipliers needs method {_names(lambda m: m.rescale_multipliers, ' or ')} "
                             f"(Rescale multipliers), not {self.method.name!r}")
        out = self._output_for_call(output)
        xs, refs, kind = self._batch(inputs, references, True, distribution=True)
        n = xs[0].shape[0]
        _check_batch_size(batch_size)
        budget = parse_memory(max_memory)
        call, cost = self._call(out, xs, target, wrt=tuple(self.attributed), multiply=False, func=None,
                                progress=progress, per_pair=True)
        m, differences = self._exposing(self._run_pairs, call, xs, refs, cost, budget, min(n, batch_size or n))
        if targets.several(call.k, call.target):  # (K, N, B, ...) -> (N, K, B, ...)
            m, differences = [np.moveaxis(a, 0, 1) for a in m], np.moveaxis(differences, 0, 1)
        else:
            m, differences = [a[0] for a in m], differences[0]
        if len(self.attributed) != len(self.input_names) or self.plan.embeddings:
            return dict(zip(self.attributed, m)), differences
        return pack(m, kind), differences

    def _check_attribution_options(self, multiply_by_inputs, attribution_func, abs_) -> None:
        method, name = self.method, self.method.name
        if not isinstance(multiply_by_inputs, bool):
            raise InputError(f"multiply_by_inputs must be True or False, got {multiply_by_inputs!r}")
        if abs_ and not method.takes_abs:
            raise InputError(f"abs=True is an option of method {_names(lambda m: m.takes_abs, ' or ')}, not {name!r}")
        if not multiply_by_inputs and method.split:
            raise InputError(f"multiply_by_inputs=False is not defined for {name}: RevealCancel "
                             "keeps separate multipliers for the positive and negative parts of x - x0")
        if attribution_func is not None:
            if not method.rescale_multipliers:
                raise InputError(f"attribution_func is an option of "
                                 f"{' and '.join(methods_where(lambda m: m.rescale_multipliers))}, not {name!r}")
            if not callable(attribution_func):
                raise InputError(f"attribution_func must be callable f(m, x, x0), got {attribution_func!r}")
            if not multiply_by_inputs:
                raise InputError("pass attribution_func or multiply_by_inputs=False, not both")

    def _call(self, out: str, xs, target, *, wrt: tuple[str, ...], multiply: bool, func, progress: bool,
              per_pair: bool = False) -> tuple[_Call, RowCost]:
        """What a call explains, with its targets checked now, not after the first passes (the
        form on one row, the range on all), and the cost of a forward row."""
        n = xs[0].shape[0]
        target = targets.sequence_target(target, n)
        explained, stripped = self.explained_tensor(out)
        cost, rest = self._row_cost(xs, explained)
        call = _Call(explained=explained, stripped=stripped,
                     axis=targets.softmax_axis(self.graph, out) if stripped else -1, target=target, rest=rest,
                     k=targets.n_targets(rest, target), wrt=wrt, multiply=multiply, func=func, progress=progress,
                     per_pair=per_pair)
        targets.seed((1,) + rest, targets.rows_of(target, 0, 1, n), stripped, call.axis, slice(0, 1))
        if isinstance(target, np.ndarray) and len(rest) == 1:
            targets.check_indices(target, rest[0], "targets")
        return call, cost

    def _row_cost(self, xs, explained: str) -> tuple[RowCost, tuple[int, ...]]:
        """Bytes a forward row keeps, and the explained tensor's non-batch shape, from a
        forward of one sample as actual and reference (two rows, so that liftir/batch_axis.py can
        tell the batch axis from other axes of size 1); cached per input shapes: repeated calls
        do not forward again."""
        key = (explained, self.xp.__name__, tuple(x.shape[1:] for x in xs), tuple(x.dtype.str for x in xs))
        if key not in self._row_costs:
            one = [x[:1] for x in xs]
            try:
                run, rows = self._forward(one, one, explained), 2
            except (InputError, RuleError):  # a batch size frozen into the graph (an Expand to
                # the export's N): probe with the call's own samples, which such a model needs
                run, rows = self._forward(xs, xs, explained), 2 * xs[0].shape[0]
                key = key + (xs[0].shape[0],)
            _require_samples_first(run, explained)
            self._row_costs[key] = (RowCost.measure(run.values, rows), tuple(run.device(explained).shape[1:]))
            self._explained_dtypes[explained] = run.device(explained).dtype
        return self._row_costs[key]

    def _explained_dtype(self, call: _Call) -> np.dtype:
        """The explained tensor's dtype in this Explainer's passes (seeds take it), known
        from `_row_cost`'s probe before any pass has run."""
        return self._explained_dtypes[call.explained]

    def _passes(self, passes: list, call: _Call, size: PassSize, unit: str):
        """Record the chosen pass size (`last_pass`) and yield the passes, counting their work
        on the progress bar: each pass is (start, stop[, start, stop]) ranges whose product is
        its samples (pairs for DeepLIFT-SHAP, sample-steps for integrated gradients)."""
        self.last_pass = replace(size, unit=unit, passes=len(passes))
        work = [int(np.prod([hi - lo for lo, hi in zip(p[::2], p[1::2])])) for p in passes]
        units = {"sample": "sample", "pair": "pair", "point of the path": "step"}
        with Progress(sum(work), f"liftir {self.method.name}", units.get(unit, unit), call.progress) as bar:
            for item, done in zip(passes, work):
                yield item
                bar.update(done)

    def _feeds(self, xs, refs) -> dict:
        """The stacked batch [actual rows; reference rows] per model input."""
        return stack(self.xp, self.input_names, xs, refs)

    def _forward(self, xs, refs, outputs: str | tuple[str, ...], onnxruntime: bool = True,
                 exposed: frozenset[str] | None = None) -> scheduler.Run:
        """One batched forward over [actual; reference] rows, up to `outputs` (rule forwards
        do not depend on the mode: the run's mode is the method's, for its backward); with
        `exposed`, values of those tensors only (`scheduler.forward`)."""
        outputs = (outputs,) if isinstance(outputs, str) else outputs
        r = 0 if refs is None else refs[0].shape[0]
        return scheduler.forward(self.plan, self.xp, self._feeds(xs, refs), xs[0].shape[0], r, outputs,
                                 self.method.mode, self.options, engine="auto" if onnxruntime else "rules",
                                 exposed=exposed)

    def _pass_forward(self, xs, refs, call: _Call, k: int, pairs: int = 0,
                      tile_references: bool = True) -> scheduler.Run:
        """The interpreter's forward of one pass, exposing only what the pass reads.

        Which tensors those are is what the compiled engine records for the same pass
        (`compiler.forward_exposure`: the rules' own backward, traced once per pass shapes),
        so both engines give onnxruntime the same forward graph to optimize and agree bit
        for bit; where the pass cannot be traced, every tensor is exposed, as before."""
        feeds = self._feeds(xs, refs)
        n, r = xs[0].shape[0], 0 if refs is None else refs[0].shape[0]
        key = (call.explained, call.wrt, n, r, k, pairs, tile_references,
               tuple((name, v.shape, v.dtype.str) for name, v in feeds.items()))
        if self._expose_all or self.xp is not np:
            exposed = None
        elif key in self._exposures:
            exposed = self._exposures[key]
        else:
            from .compile.compiler import forward_exposure  # noqa: PLC0415 - the tracer, on demand
            split = tuple(self.attributed) if self.method.split else None
            try:
                exposed = forward_exposure(self.plan, feeds, n, r, call.explained, call.wrt, k, self.options,
                                           pairs, tile_references, split)
            except Exception:  # noqa: BLE001 - whatever the trace cannot do: every tensor, as before
                exposed = None  # (an error of the inputs or the model is the forward's to raise below)
            self._exposures[key] = exposed
        return scheduler.forward(self.plan, self.xp, feeds, n, r, (call.explained,), self.method.mode,
                                 self.options, exposed=exposed)

    def _exposing(self, run_passes, *args):
        """`run_passes(*args)`, again with every forward tensor exposed if a rule read one
        its pass's forward left out (scheduler.NotExposed: a rule whose array code reads
        more than its trace does); said once in a log line."""
        try:
            return run_passes(*args)
        except scheduler.NotExposed as exc:
            if self._expose_all:
                raise
            logger.warning("liftir: %s; this Explainer's forwards return every tensor from now on "
                           "(the same results, slower)", exc)
            self._expose_all = True
            return run_passes(*args)

    def _backward(self, run, call: _Call, seed: np.ndarray, node_backward=None):
        dtype = run.device(call.explained).dtype
        return scheduler.backward(run, {call.explained: self.xp.asarray(seed.astype(dtype, copy=False))},
                                  call.wrt, (call.explained,), node_backward=node_backward)

    def _run_samples(self, call: _Call, xs, refs, cost: RowCost, budget, cap: int):
        """Every method but DeepLIFT-SHAP and integrated gradients: passes of whole samples,
        each forwarded once and propagated back for its targets in chunks.

        Returns multipliers-turned-attributions (K, N, ...) per wrt tensor and deltas (K, N)."""
        n = xs[0].shape[0]
        revealcancel_ = self.method.split
        per_sample_refs = refs is not None and refs[0].shape[0] == n and n > 1
        size = plan_pass(budget, cost, cap, call.k, forward_rows=1 + per_sample_refs + revealcancel_,
                         fixed_rows=refs is not None and not per_sample_refs,
                         multiplier_factor=2 if revealcancel_ else 1, what="sample")
        size = replace(size, rows=_even(n, size.rows), targets=_even(call.k, size.targets))
        blocks = [(s, min(s + size.rows, n)) for s in range(0, n, size.rows)]
        pieces: dict[str, list] = {w: [] for w in call.wrt}
        deltas = []
        compiled = self._compiled if self._compiled is not None and self._compiled.why_not(call) is None else None

        def one_pass(s0, s1, threads=None, engine=compiled):
            return self._sample_pass(call, xs, refs, per_sample_refs, size, engine, s0, s1, threads)

        for s0, s1 in self._passes(blocks, call, size, "sample"):
            groups = compiled.row_groups(s0, s1, 1 if refs is not None else 2) if compiled is not None else [(s0, s1)]
            results = _in_groups(compiled, groups, (s0, s1), one_pass,
                                 lambda g: self._sample_compiles(call, xs, refs, per_sample_refs, size, compiled, g),
                                 ("sample", call.explained, call.wrt, call.k, _input_shapes(xs)))
            for w in call.wrt:
                pieces[w].append(np.concatenate([r[0][w] for r in results], axis=1))
            if results[0][1] is not None:
                deltas.append(np.concatenate([r[1] for r in results], axis=1))
        attrs = [np.concatenate(pieces[w], axis=1) for w in call.wrt]
        return attrs, np.concatenate(deltas, axis=1) if deltas else None

    def _sample_compiles(self, call: _Call, xs, refs, per_sample_refs: bool, size: PassSize, compiled,
                         group) -> bool:
        """Whether the pass of row group `group` compiles for the first chunk of targets (traced
        here, before the groups run at once)."""
        s0, s1 = group
        sub_refs = None if refs is None else [r[s0:s1] if per_sample_refs else r for r in refs]
        feeds = self._feeds([x[s0:s1] for x in xs], sub_refs)
        rows_ref = 0 if sub_refs is None else sub_refs[0].shape[0]
        return compiled.get(feeds, s1 - s0, rows_ref, call, min(size.targets, call.k), threads=1) is not None

    def _sample_pass(self, call: _Call, xs, refs, per_sample_refs: bool, size: PassSize, compiled, s0: int,
                     s1: int, threads: int | None):
        """One pass of samples s0:s1 for all targets, in chunks of `size.targets`: its
        attributions (K, s1 - s0, ...) per wrt tensor and deltas (K, s1 - s0) (None for methods
        without a reference); `threads`: the intra-op threads of its compiled sessions."""
        n = xs[0].shape[0]
        revealcancel_ = self.method.split
        sub_refs = None if refs is None else [r[s0:s1] if per_sample_refs else r for r in refs]
        sub_x = [x[s0:s1] for x in xs]
        cp = interpreted = None
        if compiled is not None:  # one onnxruntime session per (shapes, targets) does the pass
            feeds = self._feeds(sub_x, sub_refs)
            rows_ref = 0 if sub_refs is None else sub_refs[0].shape[0]
            cp = compiled.get(feeds, s1 - s0, rows_ref, call, min(size.targets, call.k), threads=threads)
        if cp is None:
            interpreted = self._interpreted_pass(sub_x, sub_refs, call, revealcancel_, min(size.targets, call.k))
        block = {w: [] for w in call.wrt}
        block_deltas = []
        for t0 in range(0, call.k, size.targets):
            seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), self._explained_dtype(call))
            k = seed.shape[0]
            this = compiled.get(feeds, s1 - s0, rows_ref, call, k, threads=threads) if cp is not None else None
            if this is not None:
                grads, values = this(feeds, seed.astype(this.seed_dtype, copy=False))
                spread = values.pop("liftir_spread", None)
                run = compiled.light_run(this, feeds, values)
                _require_samples_first(run, call.explained)
            else:
                if interpreted is None:  # this number of targets did not compile: the interpreter
                    interpreted = self._interpreted_pass(sub_x, sub_refs, call, revealcancel_, k)
                run, spread, node_backward = interpreted
                grads = self._backward(run, call, np.concatenate([seed, seed]) if spread is not None
                                       else seed, node_backward)
            sums = 0.0
            for w in call.wrt:
                if spread is not None:
                    a, s = self._finish_split(run, w, grads[w], spread, k)
                else:
                    a, s = self._finish(run, w, grads[w], k, call)
                block[w].append(a)
                sums = sums + s if s is not None else None
            if self.method.uses_reference:
                block_deltas.append(sums - self._explained_difference(seed, run, call.explained))
        return {w: np.concatenate(block[w]) for w in call.wrt}, np.concatenate(block_deltas) if block_deltas else None

    def _interpreted_pass(self, sub_x, sub_refs, call: _Call, revealcancel_: bool, k: int):
        """The interpreter's forward of one pass, and for RevealCancel its split forward:
        (run, spread or None, node_backward or None)."""
        run = self._pass_forward(sub_x, sub_refs, call, k)
        _require_samples_first(run, call.explained)
        if not revealcancel_:
            return run, None, None
        spread = revealcancel.split_forward(run, self.plan.order_for((call.explained,)), tuple(self.attributed))
        return run, spread, revealcancel.node_backward(spread)

    def _run_pairs(self, call: _Call, xs, refs, cost: RowCost, budget, cap: int):
        """DeepLIFT-SHAP: DeepLIFT for every (sample, reference) pair, averaged over references.

        A pass takes whole samples with all their references when they fit, else one sample
        with a chunk of its references; the per-pair results of a sample are averaged once
        all its pairs are in, so the chunking never changes the numbers."""
        n = xs[0].shape[0]
        own = refs[0].ndim == xs[0].ndim + 1  # (n, B, ...): each sample's own references
        pairs = refs[0].shape[1] if own else refs[0].shape[0]
        # per pair: its reference row, the actual and reference rows expanded into pairs for the
        # rules, a share of the actual row; 0.3 more for transient copies (peak RSS measured on
        # benchmarks/bench_memory.py grew by 3.25 forward rows per pair, plus ~27 MiB once)
        size = plan_pass(budget, cost, cap * pairs, call.k, forward_rows=3.3 + 1 / pairs, what="pair")
        if size.rows >= pairs:
            samples, chunk = _even(n, size.rows // pairs), pairs
        else:
            samples, chunk = 1, _even(pairs, size.rows)
        size = replace(size, rows=min(n, samples) * chunk, targets=_even(call.k, size.targets))
        passes = [(s0, min(s0 + samples, n), b0, min(b0 + chunk, pairs))
                  for s0 in range(0, n, samples) for b0 in range(0, pairs, chunk)]
        pieces: dict[str, list] = {w: [] for w in call.wrt}
        deltas, block, block_deltas = [], {w: [] for w in call.wrt}, []
        compiled = self._compiled if self._compiled is not None and self._compiled.why_not(call) is None else None

        def one_pass(s0, s1, b0, b1, threads=None, engine=compiled):
            return self._pair_pass(call, xs, refs, own, size, engine, (s0, s1, b0, b1), threads)

        for s0, s1, b0, b1 in self._passes(passes, call, size, "pair"):
            # row groups of whole samples, or of one sample's references
            if s1 - s0 > 1:
                groups = [(a, b, b0, b1) for a, b in compiled.row_groups(s0, s1)] if compiled else []
            else:
                groups = [(s0, s1, a, b) for a, b in compiled.row_groups(b0, b1)] if compiled else []
            results = _in_groups(compiled, groups, (s0, s1, b0, b1), one_pass,
                                 lambda g: self._pair_compiles(call, xs, refs, own, size, compiled, g),
                                 ("pair", call.explained, call.wrt, call.k, own, _input_shapes(xs)))
            for w in call.wrt:
                block[w].append(np.concatenate([r[0][w] for r in results], axis=1))
            block_deltas.append(np.concatenate([r[1] for r in results], axis=1))
            if b1 == pairs:  # every pair of samples s0:s1 is in: average over their references
                for w in call.wrt:
                    a = np.concatenate(block[w], axis=1)
                    a = a.reshape((a.shape[0], s1 - s0, pairs) + a.shape[2:])
                    pieces[w].append(a if call.per_pair else a.mean(axis=2))
                d = np.concatenate(block_deltas, axis=1).reshape(-1, s1 - s0, pairs)
                deltas.append(d if call.per_pair else d.mean(axis=2))
                block, block_deltas = {w: [] for w in call.wrt}, []
        attrs = [np.concatenate(pieces[w], axis=1) for w in call.wrt]
        return attrs, np.concatenate(deltas, axis=1)

    def _pair_inputs(self, xs, refs, own: bool, s0: int, s1: int, b0: int, b1: int):
        """Samples s0:s1 and references b0:b1 (each sample's own, or the shared ones)."""
        if own:
            sub_refs = [r[s0:s1, b0:b1].reshape((-1,) + r.shape[2:]) for r in refs]
        else:
            sub_refs = [r[b0:b1] for r in refs]
        return [x[s0:s1] for x in xs], sub_refs

    def _pair_compiles(self, call: _Call, xs, refs, own: bool, size: PassSize, compiled, span) -> bool:
        """Whether the pass of the pairs of `span` compiles for the first chunk of targets."""
        s0, s1, b0, b1 = span
        sub_x, sub_refs = self._pair_inputs(xs, refs, own, s0, s1, b0, b1)
        return compiled.get(self._feeds(sub_x, sub_refs), s1 - s0, sub_refs[0].shape[0], call,
                            min(size.targets, call.k), pairs=b1 - b0, tile_references=not own,
                            threads=1) is not None

    def _pair_pass(self, call: _Call, xs, refs, own: bool, size: PassSize, compiled, span, threads):
        """DeepLIFT of the (sample, reference) pairs of span = (s0, s1, b0, b1), sample-major,
        for all targets: (K, pairs, ...) per wrt tensor and (K, pairs) deltas (or the explained
        differences, for per-pair results)."""
        s0, s1, b0, b1 = span
        n = xs[0].shape[0]
        sub_x, sub_refs = self._pair_inputs(xs, refs, own, s0, s1, b0, b1)
        interpreted = None
        feeds = self._feeds(sub_x, sub_refs) if compiled is not None else None
        per_target = {w: [] for w in call.wrt}
        pass_deltas = []
        for t0 in range(0, call.k, size.targets):
            seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), self._explained_dtype(call))
            seed = np.repeat(seed, b1 - b0, axis=1)  # sample-major pairs
            this = None if compiled is None else compiled.get(
                feeds, s1 - s0, sub_refs[0].shape[0], call, seed.shape[0], pairs=b1 - b0, tile_references=not own,
                threads=threads)
            if this is not None:  # one onnxruntime session: the forward, the pairs, their backward
                grads, values = this(feeds, seed.astype(this.seed_dtype, copy=False))
                run = compiled.light_run(this, feeds, values)
                _require_samples_first(run, call.explained)
            else:
                if interpreted is None:  # this number of targets did not compile: the interpreter
                    forward = self._pass_forward(sub_x, sub_refs, call, seed.shape[0], pairs=b1 - b0,
                                                 tile_references=not own)
                    interpreted = scheduler.PairedRun(forward, b1 - b0, tile_references=not own)
                    _require_samples_first(interpreted, call.explained)
                run = interpreted
                grads = self._backward(run, call, seed)
            sums = 0.0
            for w in call.wrt:
                a, s = self._finish(run, w, grads[w], seed.shape[0], call)
                per_target[w].append(a)
                sums = sums + s
            difference = self._explained_difference(seed, run, call.explained)
            pass_deltas.append(difference if call.per_pair else sums - difference)
        return {w: np.concatenate(per_target[w]) for w in call.wrt}, np.concatenate(pass_deltas)

    def _run_path(self, call: _Call, xs, refs, cost: RowCost, budget, cap: int, quadrature):
        """Integrated gradients: gradients at x0 + alpha (x - x0), weighted, times x - x0.

        Passes take (point, sample) rows; the weighted gradients are summed point by point
        in the quadrature's order, so how points are grouped into passes never changes them."""
        alphas, weights, max_rows = quadrature
        n = xs[0].shape[0]
        steps = len(alphas)
        per_sample_refs = refs[0].shape[0] == n and n > 1
        size = plan_pass(budget, cost, cap * steps, call.k, what="point of the path")
        rows = min(size.rows, max_rows or size.rows)
        if rows >= steps:
            samples, points = _even(n, min(cap, rows // steps)), steps
        else:
            samples = _even(n, min(cap, rows))
            points = _even(steps, max(1, rows // samples))
        size = replace(size, rows=samples * points, targets=_even(call.k, size.targets))
        passes = [(s0, min(s0 + samples, n), p0, min(p0 + points, steps))
                  for s0 in range(0, n, samples) for p0 in range(0, steps, points)]
        pieces: dict[str, list] = {w: [] for w in call.wrt}
        deltas = []
        averaged = None
        compiled = self._compiled if self._compiled is not None and self._compiled.why_not(call) is None else None

        def gradients(s0, s1, p0, p1, threads=None, engine=compiled):
            return self._path_gradients(call, xs, refs, per_sample_refs, alphas, size, engine, (s0, s1, p0, p1),
                                        threads)

        for s0, s1, p0, p1 in self._passes(passes, call, size, "point of the path"):
            sub_x = [x[s0:s1] for x in xs]
            sub_refs = [r[s0:s1] if per_sample_refs else r for r in refs]
            if p0 == 0:  # weighted sums of gradients, (K, s, ...) per input
                averaged = [np.zeros((call.k,) + x.shape, dtype=np.float64) for x in sub_x]
            # row groups of whole samples (all the pass's points), or of one sample's points
            if s1 - s0 > 1:
                least = 1 if p1 - p0 > 1 else 2  # rows of the pass: points x samples, two at least
                groups, axis = [(a, b, p0, p1) for a, b in compiled.row_groups(s0, s1, least)] if compiled else [], 2
            else:
                groups, axis = [(s0, s1, a, b) for a, b in compiled.row_groups(p0, p1, 2)] if compiled else [], 1
            results = _in_groups(compiled, groups, (s0, s1, p0, p1), gradients,
                                 lambda g: self._path_compiles(call, xs, refs, per_sample_refs, alphas, size,
                                                               compiled, g),
                                 ("path", call.explained, call.wrt, call.k, _input_shapes(xs)))
            w = weights[p0:p1]
            for c, (t0, k) in enumerate(results[0][0]):
                for i, name in enumerate(self.input_names):
                    if results[0][1][c][i] is None:
                        continue
                    g = np.concatenate([r[1][c][i] for r in results], axis=axis)  # (k, points, samples, ...)
                    for j in range(p1 - p0):  # point by point: the same sums however points are grouped
                        averaged[i][t0:t0 + k] += w[j] * g[:, j].astype(np.float64)
            if p1 < steps:
                continue
            ends = self._forward(sub_x, sub_refs, call.explained)  # f(x) and f(x0) for the residual
            sums = 0.0
            for i, (x, r) in enumerate(zip(sub_x, sub_refs)):
                if self.input_names[i] not in call.wrt:  # an integer input, held at its actual value
                    continue
                contribution = averaged[i] * (x - r).astype(np.float64)[None]
                sums = sums + contribution.reshape(call.k, s1 - s0, -1).sum(axis=2)
                pieces[self.input_names[i]].append(
                    (contribution if call.multiply else averaged[i]).astype(x.dtype))
            differences = []
            for t0 in range(0, call.k, size.targets):
                seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), ends.device(call.explained).dtype)
                differences.append(self._explained_difference(seed, ends, call.explained))
            deltas.append(sums - np.concatenate(differences))
        attrs = [np.concatenate(pieces[w], axis=1) for w in call.wrt]
        return attrs, np.concatenate(deltas, axis=1)

    def _path_points(self, xs, refs, per_sample_refs: bool, alphas, span):
        """The path's points of `span` = (s0, s1, p0, p1): (points * samples, ...) per input,
        alpha-major, and the samples' inputs."""
        s0, s1, p0, p1 = span
        sub_x = [x[s0:s1] for x in xs]
        sub_refs = [r[s0:s1] if per_sample_refs else r for r in refs]
        a = alphas[p0:p1]
        return [(r[None] + a.reshape((-1,) + (1,) * x.ndim) * (x - r)[None]).reshape((-1,) + x.shape[1:])
                .astype(x.dtype) for x, r in zip(sub_x, sub_refs)], sub_x

    def _path_compiles(self, call: _Call, xs, refs, per_sample_refs: bool, alphas, size: PassSize, compiled,
                       span) -> bool:
        """Whether the gradient pass of `span` compiles for the first chunk of targets."""
        path, _ = self._path_points(xs, refs, per_sample_refs, alphas, span)
        return compiled.get(self._feeds(path, None), path[0].shape[0], 0, call, min(size.targets, call.k),
                            threads=1) is not None

    def _path_gradients(self, call: _Call, xs, refs, per_sample_refs: bool, alphas, size: PassSize, compiled,
                        span, threads):
        """Gradients at the path's points of span = (s0, s1, p0, p1), per chunk of targets:
        ([(t0, k)], [[(k, points, samples, ...) or None per input] per chunk])."""
        s0, s1, p0, p1 = span
        n = xs[0].shape[0]
        path, sub_x = self._path_points(xs, refs, per_sample_refs, alphas, span)
        run = None
        feeds = self._feeds(path, None) if compiled is not None else None
        chunks, gradients = [], []
        for t0 in range(0, call.k, size.targets):
            seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), self._explained_dtype(call))
            k = seed.shape[0]
            seed = np.tile(seed, (1, p1 - p0) + (1,) * (seed.ndim - 2))
            this = None if compiled is None else compiled.get(feeds, path[0].shape[0], 0, call, k, threads=threads)
            if this is not None:  # one onnxruntime session does the gradient pass
                grads, _ = this(feeds, seed.astype(this.seed_dtype, copy=False))
            else:
                if run is None:
                    run = self._pass_forward(path, None, call, k)
                    _require_samples_first(run, call.explained)
                grads = self._backward(run, call, seed)
            chunks.append((t0, k))
            gradients.append([None if name not in call.wrt or grads[name] is None else
                              to_host(grads[name]).reshape((k, p1 - p0, s1 - s0) + sub_x[i].shape[1:])
                              for i, name in enumerate(self.input_names)])
        return chunks, gradients

    @staticmethod
    def _per_target(attributions, delta, target):
        """(K, N, ...) results as (N, K, ...) and deltas (K, N) as (N, K) for several
        targets; (N, ...) and (N,) for one."""
        k = attributions[0].shape[0] if attributions else delta.shape[0]  # nothing to attribute to: a held path
        delta = None if delta is None else delta.T
        if targets.several(k, target):
            return [np.moveaxis(a, 0, 1) for a in attributions], delta
        return [a[0] for a in attributions], None if delta is None else delta[:, 0]

    def _finish(self, run, tensor: str, m, k: int, call: _Call):
        """Multipliers (k, P, ...) of `tensor` turned into what the call returns, on the host,
        with the samples first (a layer whose batch the exporter moved: each sample's own slice),
        and for reference methods the sums of m * (x - x0) per (target, row): (k, P) float64."""
        dtype = run.device(tensor).dtype
        reference = self.method.attribution is Attribution.DELTA
        if m is None:
            m = self.xp.zeros((k,) + run.actual_shape(tensor), dtype=dtype)
        if not reference:
            if self.method.attribution is Attribution.INPUT and call.multiply:
                m = m * run.actual(tensor)
            return to_host(self._samples_first(run, tensor, m)).astype(dtype, copy=False), None
        step = difference(self.xp, run.actual(tensor), run.reference(tensor))
        with np.errstate(invalid="ignore"):  # 0 * inf: handled below
            contribution = self._samples_first(run, tensor, m * step)
        sums = _row_sums(to_host(contribution), k, run.n_actual)
        if not np.isfinite(sums).all():  # an infinite step (a -inf mask computed from ids), or worse
            contribution = self._samples_first(run, tensor, _infinite_steps(self.xp, tensor, m, step))
            sums = _row_sums(to_host(contribution), k, run.n_actual)
        if call.func is not None:
            result = call.func(m, run.actual(tensor), run.reference(tensor))
            if tuple(getattr(result, "shape", ())) != tuple(m.shape):
                raise InputError(f"attribution_func returned shape {tuple(getattr(result, 'shape', ()))} for "
                                 f"{tensor!r}; it must keep the multipliers' shape {tuple(m.shape)}")
            result = self._samples_first(run, tensor, result)
        else:
            result = contribution if call.multiply else self._samples_first(run, tensor, m)
        return to_host(result).astype(dtype, copy=False), sums

    def _samples_first(self, run, tensor: str, a):
        """(k, ...) per-row values of `tensor` with its samples moved to axis 1 (after k)."""
        return samples_first(self.xp, a, run.loc(tensor), lead=1) if tensor in run.values else a

    def _finish_split(self, run, tensor: str, m, spread, k: int):
        """RevealCancel: m+ d+ + m- d- with d+- = (d +- D) / 2, and its sums per (target, row)."""
        if m is None:
            value = run.device(tensor)
            return np.zeros((k, run.n_actual) + tuple(value.shape[1:]), dtype=value.dtype), np.zeros((k, run.n_actual))
        delta = difference(self.xp, run.actual(tensor), run.reference(tensor))
        pos, neg = (delta + spread[tensor]) * 0.5, (delta - spread[tensor]) * 0.5
        a = to_host(self._samples_first(run, tensor, m[:k] * pos + m[k:] * neg)).astype(run.device(tensor).dtype,
                                                                                          copy=False)
        return a, _row_sums(a, k, run.n_actual)

    @staticmethod
    def _explained_difference(seed: np.ndarray, run, tensor: str) -> np.ndarray:
        """f(x)_t - f(x0)_t for each target and row of the seed: sum over output neurons of
        seed * (value - reference value), (k, rows), in double (buffered: no double copy of the seed)."""
        k, rows = seed.shape[:2]
        difference = to_host(run.actual(tensor)).astype(np.float64) - to_host(run.reference(tensor)).astype(np.float64)
        difference = np.broadcast_to(difference, seed.shape[1:]).reshape(rows, -1)
        return np.einsum("krx,rx->kr", seed.reshape(k, rows, -1), difference, dtype=np.float64)



def _names(test, joined: str) -> str:
    """The methods with `test(method)`, quoted, for an error message."""
    return joined.join(repr(name) for name in methods_where(test))


def _infinite_steps(xp, tensor: str, m, step):
    """m * (x - x0) where x - x0 is infinite somewhere (a tensor computed from integer inputs,
    -inf in one pass only: a mask that differs between the input and its reference): nothing
    downstream read the change where m = 0 (the contribution is 0, not 0 * inf = NaN); where
    m != 0 no finite attribution exists, which is refused by name."""
    jump = xp.broadcast_to(abs(step) == np.inf, m.shape)
    if bool((jump & (m != 0)).any()):
        raise RuleError(f"tensor {tensor!r} changes by an infinite amount between the input and its reference "
                        f"(e.g. a -inf mask computed from integer inputs that differ) where the explained output "
                        f"depends on it: no finite attribution carries that change; give the reference the "
                        f"input's own values for those integer inputs")
    with np.errstate(invalid="ignore"):
        return xp.where(jump, xp.zeros((), dtype=m.dtype), m * step)


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")


@dataclass(frozen=True)
class _Call:
    """What one `attribute` call explains, shared by the pass loops."""

    explained: str
    stripped: str | None
    axis: int
    target: Any
    rest: tuple[int, ...]  # the explained tensor's non-batch shape
    k: int  # targets explained
    wrt: tuple[str, ...]
    multiply: bool
    func: Callable | None
    progress: bool
    per_pair: bool = False  # DeepLIFT-SHAP: keep each (sample, reference) pair, do not average

    def seed(self, s0: int, s1: int, n: int, chosen: slice, dtype) -> np.ndarray:
        """The initial multipliers of samples s0:s1 (of n) for the targets `chosen` of the K."""
        return targets.seed((s1 - s0,) + self.rest, targets.rows_of(self.target, s0, s1, n), self.stripped,
                            self.axis, chosen, dtype)


def _row_sums(contributions: np.ndarray, k: int, rows: int) -> np.ndarray:
    """Each (target, row)'s sum of contributions (k, rows, ...), accumulated in float64 without
    a float64 copy of them."""
    return contributions.reshape(k, rows, -1).sum(axis=2, dtype=np.float64)


def _input_shapes(xs) -> tuple:
    """The inputs' per-sample shapes and dtypes: with a pass's sizes they fix its shapes."""
    return tuple((x.shape[1:], x.dtype.str) for x in xs)


def _in_groups(compiled, groups: list[tuple], span: tuple, work, compiles, kind: tuple) -> list:
    """[work(*span)] for a pass that runs whole, or [work(*group, 1) for each group], at once
    (liftir/compile/engine.py `row_groups`), when there are several, the first group's pass
    compiles (`compiles(group)`, traced before they start; asked once per pass key) and the
    pass (`kind`: the call and its inputs' shapes, and the span's sizes) has not proved too
    small to split; where it does not compile (said once),
    the interpreter runs the whole pass, whose NumPy work splits over threads on its own."""
    key = kind + tuple(b - a for a, b in zip(span[::2], span[1::2]))
    if len(groups) <= 1 or key in compiled.runs_whole:
        return [work(*span)]
    if key in compiled.groups_compile or compiles(groups[0]):
        compiled.groups_compile.add(key)
        return compiled.run_groups(work, groups, key)
    return [work(*span, None, None)]


def _even(total: int, most: int) -> int:
    """The chunk size that cuts `total` into as few chunks of at most `most` as possible,
    all of about the same size (20 in chunks of 19 becomes 10 + 10, not 19 + 1)."""
    chunks = -(-total // max(1, most))
    return -(-total // chunks)


def _require_samples_first(run, tensor: str) -> None:
    """Targets index an explained tensor (N, ...): its samples must be on axis 0, alone."""
    loc = run.loc(tensor)
    if tensor in run.values and not (loc.axis == 0 and loc.plain):
        raise BatchAxisError(f"the explained tensor {tensor!r} (shape {tuple(run.device(tensor).shape)}) holds "
                             f"the samples on axis {loc.axis}" + ("" if loc.plain else " merged with other axes")
                             + "; explain a tensor with the samples on axis 0 (output=...)")


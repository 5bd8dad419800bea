"""The public entry point: `Explainer(model, method=...).attribute(inputs, baselines, target)`.

This module reads the model into the graph every call runs on, parses the options once and
holds the public calls (`attribute`, `forward`/`backward`, `compile`, ...). What users pass
is validated before anything runs: inputs and baselines in liftir/inputs.py, outputs and
targets in liftir/targets.py. How a call is cut into passes, each a forward over the stacked
batch [actual; reference] and a backward from the targets' seed, and how multipliers become
attributions and convergence deltas as the method (liftir/methods.py) says, is
liftir/pass_loops.py.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from . import diagnostics, scheduler, targets
from .backend import array_module, to_host
from .cut import cut_at
from .errors import BatchAxisError, InputError, ModelLoadError, RuleError
from .folding import fold_constants
from .fusion import fuse_gelu
from .pruning import prune_unread_positions
from .layout import batch_first
from .graph import Graph, build_graph, promote_to_float64, read_model
from .inputs import Batch, model_inputs, pack, prepare, stack
from .memory import DEFAULT_MAX_MEMORY, PassSize, RowCost, parse_memory
from .methods import (Engine, FinalActivation, MaxRule, Method, Passes, Precision, Reference,
                      get_method, integration_points, methods_where)
from .registry import check_overrides
from .training_mode import refuse_training_mode
from .compile.engine import CompiledEngine
from .pass_loops import PassLoops, Call, require_samples_first

logger = logging.getLogger("liftir")


class Explainer(PassLoops):
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
        diagnostics.warn_if_not_conserving(self, xs, refs, attrs, delta, output=out, layer=layer, call=call)
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
              per_pair: bool = False) -> tuple[Call, RowCost]:
        """What a call explains, with its targets checked now, not after the first passes (the
        form on one row, the range on all), and the cost of a forward row."""
        n = xs[0].shape[0]
        target = targets.sequence_target(target, n)
        explained, stripped = self.explained_tensor(out)
        cost, rest = self._row_cost(xs, explained)
        call = Call(explained=explained, stripped=stripped,
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
            require_samples_first(run, explained)
            self._row_costs[key] = (RowCost.measure(run.values, rows), tuple(run.device(explained).shape[1:]))
            self._explained_dtypes[explained] = run.device(explained).dtype
        return self._row_costs[key]

    def _explained_dtype(self, call: Call) -> np.dtype:
        """The explained tensor's dtype in this Explainer's passes (seeds take it), known
        from `_row_cost`'s probe before any pass has run."""
        return self._explained_dtypes[call.explained]

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


def _names(test, joined: str) -> str:
    """The methods with `test(method)`, quoted, for an error message."""
    return joined.join(repr(name) for name in methods_where(test))


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
